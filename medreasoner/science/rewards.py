"""MedReasoner's GRPO rewards, as pure functions of (completion, ground truth).

``score(completion, ground_truth, mode)`` returns every component and ``total``. Modes:

- ``soft`` (the released model): format_think + format_answer + bbox_iou + points_dice (max 4);
- ``hard``: the four soft terms + bbox_align + bbox_scale + points_align + points_angle (max 8);
- ``base_reference``: the reference release's Seg-Zero-style binary reward exactly, *bugs included*:
  its IoU and box-L1 terms call ``.strip()`` on the already decoded ground-truth dict, raise, and
  are therefore always 0; its JSON is decoded without the quote swap, so the single-quoted answer
  its own prompt asks for fails the JSON, IoU, L1 and points checks (max 3 in practice, 5 nominal);
- ``base``: the same reward with exactly those two bugs corrected (IoU and L1 read the ground-truth
  box; the object is decoded after swapping quotes like the other modes); max 5.

``ground_truth`` is ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [[x, y], [x, y]]}`` (a dict or its JSON
text) in the pixel space of the image the model saw.

Soft and hard reproduce the reference's numbers in every case, degenerate ones included: the same
validity rules (booleans count as numbers, NaN and infinities are accepted), the same epsilons, the
same floating-point operation order, the final rounding to 4 decimals, and the same all-or-nothing
failure per block (any error inside the box block zeroes every box term of that mode, likewise for
points). Where the reference computes NaN (non-finite coordinates), so does this module; TRL's
trainer sums reward functions with ``nansum``, so such a component then contributes 0.

Parsing here is deliberately the reference's, not ``medreasoner.models.answer``'s tolerant one: the
reward must score the format exactly as training did. Values are used as decoded (no float
conversion): Python's int/float arithmetic and ``max``/``min`` with NaN then behave as they did there.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from medreasoner.imaging.geometry import disc_from_diameter, lens_area

SOFT_KEYS = ("format_think", "format_answer", "bbox_iou", "points_dice")
HARD_KEYS = ("bbox_align", "bbox_scale", "points_align", "points_angle")
BASE_KEYS = ("base_format", "base_json", "base_iou", "base_l1", "base_points")
ANSWER_KEYS = ("bbox", "points_1", "points_2")
MODES = ("soft", "hard", "base", "base_reference")

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BASE_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)  # used with fullmatch
_FIRST_OBJECT = re.compile(r"{[^}]+}")  # base modes: first brace pair anywhere in the text

_KEEP = 0.7  # share of a term kept whatever its validity factors say
_REST = 1 - _KEEP  # 0.30000000000000004, written as the reference computes it


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; choose one of {', '.join(MODES)}")


# --- shaping and validity factors (operation order kept: it decides the last bit, then the rounding) ---
def slog(v: float) -> float:
    """ln(3v + 1) / ln 4, mapped onto [0.1, 1] for v in [0, 1] (not clipped; raises for v < -1/3)."""
    return math.log(3.0 * v + 1) / math.log(4.0) * 0.9 + 0.1


def sexp(v: float, c: float) -> float:
    """Decreasing sigmoid of an error v in [0, 2] centred on c, rescaled to 1 at v=0 and 0.1 at v=2."""
    raw = 1.0 / (1 + math.exp(3.0 * (v - c)))
    low = 1.0 / (1 + math.exp(3.0 * (2 - c)))
    high = 1.0 / (1 + math.exp(3.0 * (0 - c)))
    return (raw - low) / (high - low + 1e-8) * 0.9 + 0.1


def penalize(r: float, v1: float, v2: float) -> float:
    """70% of the term always, 30% scaled by the mean validity factor; clipped, rounded to 4 places."""
    mean_valid = (v1 + v2) / 2
    return round(min(max(_KEEP * r + _REST * r * mean_valid, 0.0), 1.0), 4)


def _inside(p: Sequence[Any], box: Sequence[Any]) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def position_factor(p1: Sequence[Any], p2: Sequence[Any], box: Sequence[Any]) -> float:
    """1 per point inside the box (edges included), 0.5 per point outside, multiplied."""
    return (1.0 if _inside(p1, box) else 0.5) * (1.0 if _inside(p2, box) else 0.5)


def _clamped_area(box: Sequence[Any]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def area_factor(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """1 when the predicted area is strictly within (0.5, 2) times the GT area, else 0.5."""
    a_pred, a_gt = _clamped_area(pred), _clamped_area(gt)
    return 1.0 if 0.5 * a_gt < a_pred < 2 * a_gt else 0.5


def spread_factor(p1: Sequence[Any], p2: Sequence[Any]) -> float:
    return 1.0 if math.dist(p1, p2) > 10 else 0.5


def _per_gt_diagonal(v: float, gt_box: Sequence[Any]) -> float:
    """An error over the GT box diagonal (+1e-5), clipped to [0, 2]; ``**`` so overflow raises."""
    w, h = gt_box[2] - gt_box[0], gt_box[3] - gt_box[1]
    return max(min(v / (math.sqrt(w**2 + h**2) + 1e-5), 2.0), 0.0)


# --- box terms ------------------------------------------------------------------------------------
def reward_box_iou(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """inter / (union + 1e-5) with negative extents clamped to int 0 (an inverted box has area 0)."""
    iw = max(0, min(pred[2], gt[2]) - max(pred[0], gt[0]))
    ih = max(0, min(pred[3], gt[3]) - max(pred[1], gt[1]))
    inter = iw * ih
    a_pred = max(0, pred[2] - pred[0]) * max(0, pred[3] - pred[1])
    a_gt = max(0, gt[2] - gt[0]) * max(0, gt[3] - gt[1])
    return inter / (a_pred + a_gt - inter + 1e-5)


def box_align_error(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """Mean absolute corner-coordinate difference over the GT diagonal, clipped to [0, 2]."""
    return _per_gt_diagonal(sum(abs(p - g) for p, g in zip(pred, gt)) / 4, gt)


def box_scale_error(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """sqrt(dlog(area)^2 + dlog(aspect)^2) with 1e-6 guards, capped at 1.

    Zero height divides by zero and a negative area or aspect has no log: both raise, which zeroes
    every box term of the hard reward (IoU included), as in the reference.
    """
    wp, hp = pred[2] - pred[0], pred[3] - pred[1]
    wg, hg = gt[2] - gt[0], gt[3] - gt[1]
    d_area = math.log((wp * hp + 1e-6) / (wg * hg + 1e-6))
    d_aspect = math.log((wp / hp + 1e-6) / (wg / hg + 1e-6))
    return min(math.sqrt(d_area**2 + d_aspect**2), 1.0)


# --- point terms ----------------------------------------------------------------------------------
def lens_area_with_tolerance(r1: float, r2: float, d: float) -> float:
    """Disc intersection as the reward computes it: 1e-5 tolerances on 'apart' and 'nested'."""
    if d >= r1 + r2 - 1e-5:
        return 0.0
    if d <= abs(r1 - r2) + 1e-5:
        return math.pi * min(r1, r2) ** 2
    c1 = max(-1.0, min(1.0, (d * d + r1 * r1 - r2 * r2) / (2 * d * r1)))
    c2 = max(-1.0, min(1.0, (d * d + r2 * r2 - r1 * r1) / (2 * d * r2)))
    k = (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    return r1 * r1 * math.acos(c1) + r2 * r2 * math.acos(c2) - 0.5 * math.sqrt(max(0.0, k))


def _disc(p1: Sequence[Any], p2: Sequence[Any]) -> tuple[float, float, float]:
    return (p1[0] + p2[0]) / 2, (p1[1] + p2[1]) / 2, math.dist(p1, p2) / 2 + 1e-5


def reward_disc_overlap(pred: Sequence[Sequence[Any]], gt: Sequence[Sequence[Any]]) -> float:
    """The reward's point overlap: 2I / (A1 + A2 - I + 1e-5) of the discs each pair spans.

    Coincident points give a disc of radius 1e-5, hence an almost-zero (not exactly zero) overlap.
    """
    px, py, pr = _disc(pred[0], pred[1])
    gx, gy, gr = _disc(gt[0], gt[1])
    inter = lens_area_with_tolerance(pr, gr, math.dist((px, py), (gx, gy)))
    union = math.pi * pr**2 + math.pi * gr**2 - inter
    return 2 * inter / (union + 1e-5)


def points_disc_overlap(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    """The evaluation's pDice: 2I / (A1 + A2 - I + 1e-5) for the discs spanned by each pair.

    Note: this is twice the disc IoU, not textbook Dice 2I / (A1 + A2); it can exceed 1. Kept as is
    for the published table (``metrics`` also reports true disc Dice). The reward itself uses
    ``reward_disc_overlap``, which differs only by 1e-5 tolerances at touching and nested discs.
    """
    cx1, cy1, r1 = disc_from_diameter(*pred)
    cx2, cy2, r2 = disc_from_diameter(*gt)
    inter = lens_area(r1, r2, math.hypot(cx1 - cx2, cy1 - cy2))
    a1, a2 = math.pi * r1 * r1, math.pi * r2 * r2
    return 2.0 * inter / (a1 + a2 - inter + 1e-5)


def points_align_error(pred: Sequence[Sequence[Any]], gt: Sequence[Sequence[Any]], gt_box: Sequence[Any]) -> float:
    """Order-free: the smaller of the two pairings' mean (|dx| + |dy|) / 2, over the GT diagonal."""
    def half_l1(a: Sequence[Any], b: Sequence[Any]) -> float:
        return (abs(a[0] - b[0]) + abs(a[1] - b[1])) / 2

    same = half_l1(pred[0], gt[0]) + half_l1(pred[1], gt[1])
    swapped = half_l1(pred[0], gt[1]) + half_l1(pred[1], gt[0])
    return _per_gt_diagonal(min(same, swapped) / 2, gt_box)


def points_abs_cos(pred: Sequence[Sequence[Any]], gt: Sequence[Sequence[Any]]) -> float:
    """|cos| of the angle between the two point vectors; 1e-8 on each length (coincident: 0)."""
    gx, gy = gt[1][0] - gt[0][0], gt[1][1] - gt[0][1]
    px, py = pred[1][0] - pred[0][0], pred[1][1] - pred[0][1]
    return abs((gx * px + gy * py) / ((math.hypot(gx, gy) + 1e-8) * (math.hypot(px, py) + 1e-8)))


# --- parsing as the reference does it ------------------------------------------------------------
def _is_numbers(v: Any, n: int) -> bool:
    """A list of n ints/floats. As in the reference, booleans (an int subclass), NaN and inf pass."""
    return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)


def _decode(answer: re.Match[str]) -> Any:
    """The <answer> block's JSON after swapping single quotes for double; raises when invalid."""
    return json.loads(answer.group(1).strip().replace("'", '"'))


def format_think_reward(think: re.Match[str] | None) -> float:
    if think is None:
        return 0.0
    return 1.0 if think.group(1).strip() else 0.2


def format_answer_reward(answer: re.Match[str] | None) -> float:
    """0 no block; 0.2 not a JSON object; 0.4 keys missing or neither part well-typed; 0.6 one; 1 both."""
    if answer is None:
        return 0.0
    try:
        obj = _decode(answer)
    except Exception:  # the reference catches everything here (RecursionError included)
        return 0.2
    if not isinstance(obj, dict):
        return 0.2
    if not all(k in obj for k in ANSWER_KEYS):
        return 0.4
    box_ok = _is_numbers(obj["bbox"], 4)
    pts_ok = _is_numbers(obj["points_1"], 2) and _is_numbers(obj["points_2"], 2)
    if box_ok and pts_ok:
        return 1.0
    return 0.6 if (box_ok or pts_ok) else 0.4


def _box_terms(obj: dict[str, Any], gt: Any, hard: bool) -> tuple[float, float, float]:
    """(iou, align, scale); raises on any failure, which the caller turns into all zeros."""
    gt_box, gt_pts = gt["bbox_2d"], gt.get("point_2d", [])
    box = obj.get("bbox")
    if not _is_numbers(box, 4):
        return 0.0, 0.0, 0.0
    valid = (position_factor(gt_pts[0], gt_pts[1], box), area_factor(box, gt_box))
    iou = penalize(slog(reward_box_iou(box, gt_box)), *valid)
    if not hard:
        return iou, 0.0, 0.0
    align = penalize(sexp(box_align_error(box, gt_box), 1.0), *valid)
    scale = penalize(sexp(box_scale_error(box, gt_box), 0.5), *valid)
    return iou, align, scale


def _point_terms(obj: dict[str, Any], gt: Any, hard: bool) -> tuple[float, float, float]:
    """(dice, align, angle); raises on any failure, which the caller turns into all zeros."""
    gt_box, gt_pts = gt["bbox_2d"], gt.get("point_2d", [])
    p1, p2 = obj.get("points_1"), obj.get("points_2")
    if not (_is_numbers(p1, 2) and _is_numbers(p2, 2)):
        return 0.0, 0.0, 0.0
    pts = [p1, p2]
    valid = (position_factor(p1, p2, gt_box), spread_factor(p1, p2))
    dice = penalize(slog(reward_disc_overlap(pts, gt_pts)), *valid)
    if not hard:
        return dice, 0.0, 0.0
    align = penalize(sexp(points_align_error(pts, gt_pts, gt_box), 1.0), *valid)
    angle = penalize(slog(points_abs_cos(pts, gt_pts)), *valid)
    return dice, align, angle


def _all_or_nothing(terms: Callable[[], tuple[float, float, float]]) -> tuple[float, float, float]:
    try:
        return terms()
    except Exception:  # any failure in a block zeroes the whole block, as in the reference
        return 0.0, 0.0, 0.0


# --- the reward -----------------------------------------------------------------------------------
def score(completion: str, ground_truth: dict | str, mode: str = "soft") -> dict[str, float]:
    """All reward components for one completion, plus ``total``."""
    _check_mode(mode)
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    text = completion if isinstance(completion, str) else ""
    if mode in ("base", "base_reference"):
        return _base(text, gt, corrected=mode == "base")

    hard = mode == "hard"
    answer = _ANSWER.search(text)
    out = dict.fromkeys(SOFT_KEYS + HARD_KEYS, 0.0)
    out["format_think"] = format_think_reward(_THINK.search(text))
    out["format_answer"] = format_answer_reward(answer)
    obj: Any = None
    if answer is not None:
        try:
            obj = _decode(answer)
        except Exception:
            obj = None
    if isinstance(obj, dict):
        out["bbox_iou"], out["bbox_align"], out["bbox_scale"] = _all_or_nothing(lambda: _box_terms(obj, gt, hard))
        out["points_dice"], out["points_align"], out["points_angle"] = _all_or_nothing(
            lambda: _point_terms(obj, gt, hard))
    # summed in the reference's order, so that even the last bit of the total agrees
    order = ("format_think", "format_answer", "bbox_iou", "bbox_align", "bbox_scale",
             "points_align", "points_angle", "points_dice")
    out["total"] = sum(out[k] for k in order)
    return out


# --- base (Seg-Zero-style binary) ----------------------------------------------------------------
def _pixel_iou(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Seg-Zero's integer-pixel IoU: +1 on every extent; overlap only if strictly positive."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return float(inter) / (area_a + area_b - inter)


def _first_object(text: str, swap_quotes: bool) -> dict | None:
    """The first '{...}' (no nested '}') anywhere in the text, decoded; None if absent; raises if bad."""
    m = _FIRST_OBJECT.search(text)
    if m is None:
        return None
    raw = m.group(0)
    return json.loads(raw.replace("'", '"') if swap_quotes else raw)


def _base_json_ok(data: dict | None) -> bool:
    """The keys exist and hold lists of lengths 4, 2, 2 (element types are not checked)."""
    if data is None or not all(k in data for k in ANSWER_KEYS):
        return False
    return all(isinstance(data[k], list) and len(data[k]) == n for k, n in zip(ANSWER_KEYS, (4, 2, 2)))


def _base_iou(data: dict | None, gt: Any) -> float:
    """1 when the pixel IoU with the GT box exceeds 0.5; raises when anything is off."""
    if data is None or len(data["bbox"]) != 4:
        return 0.0
    return 1.0 if _pixel_iou(data["bbox"], gt["bbox_2d"]) > 0.5 else 0.0


def _base_l1(data: dict | None, gt: Any) -> float:
    """1 when the mean absolute corner difference to the GT box is under 10 px; raises when off."""
    if data is None or len(data["bbox"]) != 4:
        return 0.0
    b, g = data["bbox"], gt["bbox_2d"]
    return 1.0 if (abs(b[0] - g[0]) + abs(b[1] - g[1]) + abs(b[2] - g[2]) + abs(b[3] - g[3])) / 4 < 10 else 0.0


def _base_points(data: dict | None, gt: Any) -> float:
    """Both points (truncated to int) inside the predicted box and, in the better pairing, a mean
    Euclidean distance to the GT points under 100 px. Raises when anything is off."""
    gt_pts = gt.get("point_2d", [])
    if data is None:
        return 0.0
    box = data["bbox"]
    if len(box) != 4:  # the reference then reads an unset variable and fails
        return 0.0
    p1 = [int(data["points_1"][0]), int(data["points_1"][1])]
    p2 = [int(data["points_2"][0]), int(data["points_2"][1])]
    if not (_inside(p1, box) and _inside(p2, box)):
        return 0.0

    def d(a: Sequence[Any], b: Sequence[Any]) -> float:
        return math.sqrt((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2)

    same = d(p1, gt_pts[0]) + d(p2, gt_pts[1])
    swapped = d(p1, gt_pts[1]) + d(p2, gt_pts[0])
    return 1.0 if min(same, swapped) / 2 < 100 else 0.0


def _guarded(fn: Callable[[], Any], fallback: Any) -> Any:
    try:
        return fn()
    except Exception:  # the reference wraps every base term in a catch-all
        return fallback


def _base(text: str, gt: Any, corrected: bool) -> dict[str, float]:
    """Seg-Zero's binary reward as the reference computes it; ``corrected`` fixes its two bugs."""
    out = dict.fromkeys(BASE_KEYS, 0.0)
    out["base_format"] = 1.0 if _BASE_FORMAT.fullmatch(text) else 0.0
    data = _guarded(lambda: _first_object(text, swap_quotes=corrected), None)
    out["base_json"] = 1.0 if _base_json_ok(data) else 0.0
    if corrected:
        out["base_iou"] = _guarded(lambda: _base_iou(data, gt), 0.0)  # guarded apart, as in the reference:
        out["base_l1"] = _guarded(lambda: _base_l1(data, gt), 0.0)  # a failing IoU leaves the L1 term
    # else: the reference's bug: IoU and L1 call .strip() on the GT dict, raise and are always 0
    out["base_points"] = _guarded(lambda: _base_points(data, gt), 0.0)
    out["total"] = sum(out[k] for k in BASE_KEYS)
    return out


# --- adapters for trainers (TRL's reward-function signature) -------------------------------------
def completion_text(completion: Any) -> str:
    """TRL passes plain strings, or for chat prompts a list of messages; take the assistant text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return ""


def mode_keys(mode: str) -> tuple[str, ...]:
    """The components a mode scores (their sum is ``total``)."""
    _check_mode(mode)
    return {"soft": SOFT_KEYS, "hard": SOFT_KEYS + HARD_KEYS}.get(mode, BASE_KEYS)


def component_rewards(mode: str = "soft") -> list:
    """One callable per reward component, named after it, so trainers log each one separately.

    Each has TRL's signature ``f(completions, ground_truth, **columns) -> list[float]``; their sum is
    ``score(...)["total"]``.
    """
    keys = mode_keys(mode)
    cache: dict[tuple[str, str], dict[str, float]] = {}

    def scored(c: Any, gt: Any) -> dict[str, float]:
        text = completion_text(c)
        key = (text, gt if isinstance(gt, str) else json.dumps(gt, sort_keys=True))
        if key not in cache:  # every component reads the same score; compute it once per batch
            if len(cache) > 4096:
                cache.clear()
            cache[key] = score(text, gt, mode)
        return cache[key]

    def make(name: str):
        def reward(completions, ground_truth, **_columns) -> list[float]:
            return [scored(c, g)[name] for c, g in zip(completions, ground_truth)]

        reward.__name__ = name
        return reward

    return [make(k) for k in keys]
