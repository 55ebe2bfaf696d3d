"""Bring any 2D image (8/16-bit grey, RGB, RGBA, float, HU) to the 8-bit RGB the models expect."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from medreasoner.errors import InputError

# Robust range for images without a known window (MedSAM's recipe for MR and friends).
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

# Elements per slab when statistics of a large array are taken piecewise (bounded temporaries).
_SLAB_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


# CT display windows (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, Window] = {
    "abdomen": Window(40.0, 400.0),
    "lung": Window(-600.0, 1500.0),
    "brain": Window(40.0, 80.0),
    "mediastinum": Window(50.0, 350.0),
    "bone": Window(400.0, 1800.0),
}


def parse_window(window: str | Window | tuple | list) -> Window:
    """A preset name, 'center,width', a Window or (center, width) -> a checked Window."""
    if isinstance(window, Window):
        w = window
    elif isinstance(window, str):
        key = window.strip().lower()
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        numbers = re.fullmatch(r"\s*(-?[\d.]+(?:e-?\d+)?)\s*[,/: ]\s*([\d.]+(?:e-?\d+)?)\s*", key)
        if numbers is None:
            raise InputError(
                f"unknown window {window!r}; use one of {', '.join(WINDOW_PRESETS)} or 'center,width'"
            )
        w = Window(float(numbers.group(1)), float(numbers.group(2)))
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        try:
            w = Window(float(window[0]), float(window[1]))
        except (TypeError, ValueError) as exc:
            raise InputError(f"window {window!r} must be (center, width) numbers") from exc
    else:
        raise InputError(
            f"window must be a preset name ({', '.join(WINDOW_PRESETS)}), a Window or (center, width); "
            f"got {window!r}"
        )
    if not (math.isfinite(w.center) and math.isfinite(w.width)) or w.width <= 0:
        raise InputError(f"window width must be a positive number (center {w.center}, width {w.width})")
    return w


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, np.uint8)
    out = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    return np.rint(out).astype(np.uint8)


def scale_to_uint8(values: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, str]:
    """Scale one channel to uint8 by a window, or by robust percentiles of the finite values."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, np.nan)
    if window is not None:
        out = _scale(np.nan_to_num(values, nan=window.low), window.low, window.high)
        return out, f"window center {window.center:g} width {window.width:g}"
    vals = values[finite]
    if vals.size == 0:
        return np.zeros(values.shape, np.uint8), "no finite values: black image"
    lo, hi = np.percentile(vals, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:  # constant image
        return np.full(values.shape, 0, np.uint8), "constant image"
    out = _scale(np.nan_to_num(values, nan=lo), float(lo), float(hi))
    return out, f"percentiles {LOW_PERCENTILE}-{HIGH_PERCENTILE} ({lo:g}..{hi:g})"


def to_rgb_uint8(pixels: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, str]:
    """Return (H, W, 3) uint8 and a short description of what was done to the intensities."""
    a = np.asarray(pixels)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        if a.dtype == np.bool_:
            g, how = a.astype(np.uint8) * 255, "binary"
        elif a.dtype == np.uint8 and window is None:
            g, how = a, "8-bit grey"
        else:
            g, how = scale_to_uint8(a, window)
        return np.repeat(g[..., None], 3, axis=2), how
    if a.ndim != 3 or a.shape[-1] not in (2, 3, 4):
        raise ValueError(f"expected a 2D grey or colour image, got array of shape {a.shape}")
    colour = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=2)
    alpha = a[..., -1] if a.shape[-1] in (2, 4) else None
    if colour.dtype == np.uint8:
        rgb, how = colour, "8-bit colour"
    elif np.issubdtype(colour.dtype, np.integer) and colour.max(initial=0) > 255:
        rgb, how = (colour.astype(np.uint32) >> 8).astype(np.uint8), "16-bit colour to 8-bit"
    elif np.issubdtype(colour.dtype, np.integer):
        rgb, how = colour.astype(np.uint8), "8-bit colour"
    else:
        f = colour.astype(np.float32)
        fin = f[np.isfinite(f)]
        if fin.size and fin.min() >= 0 and fin.max() <= 1.0:
            rgb, how = np.rint(np.nan_to_num(f) * 255).astype(np.uint8), "float 0-1 colour"
        else:
            rgb, how = scale_to_uint8(f, window)
            how = "float colour, " + how
    if alpha is not None:
        amax = 255.0 if alpha.dtype == np.uint8 else float(max(alpha.max(initial=0), 1))
        w = alpha.astype(np.float32)[..., None] / amax
        if (w < 1).any():  # composite on black: what a viewer shows for a transparent PNG
            rgb = np.rint(rgb.astype(np.float32) * w).astype(np.uint8)
            how += ", alpha composited on black"
        else:
            how += ", opaque alpha dropped"
    return np.ascontiguousarray(rgb), how


# ----------------------------------------------------------------------------------- degenerate inputs


def _slabs(arr: np.ndarray) -> Iterable[np.ndarray]:
    step = max(1, _SLAB_ELEMENTS // max(1, arr[0].size)) if arr.ndim >= 1 and arr.shape[0] else 1
    for start in range(0, arr.shape[0], step):
        yield arr[start:start + step]


def finite_range(arr: np.ndarray) -> tuple[float | None, float | None, int]:
    """(min, max) of the finite values (None if there are none) and the count of NaN/inf values,
    taken slab by slab so a large volume needs no full-size temporary."""
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


def check_not_blank(arr: np.ndarray, where: str, kind: str = "volume",
                    channels_last: bool = False) -> tuple[float | None, float | None, int]:
    """Refuse an all-NaN or constant (e.g. all-zero) image or volume: a model sees a blank picture and
    any "answer" would be invented. One check for 2D and 3D so both refuse the same data alike.

    ``kind`` is "volume" (voxels) or "image" (pixels); with ``channels_last`` each colour channel is
    judged on its own (one flat colour is blank, a varying alpha is not). Returns ``finite_range``.
    """
    unit = "voxel" if kind == "volume" else "pixel"
    planes = [arr[..., c] for c in range(arr.shape[-1])] if channels_last else [arr]
    ranges = [finite_range(a) for a in planes]
    if all(lo is None or hi is None or hi <= lo for lo, hi, _ in ranges):
        values = [lo for lo, _, _ in ranges]
        if all(v is None for v in values):
            what = f"has no finite {unit}s: every {unit} is NaN or infinite"
        elif len(values) == 1:
            what = f"every {unit} is {values[0]:g}"
        else:
            what = f"every {unit} has the same value ({', '.join('NaN' if v is None else f'{v:g}' for v in values)})"
        raise InputError(f"{where}: {kind} is empty/constant ({what}); nothing to segment")
    los = [lo for lo, _, _ in ranges if lo is not None]
    his = [hi for _, hi, _ in ranges if hi is not None]
    return min(los), max(his), sum(bad for _, _, bad in ranges)
