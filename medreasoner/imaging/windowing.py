"""The display window policy: which intensity range a volume is shown in, and slices as 8-bit RGB.

CT: the user's window, else a preset chosen from the question's keywords (lung, brain, bone,
mediastinum, abdomen). MR and unknown modalities: the 0.5-99.5 percentiles of non-zero voxels.
The inference path and the training-data builder both window through here.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

from medreasoner.imaging.intensity import (
    HIGH_PERCENTILE,
    LOW_PERCENTILE,
    WINDOW_PRESETS,
    Window,
    _scale,
    check_window_shows_data,
    fill_nonfinite,
    finite_range,
    parse_window,
)

if TYPE_CHECKING:  # pragma: no cover
    from medreasoner.io.volumes import Volume
    pass



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
    from medreasoner.io.volumes import _SAMPLE_VOXELS, _finite_stats

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


def check_volume_window(volume: Volume, window: Window | None) -> None:
    """Refuse a window under which every voxel of ``volume`` would show as one grey level (the same
    rule and words as 2D, ``check_window_shows_data``); None (percentiles) always shows the data.
    Uses the range the reader found; reads the volume once, slab by slab, only without one."""
    if window is None:
        return
    lo, hi = volume.value_range if volume.value_range is not None else finite_range(volume.array)[:2]
    check_window_shows_data(window, lo, hi, volume.path or "volume")


def slice_to_rgb(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """(rows, cols, 3) uint8 of one slice scaled so low -> 0 and high -> 255; NaN/-inf -> low, +inf ->
    high (as 2D images, and as a viewer shows them)."""
    values = np.asarray(raw, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {values.shape}")
    if not np.isfinite(values).all():
        values = fill_nonfinite(values, np.float32(low), np.float32(high))
    grey = _scale(values, float(low), float(high))
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
