"""The pieces of the two volume strategies, as functions of their inputs (no model, no state).

- ``keyslice`` (default): the CRM reads a few candidate slices spread through the body (or one the
  user names); the most confident answer wins and its mask is carried through the volume both
  ways (SAM2's video memory for video-capable ASMs, box tracking for the others) until the
  object ends. CRM calls per volume do not grow with the number of slices.
- ``slicewise``: CRM + ASM on every non-background slice of a range.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medreasoner.errors import InputError
from medreasoner.imaging.geometry import Box

STRATEGIES = ("keyslice", "slicewise")
BACKGROUND_FRACTION = 0.02  # a slice with less foreground than this is skipped as background
MAX_CANDIDATES = 5
MIN_TRACKED_AREA = 10  # propagation stops where the mask falls below this many pixels


def slice_bounds(value: str | tuple | list | None) -> tuple[int | None, int | None] | None:
    """The syntax of a slice range, before the volume is known: 'a:b' (b exclusive, either side
    optional), or a pair (a, b) as request messages send it -> (a or None, b or None); None = all."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, str):
        a, colon, b = value.strip().partition(":")
        if not colon or ":" in b:
            raise InputError(f"slice range must look like 'start:stop' (stop exclusive; 44:45 is the one slice 44), "
                             f"got {value!r}")
        parts = [a, b]
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        parts = list(value)
    else:
        raise InputError(f"slice range must be 'start:stop' or a pair [start, stop], got {value!r}")
    bounds = []
    for part in parts:
        if part is None or (isinstance(part, str) and not part.strip()):
            bounds.append(None)
            continue
        if isinstance(part, bool) or (isinstance(part, float) and not part.is_integer()):
            raise InputError(f"slice range bounds must be whole numbers, got {value!r}")
        try:
            bounds.append(int(part))
        except (TypeError, ValueError) as exc:
            raise InputError(f"slice range bounds must be whole numbers, got {value!r}") from exc
    return bounds[0], bounds[1]


def parse_slice_range(text: str | tuple[int, int] | None, n: int) -> tuple[int, int]:
    """A slice range (see :func:`slice_bounds`) -> checked [a, b) within [0, n)."""
    bounds = slice_bounds(text)
    if bounds is None:
        return 0, n
    lo, hi = 0 if bounds[0] is None else bounds[0], n if bounds[1] is None else bounds[1]
    if not (0 <= lo < hi <= n):
        raise InputError(f"slice range {lo}:{hi} is outside the volume's {n} slices (valid: 0 <= start < stop <= {n})")
    return lo, hi


def foreground_fractions(raw_slice: Callable[[int], np.ndarray], low: float, high: float, indices) -> dict[int, float]:
    """Share of each slice's pixels above the bottom tenth of the display range (body, not air)."""
    thr = low + 0.1 * (high - low)
    out = {}
    for i in indices:
        raw = raw_slice(i)
        out[i] = float(np.count_nonzero(np.nan_to_num(raw, nan=low) > thr)) / raw.size
    return out


def body_slices(fractions: dict[int, float]) -> list[int]:
    return [i for i, f in sorted(fractions.items()) if f >= BACKGROUND_FRACTION]


def candidate_slices(fractions: dict[int, float], n: int) -> list[int]:
    """n slices evenly spread through the body (the span of non-background slices)."""
    body = body_slices(fractions)
    if not body:
        return []
    lo, hi = body[0], body[-1]
    picks = [round(lo + (hi - lo) * (k + 1) / (n + 1)) for k in range(n)]
    return sorted({min(body, key=lambda b, p=p: abs(b - p)) for p in picks})


def largest_component(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Keep the largest 26-connected 3D component of a {slice: mask} stack."""
    if not masks:
        return masks
    from scipy import ndimage

    shape = next(iter(masks.values())).shape
    keys = sorted(masks)
    lo, hi = keys[0], keys[-1] + 1
    block = np.zeros((hi - lo, *shape), bool)
    for k, m in masks.items():
        block[k - lo] = m
    labels, count = ndimage.label(block, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return masks
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = labels == int(np.argmax(sizes))
    return {k: keep[k - lo] for k in keys if keep[k - lo].any()}


def key_confidence(crm_confidence: float | None, asm_score: float | None, mask: np.ndarray | None) -> float:
    """Key-slice choice: CRM sequence probability x the ASM's own mask-quality estimate (-1: no mask)."""
    if mask is None or not mask.any():
        return -1.0
    crm = crm_confidence if crm_confidence is not None else 1.0
    return crm * max(float(asm_score or 0.0), 1e-6)


def grown_box(mask: np.ndarray, shape: tuple[int, int], grow: float = 0.1) -> Box:
    """The mask's tight box (continuous coordinates) grown by ``grow`` of its size on each side."""
    ys, xs = np.nonzero(mask)
    x1, x2, y1, y2 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    gx, gy = max(1.0, (x2 - x1) * grow), max(1.0, (y2 - y1) * grow)
    h, w = shape
    return (max(0.0, x1 - gx), max(0.0, y1 - gy), min(float(w), x2 + gx), min(float(h), y2 + gy))


def track_boxes(segment: Callable[[int, Box], np.ndarray], lo: int, hi: int, key: int, key_mask: np.ndarray,
                check_cancelled: Callable[[], None], on_step: Callable[[int], None],
                min_area: int = MIN_TRACKED_AREA) -> dict[int, np.ndarray]:
    """Carry ``key_mask`` from slice ``key`` through slices [lo, hi), both ways: each next slice is
    prompted with the previous mask's box grown by 10%; a direction stops where the mask vanishes.
    ``segment(i, box)`` returns slice i's mask."""
    masks = {key: np.asarray(key_mask, bool)}
    for step in (1, -1):
        prev = masks[key]
        i = key + step
        while lo <= i < hi and prev.sum() >= min_area:
            check_cancelled()
            m = segment(i, grown_box(prev, prev.shape))
            if m.sum() < min_area:
                break
            masks[i] = m
            prev = m
            on_step(len(masks) - 1)
            i += step
    return masks


def no_target_reason(asked: list[dict]) -> str:
    if not asked:
        return "no slice has body content to ask the CRM about (empty or background-only range)"
    kinds = sorted({p["status"] for p in asked})
    return (f"the CRM gave no usable box on any of the {len(asked)} slices it read "
            f"(answer status: {', '.join(kinds)}); an empty mask was written")
