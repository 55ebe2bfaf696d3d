"""Evaluation metrics of MedReasoner's table, as pure functions, and their aggregation.

Per sample: box IoU; pDice (the reference's point metric, 2I / (A1 + A2 - I), which the published
table uses) and true disc Dice 2I / (A1 + A2); mask Dice and mask IoU of the ASM's mask. Failed
parses count as refusals and stay in every mean as zeros. Aggregates: per-sample means (x100),
gIoU (mean per-sample mask IoU) and cIoU (cumulative intersection / cumulative union), overall,
per super-category and per category.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medreasoner.imaging.geometry import box_iou, disc_from_diameter, lens_area
from medreasoner.science.rewards import points_disc_overlap

METRIC_KEYS = ("iou", "pdice", "disc_dice", "dice", "mask_iou")


def pdice_reference(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    """The published table's pDice (twice the disc IoU; see ``rewards.points_disc_overlap``)."""
    return points_disc_overlap(pred, gt)


def disc_dice(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]]) -> float:
    """Textbook Dice of the two discs spanned by the point pairs: 2I / (A1 + A2)."""
    cx1, cy1, r1 = disc_from_diameter(*pred)
    cx2, cy2, r2 = disc_from_diameter(*gt)
    inter = lens_area(r1, r2, math.hypot(cx1 - cx2, cy1 - cy2))
    return 2.0 * inter / (math.pi * (r1 * r1 + r2 * r2))


def mask_overlap(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """(intersection, union, |pred|, |gt|) pixel counts."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"mask shapes differ: predicted {p.shape}, ground truth {g.shape}")
    inter = int(np.logical_and(p, g).sum())
    ps, gs = int(p.sum()), int(g.sum())
    return inter, ps + gs - inter, ps, gs


def mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    inter, _, ps, gs = mask_overlap(pred, gt)
    return 2.0 * inter / (ps + gs + 1e-6)


def sample_metrics(box, points, gt: dict, pred_mask: np.ndarray | None, gt_mask: np.ndarray | None) -> dict:
    """All per-sample metrics; missing predictions give zeros (a refusal when there is no box)."""
    gt_box, gt_pts = gt["bbox_2d"], gt["point_2d"]
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS, 0.0)
    out["refused"] = box is None
    if box is not None:
        out["iou"] = box_iou(box, gt_box)
    if points is not None and math.dist(*points) > 0 and math.dist(*gt_pts) > 0:
        out["pdice"] = pdice_reference(points, gt_pts)
        out["disc_dice"] = disc_dice(points, gt_pts)
    out["inter"] = out["union"] = 0
    if gt_mask is not None:
        pm = pred_mask if pred_mask is not None else np.zeros_like(gt_mask, bool)
        inter, union, ps, gs = mask_overlap(pm, gt_mask)
        out.update(inter=inter, union=union, dice=2.0 * inter / (ps + gs + 1e-6),
                   mask_iou=inter / union if union else 0.0)
    return out


def _aggregate(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    row: dict[str, Any] = {"n": n}
    for k in METRIC_KEYS:
        row[k] = 100.0 * sum(r["metrics"][k] for r in records) / n if n else 0.0
    row["giou"] = row["mask_iou"]
    inter = sum(r["metrics"].get("inter", 0) for r in records)
    union = sum(r["metrics"].get("union", 0) for r in records)
    row["ciou"] = 100.0 * inter / union if union else 0.0
    row["refusals"] = sum(bool(r["metrics"]["refused"]) for r in records)
    row["refusal_rate"] = 100.0 * row["refusals"] / n if n else 0.0
    return row


def summarize(records: Iterable[dict]) -> dict[str, Any]:
    """``records`` carry ``supercategory``, ``category`` and ``metrics`` (from ``sample_metrics``)."""
    records = list(records)
    by_super, by_cat = defaultdict(list), defaultdict(list)
    for r in records:
        by_super[r.get("supercategory") or "unknown"].append(r)
        by_cat[r.get("category") or "unknown"].append(r)
    return {
        "overall": _aggregate(records),
        "by_supercategory": {k: _aggregate(v) for k, v in sorted(by_super.items())},
        "by_category": {k: _aggregate(v) for k, v in sorted(by_cat.items())},
        "definitions": {
            "iou": "box IoU, mean over samples, x100",
            "pdice": "reference point metric 2I/(A1+A2-I) of the discs spanned by the key points "
                     "(the published table's pDice)",
            "disc_dice": "true Dice of the same discs, 2I/(A1+A2)",
            "dice": "mask Dice of the ASM mask (box + both points)",
            "giou": "mean per-sample mask IoU", "ciou": "cumulative mask intersection / union",
            "refusals": "samples without a usable box (counted as zeros in every mean)",
        },
    }


def markdown_table(summary: dict, title: str = "") -> str:
    """A table shaped like the paper's: overall, then per super-category."""
    cols = ("IoU", "pDice", "Dice", "disc Dice", "gIoU", "cIoU", "refusals", "n")
    lines = [f"### {title}" if title else "", "", "| group | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]

    def fmt(name, r):
        vals = [f"{r['iou']:.2f}", f"{r['pdice']:.2f}", f"{r['dice']:.2f}", f"{r['disc_dice']:.2f}",
                f"{r['giou']:.2f}", f"{r['ciou']:.2f}", f"{r['refusals']} ({r['refusal_rate']:.1f}%)", str(r["n"])]
        return f"| {name} | " + " | ".join(vals) + " |"

    lines.append(fmt("**all**", summary["overall"]))
    for name, r in summary["by_supercategory"].items():
        lines.append(fmt(name, r))
    lines += ["", "pDice is the reference's point metric (twice the disc IoU) as in the published table; "
              "disc Dice is the textbook Dice of the same discs. Refusals count as zeros."]
    return "\n".join(lines).lstrip("\n") + "\n"
