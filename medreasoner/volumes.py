"""Read 3D volumes (NIfTI, NRRD, MHA/MHD, DICOM series), show them slice by slice, write masks back.

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
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medreasoner.errors import InputError
from medreasoner.intensity import (
    HIGH_PERCENTILE,
    LOW_PERCENTILE,
    WINDOW_PRESETS,
    Window,
    _scale,
    parse_window,
)
from medreasoner.outputs import atomic_write_with, guard_outputs

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK

log = logging.getLogger(__name__)

AXES = ("axial", "coronal", "sagittal")

VOLUME_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")

# SimpleITK pixel ids sitkInt8 .. sitkUInt64 (scalar integers); 8, 9 are float32/64.
_INTEGER_PIXELS = (0, 1, 2, 3, 4, 5, 6, 7)

# Voxel counts above which statistics are taken on a strided subsample / in slabs.
_SAMPLE_VOXELS = 4_000_000
_SLAB_VOXELS = 8_000_000

# (physical LPS axis, direction the display index grows towards) for (slice, row, col).
_DISPLAY_LAYOUT: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "axial": ((2, +1), (1, +1), (0, +1)),
    "coronal": ((1, +1), (2, -1), (0, +1)),
    "sagittal": ((0, +1), (2, -1), (1, +1)),
}

# Query keywords -> CT window preset, checked in this order (first match wins); matched at word starts.
_KEYWORD_WINDOWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lung", ("lung", "pulmon", "pneumo", "breath", "dyspn", "emphysem", "bronch", "airway", "cough",
              "respirat")),
    ("brain", ("brain", "intracranial", "cerebr", "stroke", "haemorrhag", "hemorrhag", "subdural",
               "subarachnoid", "extradural")),
    ("bone", ("bone", "fractur", "vertebra", "spine", "osse", "skelet", "skull", "rib", "ribs", "femur",
              "osteo", "lytic")),
    ("mediastinum", ("heart", "cardi", "mediastin", "aort", "pericard", "coronary", "oesophag", "esophag")),
)


@dataclass
class Volume:
    """A scalar 3D image exactly as read from disk, plus what we learnt while reading it."""

    image: SimpleITK.Image
    path: str | None = None
    modality: str = ""
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """SimpleITK size (x, y, z); the numpy array is (z, y, x)."""
        size = self.image.GetSize()
        return int(size[0]), int(size[1]), int(size[2])

    @property
    def nbytes(self) -> int:
        img = self.image
        return int(img.GetNumberOfPixels() * img.GetSizeOfPixelComponent()
                   * img.GetNumberOfComponentsPerPixel())

    @property
    def array(self) -> np.ndarray:
        """Read-only (z, y, x) view of the voxels; valid while ``image`` is alive and unmodified."""
        import SimpleITK as sitk

        return sitk.GetArrayViewFromImage(self.image)


# --------------------------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D volume file (NIfTI, NRRD, MHA/MHD, ...) or a folder holding a DICOM series."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"volume not found: {p}")
    if p.is_dir():
        image, modality, meta = _read_dicom_folder(p)
    else:
        image, modality, meta = _read_file(p)
    return volume_from_image(image, path=str(p), modality=modality, metadata=meta)


def volume_from_image(image: SimpleITK.Image, path: str | None = None, modality: str | None = None,
                      metadata: dict[str, Any] | None = None) -> Volume:
    """Validate an in-memory SimpleITK image as a volume (the checks ``read_volume`` applies)."""
    import SimpleITK as sitk

    where = path or "volume"
    if not isinstance(image, sitk.Image):
        raise InputError(f"{where}: expected a SimpleITK image, got {type(image).__name__}")
    image = _as_3d(image, where)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{where} has {image.GetNumberOfComponentsPerPixel()} values per voxel (vector/RGB pixels); "
            "give a scalar (grey-level) volume"
        )
    if image.GetPixelID() not in _INTEGER_PIXELS + (sitk.sitkFloat32, sitk.sitkFloat64):
        raise InputError(f"{where}: pixel type {image.GetPixelIDTypeAsString()} is not supported")
    if 0 in image.GetSize():
        raise InputError(f"{where}: volume is empty (size {tuple(image.GetSize())})")
    lo, hi, n_bad = _finite_stats(sitk.GetArrayViewFromImage(image))
    if lo is None or hi is None or hi <= lo:
        what = "has no finite voxels" if lo is None else f"every voxel is {lo:g}"
        raise InputError(f"{where}: volume is empty/constant ({what}); nothing to segment")
    warnings: list[str] = []
    if n_bad:
        warnings.append(
            f"{n_bad} voxel(s) are NaN or infinite; they are shown as the window minimum"
        )
        log.warning("%s: %s", where, warnings[-1])
    if not modality:
        modality = _guess_modality(image, lo)
    return Volume(image=image, path=path, modality=modality, warnings=warnings, metadata=dict(metadata or {}))


def _as_3d(image: SimpleITK.Image, where: str) -> SimpleITK.Image:
    import SimpleITK as sitk

    size = tuple(int(s) for s in image.GetSize())
    dim = image.GetDimension()
    if dim == 4:
        if size[3] != 1:
            raise InputError(
                f"{where} is 4D with shape {size} (x, y, z, t); only 3D volumes are supported "
                "(a 4th dimension of size 1 is accepted). Extract one volume first."
            )
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
        size = size[:3]
    elif dim != 3:
        if dim == 2:
            raise InputError(f"{where} is a 2D image; use `medreasoner ground` for 2D images")
        raise InputError(f"{where} has {dim} dimensions {size}; only 3D volumes are supported")
    if 0 not in size and 1 in size:
        raise InputError(
            f"{where} is a 2D image (a single slice, size {size}); use `medreasoner ground` for 2D images"
        )
    return image


def _read_file(p: Path) -> tuple[SimpleITK.Image, str, dict[str, Any]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise InputError(f"volume file is empty (0 bytes): {p}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    hint = f"supported: {', '.join(VOLUME_FILE_SUFFIXES)} files or a DICOM series folder"
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as a volume: not a recognised or intact image file ({hint})") \
            from exc
    # Check the shape before loading the voxels: a large 4D file is refused without reading it.
    dim, size = reader.GetDimension(), tuple(int(s) for s in reader.GetSize())
    if dim == 2 or (dim >= 3 and 1 in size[:3] and 0 not in size):
        hint = ""
        if reader.HasMetaDataKey("0008|0060") or p.suffix.lower() in (".dcm", ".dicom", ".ima"):
            hint = " (for a DICOM series, give the folder that holds its files)"
        raise InputError(f"{p} is a 2D image; use `medreasoner ground` for 2D images{hint}")
    if dim > 4 or (dim == 4 and size[3] != 1):
        raise InputError(
            f"{p} is {dim}D with shape {size}; only 3D volumes are supported "
            "(a 4th dimension of size 1 is accepted). Extract one volume first."
        )
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{p} has {reader.GetNumberOfComponents()} values per voxel (vector/RGB pixels); "
            "give a scalar (grey-level) volume"
        )
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({_first_line(exc)})") from exc
    if p.name.lower().endswith((".nii", ".nii.gz")):
        image = _check_nifti_data(p, image)
    modality = ""
    if image.HasMetaDataKey("0008|0060"):  # a single (multi-frame) DICOM file
        modality = image.GetMetaData("0008|0060").strip().upper()
    return image, modality, {"format": _format_name(p, image)}


def _check_nifti_data(p: Path, image: SimpleITK.Image) -> SimpleITK.Image:
    """Catch what ITK's NIfTI reader lets through: truncated voxel data (read as zeros without an error)
    and NaN/inf voxels (silently set to 0). Non-finite voxels are put back so they are reported."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        proxy = nib.load(str(p)).dataobj  # (image.header has vox_offset reset to 0; the proxy has it)
        dtype = np.dtype(proxy.dtype)
        offset = int(proxy.offset)
        expected = offset + int(np.prod(proxy.shape, dtype=np.int64)) * dtype.itemsize
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds; ITK may accept a cut-off header
        raise InputError(f"cannot read {p}: the NIfTI header is damaged or truncated ({exc})") from exc
    gz = p.name.lower().endswith(".gz")
    floating = dtype.kind == "f"
    if not floating:
        if not gz:
            got = p.stat().st_size
        else:
            with p.open("rb") as f:  # gzip trailer: uncompressed size mod 2**32
                f.seek(-4, os.SEEK_END)
                isize = int.from_bytes(f.read(4), "little")
            got = expected if isize == expected % 2**32 else None
        if got is not None:
            if got < expected:
                raise InputError(f"cannot read {p}: the file is truncated ({got - offset} of "
                                 f"{expected - offset} bytes of voxel data)")
            return image
    # Stream the voxel data once: count the bytes, and (float data) find the non-finite voxels.
    bad: list[np.ndarray] = []
    bad_values: list[np.ndarray] = []
    got = offset
    chunk = max(dtype.itemsize, (4 << 20) // dtype.itemsize * dtype.itemsize)
    try:
        with (gzip.open(p, "rb") if gz else p.open("rb")) as f:
            f.seek(offset)
            while got < expected:
                block = f.read(min(chunk, expected - got))
                if not block:
                    break
                if floating:
                    values = np.frombuffer(block[: len(block) // dtype.itemsize * dtype.itemsize], dtype)
                    idx = np.flatnonzero(~np.isfinite(values))
                    if idx.size:
                        bad.append(idx + (got - offset) // dtype.itemsize)
                        bad_values.append(values[idx])
                got += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read {p}: the file is damaged or truncated ({exc})") from exc
    if got < expected:
        raise InputError(f"cannot read {p}: the file is truncated ({got - offset} of "
                         f"{expected - offset} bytes of voxel data)")
    if not bad:
        return image
    import SimpleITK as sitk

    where = np.concatenate(bad)
    arr = sitk.GetArrayFromImage(image)
    flat = arr.reshape(-1)
    if not np.issubdtype(flat.dtype, np.floating) or where[-1] >= flat.size:
        return image
    flat[where] = np.concatenate(bad_values)  # NaN stays NaN, inf stays inf whatever the scaling
    restored = sitk.GetImageFromArray(arr)
    restored.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        restored.SetMetaData(key, image.GetMetaData(key))
    return restored


def _format_name(p: Path, image: SimpleITK.Image) -> str:
    name = p.name.lower()
    for suffixes, fmt in (((".nii", ".nii.gz"), "NIfTI"), ((".nrrd", ".nhdr"), "NRRD"),
                          ((".mha", ".mhd"), "MetaImage"), ((".dcm", ".dicom", ".ima"), "DICOM")):
        if name.endswith(suffixes):
            return fmt
    if image.HasMetaDataKey("ITK_InputFilterName"):
        return image.GetMetaData("ITK_InputFilterName").replace("ImageIO", "")
    return p.suffix.lstrip(".").upper()


def _read_dicom_folder(folder: Path) -> tuple[SimpleITK.Image, str, dict[str, Any]]:
    import SimpleITK as sitk

    try:
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"cannot scan {folder} for DICOM files: {_first_line(exc)}") from exc
    if not series_ids:
        raise InputError(
            f"{folder} is a folder with no DICOM series in it (sub-folders are not searched); "
            "give a DICOM series folder or a volume file"
        )
    files = {sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in series_ids}
    chosen = max(series_ids, key=lambda s: (len(files[s]), s))
    if len(series_ids) > 1:
        others = ", ".join(f"{s} ({len(files[s])} files)" for s in series_ids if s != chosen)
        log.info("%s holds %d DICOM series; reading %s (%d files), the one with most files; skipped: %s",
                 folder, len(series_ids), chosen, len(files[chosen]), others)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series {chosen} in {folder}: {_first_line(exc)}") from exc

    def tag(key: str) -> str:
        try:
            return reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else ""
        except RuntimeError:
            return ""

    meta = {
        "format": "DICOM series",
        "series_uid": chosen,
        "series_description": tag("0008|103e"),
        "n_files": len(files[chosen]),
        "n_series_in_folder": len(series_ids),
    }
    return image, tag("0008|0060").upper(), meta


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "rror" in ln] or lines
    return useful[-1][:300] if useful else type(exc).__name__


def _slabs(arr: np.ndarray) -> Iterable[np.ndarray]:
    step = max(1, _SLAB_VOXELS // max(1, arr[0].size)) if arr.ndim >= 1 and arr.shape[0] else 1
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def _finite_stats(arr: np.ndarray) -> tuple[float | None, float | None, int]:
    """(min, max) of the finite voxels (None if there are none) and the count of NaN/inf voxels."""
    lo, hi, bad = math.inf, -math.inf, 0
    floating = np.issubdtype(arr.dtype, np.floating)
    for slab in _slabs(arr):
        if floating:
            finite = np.isfinite(slab)
            n_fin = int(finite.sum())
            bad += slab.size - n_fin
            if n_fin == 0:
                continue
            if n_fin != slab.size:
                slab = slab[finite]
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
    if lo == math.inf:
        return None, None, bad
    return lo, hi, bad


def _guess_modality(image: SimpleITK.Image, low: float) -> str:
    """CT if the data holds HU-like air values (<= -500), MR if it is non-negative, else unknown."""
    integer = image.GetPixelID() in _INTEGER_PIXELS
    if low <= -500 and (integer or low >= -3100):  # float CT from scaled NIfTI: air -1000, padding -3024
        return "CT"
    if low >= 0:
        return "MR"
    return ""


# --------------------------------------------------------------------------------------------- display


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


# ------------------------------------------------------------------------------------------- intensity


def window_for_query(query: str) -> str:
    """Name of the CT window preset the query's keywords point to (``abdomen`` when none matches)."""
    text = (query or "").lower()
    for preset, stems in _KEYWORD_WINDOWS:
        pattern = r"\b(?:" + "|".join(re.escape(s) + (r"\b" if s in ("rib", "ribs") else "") for s in stems) + ")"
        if re.search(pattern, text):
            return preset
    return "abdomen"


def choose_window(volume: Volume, query: str = "", window: str | Window | tuple | None = None) -> Window | None:
    """The intensity window for this volume: the user's choice, a CT preset by query keywords, or None.

    None means percentile scaling (MR and volumes of unknown modality).
    """
    if window is not None:
        return parse_window(window)
    if volume.modality.upper() == "CT":
        return WINDOW_PRESETS[window_for_query(query)]
    return None


def intensity_range(volume: Volume, window: Window | None) -> tuple[float, float]:
    """(low, high) display range: the window's, or the 0.5/99.5 percentiles of non-zero finite voxels."""
    if window is not None:
        return float(window.low), float(window.high)
    arr = volume.array
    if arr.size > _SAMPLE_VOXELS:
        step = math.ceil((arr.size / _SAMPLE_VOXELS) ** (1.0 / 3.0))
        arr = arr[::step, ::step, ::step]
    values = np.asarray(arr)
    keep = values != 0
    if np.issubdtype(values.dtype, np.floating):
        keep &= np.isfinite(values)
    sample = values[keep]
    if sample.size == 0:
        lo, hi, _ = _finite_stats(values)
        return (0.0, 0.0) if lo is None or hi is None else (lo, hi)
    lo, hi = (float(v) for v in np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return lo, hi


def slice_to_rgb(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """(rows, cols, 3) uint8 of one slice scaled so low -> 0 and high -> 255; NaN/inf -> low."""
    values = np.asarray(raw, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {values.shape}")
    if not np.isfinite(values).all():
        values = np.where(np.isfinite(values), values, np.float32(low))
    grey = _scale(values, float(low), float(high))
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))


# ---------------------------------------------------------------------------------------------- writing


def _segmentation_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SEGMENTATION_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputError(f"cannot tell the segmentation format of {path}; name it *{', *'.join(SEGMENTATION_SUFFIXES)}")


def _slicer_fields(mask: np.ndarray, name: str, color: tuple[float, float, float]) -> dict[str, str]:
    """3D Slicer segmentation metadata for one segment (label 1, layer 0) in a labelmap (z, y, x)."""
    nz, ny, nx = mask.shape
    extent = [0, nx - 1, 0, ny - 1, 0, nz - 1]
    if mask.any():
        extent = []
        for axis in (2, 1, 0):  # x, y, z
            other = tuple(a for a in range(3) if a != axis)
            hit = np.flatnonzero(mask.any(axis=other))
            extent += [int(hit[0]), int(hit[-1])]
    clean = re.sub(r"[\x00-\x1f\x7f]+", " ", name).strip() or "target"
    return {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_SourceRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segment0_ID": "Segment_1",
        "Segment0_Name": clean,
        "Segment0_NameAutoGenerated": "0",
        "Segment0_Color": " ".join(f"{c:g}" for c in color),
        "Segment0_ColorAutoGenerated": "0",
        "Segment0_LabelValue": "1",
        "Segment0_Layer": "0",
        "Segment0_Extent": " ".join(str(v) for v in extent),
        "Segment0_Tags": "|",
    }


def write_segmentation(mask: SimpleITK.Image, path: str | os.PathLike, *, name: str = "target",
                       color: tuple[float, float, float] = (1.0, 0.0, 0.0),
                       inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a binary mask as a uint8 labelmap; the format follows the suffix.

    ``.seg.nrrd`` gets the header fields 3D Slicer reads as a segmentation with one segment named
    ``name``; ``.nii``/``.nii.gz``/``.nrrd``/``.mha`` are plain labelmaps. The file appears atomically
    (temporary file in the same folder, then rename) and never over one of ``inputs``.
    """
    import SimpleITK as sitk

    out = Path(path)
    suffix = _segmentation_suffix(out)
    guard_outputs([out], [Path(p) for p in inputs if p])
    if not isinstance(mask, sitk.Image):
        raise InputError(f"mask must be a SimpleITK image (use DisplayStack.to_volume_mask), got {type(mask)}")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("mask must have one value per voxel")
    try:
        rgb = tuple(float(c) for c in color)
    except (TypeError, ValueError) as exc:
        raise InputError(f"color must be three numbers 0..1, got {color!r}") from exc
    if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
        raise InputError(f"color must be three numbers 0..1, got {color!r}")
    labels = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    labels.CopyInformation(mask)
    for key in labels.GetMetaDataKeys():
        labels.EraseMetaData(key)
    if suffix == ".seg.nrrd":
        if labels.GetDimension() != 3:
            raise InputError(f".seg.nrrd needs a 3D mask, got {labels.GetDimension()}D")
        for key, value in _slicer_fields(sitk.GetArrayViewFromImage(labels), name, rgb).items():
            labels.SetMetaData(key, value)

    def write(tmp: str) -> None:
        try:
            sitk.WriteImage(labels, tmp, True)
        except RuntimeError as exc:
            raise OSError(f"could not write {out}: {_first_line(exc)}") from exc

    return atomic_write_with(out, write, suffix=f".tmp{suffix}")
