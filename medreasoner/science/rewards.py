"""MedReasoner's GRPO rewards, as pure functions of (completion, ground truth).

``score(completion, ground_truth, mode)`` returns every component and ``total``:
- ``soft`` (the released model): format_think + format_answer + bbox_iou + points_dice (max 4);
- ``hard``: the four soft terms + bbox_align + bbox_scale + points_align + points_angle (max 8);
- ``base``: the strict binary Seg-Zero reward (max 5).
``ground_truth`` is ``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [[x, y], [x, y]]}`` in the pixel
space of the image the model saw. Invalid geometry gives the affected terms 0, never an exception.

Parsing here is deliberately the reference's, not ``medreasoner.models.answer``'s tolerant one: the
reward must score the format exactly as training did.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from medreasoner.imaging.geometry import box_area, box_iou, disc_from_diameter, lens_area, point_in_box

SOFT_KEYS = ("format_think", "format_answer", "bbox_iou", "points_dice")
HARD_KEYS = ("bbox_align", "bbox_scale", "points_align", "points_angle")
BASE_KEYS = ("base_format", "base_json", "base_iou", "base_l1", "base_points")
ANSWER_KEYS = ("bbox", "points_1", "points_2")

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_STRICT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)


# --- smoothing and validity factors -------------------------------------------------------------
def slog(v: float) -> float:
    """0.9 * ln(3v + 1) / ln 4 + 0.1: maps [0, 1] onto [0.1, 1], steep near 0 (not clipped)."""
    return 0.9 * math.log(3.0 * v + 1.0) / math.log(4.0) + 0.1


def _sigmoid_step(v: float, c: float) -> float:
    return 1.0 / (1.0 + math.exp(3.0 * (v - c)))


def sexp(v: float, c: float) -> float:
    """Decreasing sigmoid of an error v in [0, 2], normalised to 1 at v=0 and 0.1 at v=2."""
    s0, s2 = _sigmoid_step(0.0, c), _sigmoid_step(2.0, c)
    return 0.9 * (_sigmoid_step(v, c) - s2) / (s0 - s2 + 1e-8) + 0.1


def position_factor(points: Sequence[Sequence[float]], box: Sequence[float]) -> float:
    """Product over the points of 1 (inside the box) or 0.5 (outside)."""
    f = 1.0
    for p in points:
        f *= 1.0 if point_in_box(p, box) else 0.5
    return f


def area_factor(pred_box: Sequence[float], gt_box: Sequence[float]) -> float:
    a_gt = box_area(gt_box)
    return 1.0 if 0.5 * a_gt < box_area(pred_box) < 2.0 * a_gt else 0.5


def spread_factor(points: Sequence[Sequence[float]]) -> float:
    return 1.0 if math.dist(points[0], points[1]) > 10.0 else 0.5


def penalize(r: float, v1: float, v2: float) -> float:
    return min(1.0, max(0.0, 0.7 * r + 0.3 * r * (v1 + v2) / 2.0))


# --- geometric similarities ---------------------------------------------------------------------
def points_disc_overlap(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    """The reference's point metric: 2I / (A1 + A2 - I + 1e-5) for the discs spanned by each pair.

    Note: this is twice the disc IoU, not textbook Dice 2I / (A1 + A2); it can exceed 1. Kept as is
    so that training matches the reference (``metrics`` also reports true disc Dice).
    """
    cx1, cy1, r1 = disc_from_diameter(*pred)
    cx2, cy2, r2 = disc_from_diameter(*gt)
    inter = lens_area(r1, r2, math.hypot(cx1 - cx2, cy1 - cy2))
    a1, a2 = math.pi * r1 * r1, math.pi * r2 * r2
    return 2.0 * inter / (a1 + a2 - inter + 1e-5)


def _diag(box: Sequence[float]) -> float:
    return math.hypot(box[2] - box[0], box[3] - box[1])


def box_align_error(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Mean absolute corner-coordinate difference over the GT diagonal, clipped to [0, 2]."""
    mean = sum(abs(p - g) for p, g in zip(pred, gt)) / 4.0
    return min(2.0, max(0.0, mean / _diag(gt)))


def box_scale_error(pred: Sequence[float], gt: Sequence[float]) -> float:
    """sqrt(ln(area ratio)^2 + ln(aspect-ratio ratio)^2), capped at 1."""
    wp, hp = pred[2] - pred[0], pred[3] - pred[1]
    wg, hg = gt[2] - gt[0], gt[3] - gt[1]
    la = math.log((wp * hp) / (wg * hg))
    lr = math.log((wp / hp) / (wg / hg))
    return min(1.0, math.sqrt(la * la + lr * lr))


def points_align_error(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], gt_box) -> float:
    """Order-free: min over the two pairings of mean (|dx| + |dy|) / 2, over the GT diagonal."""
    def cost(a, b):
        return sum((abs(p[0] - g[0]) + abs(p[1] - g[1])) / 2.0 for p, g in zip(a, b)) / 2.0

    best = min(cost(pred, gt), cost(pred, gt[::-1]))
    return min(2.0, max(0.0, best / _diag(gt_box)))


def points_abs_cos(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    vp = (pred[1][0] - pred[0][0], pred[1][1] - pred[0][1])
    vg = (gt[1][0] - gt[0][0], gt[1][1] - gt[0][1])
    return abs(vp[0] * vg[0] + vp[1] * vg[1]) / (math.hypot(*vp) * math.hypot(*vg))


# --- parsing as the reference does it -----------------------------------------------------------
def _is_numbers(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


def _parse(completion: str):
    """(think text or None, answer dict or None, answer block found)."""
    tm = _THINK.search(completion)
    am = _ANSWER.search(completion)
    think = tm.group(1) if tm else None
    if not am:
        return think, None, False
    try:
        obj = json.loads(am.group(1).strip().replace("'", '"'))
    except ValueError:
        obj = None
    return think, obj if isinstance(obj, dict) else None, True


def format_think_reward(think: str | None) -> float:
    if think is None:
        return 0.0
    return 1.0 if think.strip() else 0.2


def format_answer_reward(obj: dict | None, found: bool) -> float:
    if not found:
        return 0.0
    if obj is None:
        return 0.2
    if any(k not in obj for k in ANSWER_KEYS):
        return 0.4
    box_ok = _is_numbers(obj["bbox"], 4)
    pts_ok = _is_numbers(obj["points_1"], 2) and _is_numbers(obj["points_2"], 2)
    if box_ok and pts_ok:
        return 1.0
    return 0.6 if (box_ok or pts_ok) else 0.4


def _safe(fn, *args) -> float:
    try:
        v = float(fn(*args))
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, IndexError):
        return 0.0
    return v if math.isfinite(v) else 0.0


def _valid_box(b) -> bool:
    return _is_numbers(b, 4) and b[2] > b[0] and b[3] > b[1]


# --- the reward -----------------------------------------------------------------------------------
def score(completion: str, ground_truth: dict | str, mode: str = "soft") -> dict[str, float]:
    """All reward components for one completion, plus ``total``."""
    if mode not in ("soft", "hard", "base"):
        raise ValueError(f"unknown reward mode {mode!r}; choose soft, hard or base")
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    gt_box = [float(v) for v in gt["bbox_2d"]]
    gt_pts = [[float(v) for v in p] for p in gt["point_2d"]]
    text = completion if isinstance(completion, str) else ""
    if mode == "base":
        return _base(text, gt_box, gt_pts)

    think, obj, found = _parse(text)
    out = dict.fromkeys(SOFT_KEYS + HARD_KEYS, 0.0)
    out["format_think"] = format_think_reward(think)
    out["format_answer"] = format_answer_reward(obj, found)
    obj = obj or {}
    box = obj.get("bbox")
    pts = [obj.get("points_1"), obj.get("points_2")]
    box_ok = _valid_box(box) and _valid_box(gt_box)
    # Coincident points span no disc and no direction: their terms are 0.
    pts_ok = all(_is_numbers(p, 2) for p in pts) and math.dist(*pts) > 0 and math.dist(*gt_pts) > 0

    if box_ok:
        v_box = (_safe(position_factor, gt_pts, box), _safe(area_factor, box, gt_box))
        out["bbox_iou"] = _safe(lambda: penalize(slog(box_iou(box, gt_box)), *v_box))
        if mode == "hard":
            out["bbox_align"] = _safe(lambda: penalize(sexp(box_align_error(box, gt_box), 1.0), *v_box))
            out["bbox_scale"] = _safe(lambda: penalize(sexp(box_scale_error(box, gt_box), 0.5), *v_box))
    if pts_ok and _valid_box(gt_box):
        v_pts = (_safe(position_factor, pts, gt_box), _safe(spread_factor, pts))
        out["points_dice"] = _safe(lambda: penalize(slog(points_disc_overlap(pts, gt_pts)), *v_pts))
        if mode == "hard":
            out["points_align"] = _safe(lambda: penalize(sexp(points_align_error(pts, gt_pts, gt_box), 1.0), *v_pts))
            out["points_angle"] = _safe(lambda: penalize(slog(points_abs_cos(pts, gt_pts)), *v_pts))
    keys = SOFT_KEYS + (HARD_KEYS if mode == "hard" else ())
    out["total"] = sum(out[k] for k in keys)
    return out


def _base(text: str, gt_box, gt_pts) -> dict[str, float]:
    """Seg-Zero's strict binary reward. The reference release scores IoU and L1 as always 0 through
    a bug; here they are computed."""
    out = dict.fromkeys(BASE_KEYS, 0.0)
    out["base_format"] = 1.0 if _STRICT.match(text.strip()) else 0.0
    _, obj, _ = _parse(text)
    if obj is not None and all(k in obj for k in ANSWER_KEYS):
        out["base_json"] = 1.0
        box, pts = obj["bbox"], [obj["points_1"], obj["points_2"]]
        if _valid_box(box):
            out["base_iou"] = 1.0 if _safe(box_iou, box, gt_box) > 0.5 else 0.0
            l1 = sum(abs(float(p) - g) for p, g in zip(box, gt_box)) / 4.0
            out["base_l1"] = 1.0 if l1 < 10.0 else 0.0
            if all(_is_numbers(p, 2) for p in pts) and all(point_in_box(p, box) for p in pts):
                d = min((math.dist(pts[0], gt_pts[0]) + math.dist(pts[1], gt_pts[1])) / 2.0,
                        (math.dist(pts[0], gt_pts[1]) + math.dist(pts[1], gt_pts[0])) / 2.0)
                out["base_points"] = 1.0 if d < 100.0 else 0.0
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


def component_rewards(mode: str = "soft") -> list:
    """One callable per reward component, named after it, so trainers log each one separately.

    Each has TRL's signature ``f(completions, ground_truth, **columns) -> list[float]``; their sum is
    ``score(...)["total"]``.
    """
    keys = {"soft": SOFT_KEYS, "hard": SOFT_KEYS + HARD_KEYS, "base": BASE_KEYS}.get(mode)
    if keys is None:
        raise ValueError(f"unknown reward mode {mode!r}; choose soft, hard or base")
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
