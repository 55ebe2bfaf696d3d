"""Show a volume slice by slice in radiological display orientation, and map masks back exactly.

Geometry rule: a volume is kept exactly as read (size, spacing, origin, direction untouched). Display
slices are numpy *views* of the voxel buffer, re-ordered only by axis permutations and flips, and
``DisplayStack.to_volume_mask`` undoes exactly those, so the mask lines up voxel for voxel with the input.

Display convention (radiological), in DICOM/ITK LPS physical space (+x patient left, +y posterior,
+z superior):

=========  ====================  ===================  ===========================
axis       image rows go to      image columns go to  slice index grows towards
=========  ====================  ===================  ===========================
axial      posterior (anterior   patient left         superior
           at the top)           (left on the right)
coronal    inferior              patient left         posterior
sagittal   inferior              posterior (anterior  patient left
                                 on the left)
=========  ====================  ===================  ===========================

For a volume stored in plain LPS order (identity direction) slice i is voxel index i along the axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from medreasoner.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

    from medreasoner.io.volumes import Volume



AXES = ("axial", "coronal", "sagittal")


# (physical LPS axis, direction the display index grows towards) for (slice, row, col).
_DISPLAY_LAYOUT: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "axial": ((2, +1), (1, +1), (0, +1)),
    "coronal": ((1, +1), (2, -1), (0, +1)),
    "sagittal": ((0, +1), (2, -1), (1, +1)),
}


def _axis_assignment(direction: np.ndarray) -> tuple[list[int], list[int]]:
    """For each physical LPS axis p: (voxel axis closest to it, +1/-1 whether that voxel axis points along +p).

    Chooses the permutation maximising the summed |cosines|, so oblique grids map to the nearest
    axis-aligned orientation and every voxel axis is used exactly once.
    """
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(direction[p, perm[p]]) for p in range(3)))
    voxel_axis = list(best)
    sign = [1 if direction[p, voxel_axis[p]] >= 0 else -1 for p in range(3)]
    return voxel_axis, sign


class DisplayStack:
    """Slices of a volume along one axis in radiological display orientation, as views.

    axial: patient's left on image right, anterior up; coronal: patient's left on image right, superior
    up; sagittal: anterior on image left, superior up. Any direction matrix works (LPS/RAS flips,
    permuted and oblique axes): the closest axis-aligned orientation is used, through permutations and
    flips of the voxel grid only, never resampling. Slice index grows towards superior (axial), posterior
    (coronal), patient left (sagittal).
    """

    def __init__(self, volume: Volume, axis: str = "axial"):
        import SimpleITK as sitk

        name = str(axis).strip().lower()
        if name not in AXES:
            raise InputError(f"unknown axis {axis!r}; choose one of: {', '.join(AXES)}")
        self.volume = volume
        self.axis = name
        image = volume.image
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D volume, got {image.GetDimension()}D")
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
        voxel_axis, sign = _axis_assignment(direction)
        # Voxel (index) axis per display axis (slice, row, col), and whether it has to be reversed.
        self._voxel_axes: tuple[int, int, int] = tuple(  # type: ignore[assignment]
            voxel_axis[p] for p, _ in _DISPLAY_LAYOUT[name])
        self._flips: tuple[bool, bool, bool] = tuple(  # type: ignore[assignment]
            sign[p] != want for p, want in _DISPLAY_LAYOUT[name])
        self._size = tuple(int(s) for s in image.GetSize())
        self._spacing = tuple(float(s) for s in image.GetSpacing())
        self._array = sitk.GetArrayViewFromImage(image)  # (z, y, x) == voxel axes (2, 1, 0)
        self._view = self._display_view(self._array)

    def _display_view(self, arr: np.ndarray) -> np.ndarray:
        """(slices, rows, cols) view of a (z, y, x) array; writing into it writes into ``arr``."""
        view = arr.transpose([2 - c for c in self._voxel_axes])
        flip = tuple(slice(None, None, -1) if f else slice(None) for f in self._flips)
        return view[flip]

    def __len__(self) -> int:
        return self._view.shape[0]

    def __repr__(self) -> str:
        return (f"DisplayStack(axis={self.axis!r}, slices={len(self)}, slice_shape={self.slice_shape}, "
                f"path={self.volume.path!r})")

    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self._view.shape[1]), int(self._view.shape[2])

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row mm, col mm): spacing of the voxel axes shown along image rows and columns."""
        return self._spacing[self._voxel_axes[1]], self._spacing[self._voxel_axes[2]]

    @property
    def slice_spacing(self) -> float:
        return self._spacing[self._voxel_axes[0]]

    def _check_index(self, i: int) -> int:
        n = len(self)
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"slice index must be an integer, got {type(i).__name__}")
        if not 0 <= int(i) < n:
            raise IndexError(f"slice {i} out of range for the {self.axis} stack of {n} slices")
        return int(i)

    def raw(self, i: int) -> np.ndarray:
        """Display slice ``i`` as a read-only 2D view (rows, cols) in the volume's own dtype."""
        return self._view[self._check_index(i)]

    def index_in_volume(self, i: int) -> int:
        """Voxel index along the original grid axis (the one this stack slices) of display slice ``i``."""
        i = self._check_index(i)
        return self._size[self._voxel_axes[0]] - 1 - i if self._flips[0] else i

    def physical_point(self, slice_index: float, row: float, col: float) -> tuple[float, float, float]:
        """LPS millimetres of a display position: ``slice_index`` a slice number, ``row``/``col``
        continuous pixel coordinates of that slice (pixel i spans [i, i+1), as the CRM's answers)."""
        index = [0.0, 0.0, 0.0]
        for d, (value, pixel) in enumerate(((slice_index, False), (row, True), (col, True))):
            v = float(value) - (0.5 if pixel else 0.0)  # pixel edges -> voxel-centre index
            axis = self._voxel_axes[d]
            index[axis] = self._size[axis] - 1 - v if self._flips[d] else v
        return tuple(self.volume.image.TransformContinuousIndexToPhysicalPoint(index))

    def slice_at(self, point_lps) -> int:
        """The display slice holding an LPS point (millimetres), e.g. the slice a viewer shows."""
        index = self.volume.image.TransformPhysicalPointToContinuousIndex([float(v) for v in point_lps])
        axis = self._voxel_axes[0]
        i = int(round(index[axis]))
        i = self._size[axis] - 1 - i if self._flips[0] else i
        if not 0 <= i < len(self):
            raise InputError(f"the point {tuple(round(float(v), 2) for v in point_lps)} (LPS mm) lies outside the "
                             f"volume's {len(self)} {self.axis} slices")
        return i

    @property
    def volume_axis(self) -> int:
        """Which voxel axis of the original grid (0=i/x, 1=j/y, 2=k/z in SimpleITK order) this stack slices."""
        return self._voxel_axes[0]

    def to_volume_mask(self, masks: np.ndarray | Mapping[int, np.ndarray]) -> SimpleITK.Image:
        """Display masks -> uint8 0/1 SimpleITK image on exactly the input volume's grid.

        ``masks``: an (n, rows, cols) array for all slices, or a dict {slice index: (rows, cols) mask}
        for some of them (the rest stay 0). Non-zero means inside.
        """
        import SimpleITK as sitk

        out = np.zeros(self._array.shape, dtype=np.uint8)
        target = self._display_view(out)
        rows, cols = self.slice_shape
        if isinstance(masks, Mapping):
            for key, m in masks.items():
                i = self._check_index(key)
                m = np.asarray(m)
                if m.shape != (rows, cols):
                    raise InputError(
                        f"mask for {self.axis} slice {i} has shape {m.shape}, expected {(rows, cols)}"
                    )
                target[i] = m != 0
        else:
            m = np.asarray(masks)
            if m.shape != (len(self), rows, cols):
                raise InputError(
                    f"{self.axis} masks have shape {m.shape}, expected {(len(self), rows, cols)} "
                    "(slices, rows, cols)"
                )
            target[...] = m != 0
        result = sitk.GetImageFromArray(out)
        result.CopyInformation(self.volume.image)
        return result


def display_stack(volume: Volume, axis: str = "axial") -> DisplayStack:
    """Slices of ``volume`` along ``axis`` ("axial", "coronal" or "sagittal") in display orientation."""
    return DisplayStack(volume, axis)
