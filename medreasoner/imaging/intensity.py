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


# A decimal number as a person types it: 40, -600, .5, 1e5, +40 (not "1.2.3" or ".").
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?"
_CENTER_WIDTH = re.compile(rf"\s*({_NUMBER})\s*[,/: ]\s*({_NUMBER})\s*")


def _unknown_window(window: str) -> InputError:
    return InputError(f"unknown window {window!r}; use one of {', '.join(WINDOW_PRESETS)} or 'center,width'")


def parse_window(window: str | Window | tuple | list) -> Window:
    """A preset name, 'center,width', a Window or (center, width) -> a checked Window."""
    if isinstance(window, Window):
        w = window
    elif isinstance(window, str):
        key = window.strip().lower()
        if key in WINDOW_PRESETS:
            return WINDOW_PRESETS[key]
        numbers = _CENTER_WIDTH.fullmatch(key)
        if numbers is None:
            raise _unknown_window(window)
        try:  # the pattern admits only numbers float() reads; kept so a slip cannot crash the CLI
            w = Window(float(numbers.group(1)), float(numbers.group(2)))
        except ValueError as exc:
            raise _unknown_window(window) from exc
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
        raise InputError(f"window width must be a positive number (center {w.center:g}, width {w.width:g})")
    return w


def check_window_shows_data(window: Window, low: float | None, high: float | None, where: str = "") -> None:
    """Refuse a window under which every pixel/voxel of data spanning ``low..high`` (its finite range)
    gets the same grey level: the model would see a blank picture. The mapping is monotone, so the two
    ends of the range decide. Shared by 2D (``image_from_array``) and 3D callers."""
    if low is None or high is None:
        return  # no finite values: the blank check refuses that with its own words
    ends = _scale(np.array([low, high], np.float64), window.low, window.high)
    if ends[0] != ends[1]:
        return
    if high <= window.low or low >= window.high:
        how = "lies outside"
    else:
        how = "is too wide for"
    prefix = f"{where}: " if where else ""
    raise InputError(f"{prefix}window {window.center:g}\u00b1{window.width / 2:g} {how} the data range "
                     f"{low:g}..{high:g}; every pixel would be the same (grey {int(ends[0])}); "
                     "choose a window inside the data range")


def fill_nonfinite(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """NaN/inf replaced as a viewer shows them: NaN and -inf as ``low``, +inf as ``high``."""
    return np.nan_to_num(values, nan=low, posinf=high, neginf=low)


def nonfinite_warning(n_bad: int, unit: str = "pixel") -> str:
    """The note recorded when ``n_bad`` values are NaN or infinite (shown as ``fill_nonfinite`` does)."""
    return (f"{n_bad} {unit}(s) are NaN or infinite; NaN and -inf are shown as the window minimum, "
            "+inf as the maximum")


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(values.shape, np.uint8)
    out = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    return np.rint(out).astype(np.uint8)


def scale_to_uint8(values: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, str]:
    """Scale one channel to uint8 by a window, or by robust percentiles of the finite values;
    NaN/inf as ``fill_nonfinite``."""
    values = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(values)
    if window is not None:
        out = _scale(fill_nonfinite(values, window.low, window.high), window.low, window.high)
        return out, f"window center {window.center:g} width {window.width:g}"
    vals = values[finite]
    if vals.size == 0:
        return np.zeros(values.shape, np.uint8), "no finite values: black image"
    lo, hi = np.percentile(vals, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:  # constant image
        return np.full(values.shape, 0, np.uint8), "constant image"
    out = _scale(fill_nonfinite(values, float(lo), float(hi)), float(lo), float(hi))
    return out, f"percentiles {LOW_PERCENTILE}-{HIGH_PERCENTILE} ({lo:g}..{hi:g})"


def integer_colour_to_uint8(colour: np.ndarray, where: str = "image array") -> tuple[np.ndarray, str]:
    """Integer RGB to uint8 without wrapping: 0..255 as 8-bit, up to 65535 as 16-bit (top byte);
    negative or wider values have no colour meaning and are refused."""
    if colour.dtype == np.uint8:
        return colour, "8-bit colour"
    lo, hi = int(colour.min(initial=0)), int(colour.max(initial=0))
    if lo < 0:
        raise InputError(f"{where}: colour pixels are negative (min {lo}); colour channels must be 0..255 "
                         "or 0..65535; save a grey image or rescale the colours")
    if hi > 65535:
        raise InputError(f"{where}: colour pixels exceed 16 bits (max {hi}); colour channels must be 0..255 "
                         "or 0..65535")
    if hi > 255:
        return (colour.astype(np.uint32) >> 8).astype(np.uint8), "16-bit colour to 8-bit"
    return colour.astype(np.uint8), f"{colour.dtype} colour in 0..255 taken as 8-bit"


def to_rgb_uint8(pixels: np.ndarray, window: Window | None = None,
                 where: str = "image array") -> tuple[np.ndarray, str]:
    """Return (H, W, 3) uint8 and a short description of what was done to the intensities
    (``where`` names the input in refusals)."""
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
    if colour.dtype == np.bool_:
        rgb, how = colour.astype(np.uint8) * 255, "binary colour"
    elif np.issubdtype(colour.dtype, np.integer):
        rgb, how = integer_colour_to_uint8(colour, where)
    else:
        f = colour.astype(np.float32)
        fin = f[np.isfinite(f)]
        if fin.size and fin.min() >= 0 and fin.max() <= 1.0:
            rgb, how = np.rint(fill_nonfinite(f, 0.0, 1.0) * 255).astype(np.uint8), "float 0-1 colour"
        else:
            rgb, how = scale_to_uint8(f, window)
            how = "float colour, " + how
    if alpha is not None:
        alpha = fill_nonfinite(alpha.astype(np.float32), 0.0, 1.0) if alpha.dtype.kind == "f" else alpha
        amax = 255.0 if alpha.dtype == np.uint8 else float(max(alpha.max(initial=0), 1))
        w = np.clip(alpha.astype(np.float32)[..., None] / amax, 0.0, 1.0)
        if (w < 1).any():
            rgb, background = composite_alpha(rgb, w)
            how += f", alpha composited on {background}"
            if background == "white":
                how += " (the colour is flat: the picture is only in the alpha, on black it would be blank)"
        else:
            how += ", opaque alpha dropped"
    return np.ascontiguousarray(rgb), how


def composite_alpha(rgb: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, str]:
    """RGB over a background by alpha ``weight`` (0..1, (H, W, 1)) and the background's name. Black, as
    a viewer shows a transparent PNG on a dark canvas; white when on black the picture would be one
    flat colour although the alpha varies (black strokes on transparency), as a viewer on a light
    canvas shows it."""
    f = rgb.astype(np.float32)
    on_black = np.rint(f * weight).astype(np.uint8)
    if (on_black != on_black.flat[0]).any() or weight.min() == weight.max():
        return on_black, "black"
    return np.rint(f * weight + 255.0 * (1.0 - weight)).astype(np.uint8), "white"


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
