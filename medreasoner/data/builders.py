"""Build U-MRG samples from your own labelled data: 2D images + masks, or volumes + label maps.

Volume slices go through exactly the inference path (``read_volume`` -> ``display_stack`` ->
``choose_window`` / ``intensity_range`` -> ``slice_to_rgb``), so a CRM trained on them sees the same
orientation and intensities as at inference: radiological display, patient's left on the image's right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medreasoner.constants import VOLUME_SUFFIXES
from medreasoner.data.samples import Sample, _checked, _read_records, _records_to_samples
from medreasoner.errors import InputError
from medreasoner.imaging.display import AXES
from medreasoner.science.keypoints import ground_truth_from_mask

if TYPE_CHECKING:  # pragma: no cover
    from medreasoner.engine.events import Events
    from medreasoner.imaging.intensity import Window
    from medreasoner.io.volumes import Volume

# The old builder's RAS voxel axes 0/1/2, still accepted as names for the display axes.
_INT_AXES = {0: "sagittal", 1: "coronal", 2: "axial"}
# Grid tolerance: spacing/origin differences up to this fraction of the smallest voxel side, direction
# cosines up to this much; float32 round-off in headers passes, a shifted or resampled grid does not.
_GRID_TOL = 1e-3


def samples_from_2d(images_dir: str | Path, masks_dir: str | Path, queries_file: str | Path, *,
                    data_source: str = "umrg") -> list[Sample]:
    """Samples from labelled 2D images; the ground truth is always derived from the masks.

    ``queries_file`` (.jsonl, or .json holding a list) has records ``{"image": "name.png",
    "query": "...", optional "mask", "id", "supercategory", "category"}``; names are relative to
    ``images_dir`` / ``masks_dir``, and without "mask" the mask is the file with the image's stem.
    Nothing is skipped: a record whose image or mask is missing, or whose mask is empty, is an error.
    """
    images, masks, qfile = Path(images_dir).expanduser(), Path(masks_dir).expanduser(), Path(queries_file).expanduser()
    for what, d in (("images", images), ("masks", masks)):
        if not d.is_dir():
            raise InputError(f"{what} folder not found: {d}")
    if not qfile.is_file():
        raise InputError(f"queries file not found: {qfile}")
    records = _read_records(qfile)
    stream = _records_to_samples(records, qfile, images, masks, require_mask=True, gt_from_mask=True,
                                 data_source=data_source)
    return list(_checked(stream, str(qfile), None))


def samples_from_volumes(pairs: Sequence[tuple[str | Path, str | Path]], label_queries: Mapping[int, Mapping[str, str]],
                         axis: str | int = "axial", min_area: int = 20, every: int = 1, *,
                         window: str | Window | tuple[float, float] | None = None, data_source: str = "umrg",
                         events: Events | None = None) -> list[Sample]:
    """2D samples from (volume, label map) pairs: one per display slice and label with enough pixels.

    Volumes and label maps are read with ``read_volume`` (NIfTI, NRRD, MHA/MHD files or DICOM series
    folders); the label map must be on the volume's grid (size, spacing, origin, direction). Slices are
    the display slices inference uses (``display_stack(volume, axis)``, radiological orientation) and
    are windowed as inference would for the label's query: ``window`` None picks a CT preset from the
    query's keywords (percentiles for MR / unknown modality); a preset name, "center,width" or a
    ``Window`` applies to every label. ``axis`` is "axial", "coronal" or "sagittal" (the old 0/1/2
    mean sagittal/coronal/axial). For each label in ``label_queries`` (``{label: {"query",
    "supercategory", "category"}}``) the slices with at least ``min_area`` pixels of it are kept, then
    every ``every``-th of those. Ids are ``{volume_stem}_{label}_{axis}{display_index:04d}``; each
    sample's ``metadata`` records the axis, display / volume slice index and the window used.
    ``events`` gets ``progress(Stage.READ, volumes done, volumes)`` and may cancel between volumes.
    """
    from medreasoner.engine.events import NO_EVENTS, Stage
    from medreasoner.imaging.display import display_stack
    from medreasoner.imaging.intensity import parse_window
    from medreasoner.imaging.windowing import choose_window, intensity_range, slice_to_rgb
    from medreasoner.io.volumes import read_volume

    axis = _check_axis(axis)
    for name, value in (("min_area", min_area), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
    fixed = None if window is None else parse_window(window)  # a bad window fails before any reading
    labels = _check_label_queries(label_queries)
    pairs = [(Path(v).expanduser(), Path(lab).expanduser()) for v, lab in pairs]
    if not pairs:
        raise InputError("no (volume, label map) pairs given")
    stems: dict[str, Path] = {}
    for v, lab in pairs:
        for what, p in (("volume", v), ("label map", lab)):
            if not p.exists():
                raise InputError(f"{what} not found: {p}")
        stem = _volume_stem(v)
        if stem in stems:
            raise InputError(f"volumes {stems[stem]} and {v} are both named {stem!r}: sample ids would collide")
        stems[stem] = v
    events = events or NO_EVENTS

    samples: list[Sample] = []
    events.progress(Stage.READ, 0, len(pairs))
    for done, (vpath, lpath) in enumerate(pairs, 1):
        events.check_cancelled("build-dataset")
        volume, labelmap = read_volume(vpath), read_volume(lpath)
        _check_same_grid(volume, labelmap, vpath, lpath)
        # Within the tolerance the grids are one grid: share the volume's exact geometry so both display
        # stacks pick the same axis permutation and flips, even for near-tie oblique directions.
        labelmap.image.CopyInformation(volume.image)
        for w in volume.warnings:
            events.log(f"{vpath}: {w}", "warning")
        stack, label_stack = display_stack(volume, axis), display_stack(labelmap, axis)
        counts = _label_counts(label_stack, list(labels))
        ranges: dict[Window | None, tuple[float, float]] = {}  # percentiles are computed once per volume
        stem = _volume_stem(vpath)
        for row, (label, info) in enumerate(labels.items()):
            kept = np.flatnonzero(counts[row] >= min_area)[::every]
            if not kept.size:
                continue
            win = choose_window(volume, info["query"], fixed)
            if win not in ranges:
                ranges[win] = intensity_range(volume, win)
            low, high = ranges[win]
            for i in (int(k) for k in kept):
                mask = _label_values(label_stack.raw(i)) == label
                samples.append(Sample(
                    id=f"{stem}_{label}_{axis}{i:04d}",
                    image=slice_to_rgb(stack.raw(i), low, high),
                    mask=mask,
                    query=info["query"],
                    ground_truth=ground_truth_from_mask(mask),
                    supercategory=info.get("supercategory", ""),
                    category=info.get("category", ""),
                    data_source=data_source,
                    source=str(vpath),
                    metadata={
                        "axis": axis, "slice_index": i, "volume_slice_index": stack.index_in_volume(i),
                        "num_slices": len(stack), "label": label, "modality": volume.modality,
                        "window_low": float(low), "window_high": float(high),
                        "window": None if win is None else [win.center, win.width],
                        "window_policy": "user" if fixed is not None else (
                            "query keywords (CT)" if win is not None else "0.5-99.5 percentiles"),
                    },
                ))
        events.progress(Stage.READ, done, len(pairs))
    if not samples:
        raise InputError(
            f"no {axis} slice has >= {min_area} pixels of any label in {sorted(labels)}; "
            "check the label numbers and min_area"
        )
    return samples


# --- volumes ---------------------------------------------------------------------------------------
def _check_axis(axis: str | int) -> str:
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and int(axis) in _INT_AXES:
        return _INT_AXES[int(axis)]
    if isinstance(axis, str):
        name = axis.strip().lower()
        if name in AXES:
            return name
        if name.isdigit() and int(name) in _INT_AXES:
            return _INT_AXES[int(name)]
    raise InputError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)} (or 0/1/2 for sagittal/coronal/axial)")


def _check_label_queries(label_queries: Mapping[int, Mapping[str, str]]) -> dict[int, Mapping[str, str]]:
    if not isinstance(label_queries, Mapping) or not label_queries:
        raise InputError("label_queries must map label numbers to {'query': ..., 'supercategory': ..., 'category': ...}")
    out = {}
    for label, info in label_queries.items():
        try:
            number = int(label)
        except (TypeError, ValueError) as exc:
            raise InputError(f"label {label!r} is not a whole number") from exc
        if number == 0:
            raise InputError("label 0 is background; give the numbers of the structures to slice")
        if not isinstance(info, Mapping) or not isinstance(info.get("query"), str) or not info["query"].strip():
            raise InputError(f"label {label!r} needs a non-empty 'query'")
        out[number] = info
    return dict(sorted(out.items()))


def _volume_stem(path: Path) -> str:
    """File name without its volume suffix (``ct.nii.gz`` -> ``ct``); a DICOM folder's own name."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):  # .nii.gz before .nii / .gz
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else path.stem


def _check_same_grid(volume: Volume, labelmap: Volume, vpath: Path, lpath: Path) -> None:
    """Refuse a label map that is not on the volume's voxel grid (it would not line up slice by slice)."""
    a, b = volume.image, labelmap.image
    voxel = min(a.GetSpacing())
    checks = (("size", a.GetSize(), b.GetSize(), 0.0),
              ("spacing", a.GetSpacing(), b.GetSpacing(), _GRID_TOL * voxel),
              ("origin", a.GetOrigin(), b.GetOrigin(), _GRID_TOL * voxel),
              ("direction", a.GetDirection(), b.GetDirection(), _GRID_TOL))
    for name, want, got, tol in checks:
        if len(want) != len(got) or float(np.max(np.abs(np.subtract(want, got)))) > tol:
            raise InputError(
                f"label map {lpath} is not on the grid of {vpath}: {name} {_fmt(got)} vs {_fmt(want)}; "
                "resample the label map onto the volume first"
            )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def _label_values(raw: np.ndarray) -> np.ndarray:
    """A label slice as whole numbers (float label maps are rounded; NaN counts as background)."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw
    return np.rint(np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0))


def _label_counts(label_stack, labels: list[int]) -> np.ndarray:
    """(labels, slices) pixel counts, read from the same display slices the masks come from."""
    counts = np.zeros((len(labels), len(label_stack)), dtype=np.int64)
    for i in range(len(label_stack)):
        values = _label_values(label_stack.raw(i))
        for row, label in enumerate(labels):
            counts[row, i] = np.count_nonzero(values == label)
    return counts
