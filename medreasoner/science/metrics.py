"""Evaluation metrics of MedReasoner's table, as pure functions, and their aggregation.

Per sample: box IoU; pDice (the reference's point metric, 2I / (A1 + A2 - I), which the published
table uses) and true disc Dice 2I / (A1 + A2); mask Dice and mask IoU of the ASM's mask. Failed
parses count as refusals and stay in every mean as zeros. Aggregates: per-sample means (x100),
gIoU (mean per-sample mask IoU) and cIoU (cumulative intersection / cumulative union), overall,
per super-category and per category.

The reference protocol (``evaluate --protocol reference``) has its own per-sample functions and table:
``reference_box_iou`` / ``reference_pdice`` / ``reference_sample_metrics`` reproduce the public
reference's eval/utils.py and eval/eval.py arithmetic on the raw answer (a sample whose extraction or
arithmetic raises is a failure: every metric 0), and ``summarize_reference`` its eval/statistic.py
table (failures counted its way, categories nested under their super-category).
A metric that could not be computed (a mask Dice whose prompt was never segmented) is ``None``; a
mean over such values is ``None`` too, with the count of missing values beside it.
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


def _mean100(values: list, row: dict[str, Any], key: str) -> float | None:
    """100 x the mean; None (and the count in ``row["missing"]``) when any value is None."""
    missing = sum(v is None for v in values)
    if missing:
        row.setdefault("missing", {})[key] = missing
        return None
    return 100.0 * sum(values) / len(values) if values else 0.0


def _aggregate(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    row: dict[str, Any] = {"n": n}
    for k in METRIC_KEYS:
        row[k] = _mean100([r["metrics"].get(k) for r in records], row, k)
    row["giou"] = row["mask_iou"]
    inters = [r["metrics"].get("inter", 0) for r in records]
    unions = [r["metrics"].get("union", 0) for r in records]
    if any(v is None for v in inters + unions):
        row["ciou"] = None
    else:
        row["ciou"] = 100.0 * sum(inters) / sum(unions) if sum(unions) else 0.0
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
    if summary.get("protocol") == "reference":
        return markdown_reference_table(summary, title)
    cols = ("IoU", "pDice", "Dice", "disc Dice", "gIoU", "cIoU", "refusals", "n")
    lines = [f"### {title}" if title else "", ""]
    if summary.get("protocol"):
        lines += [f"Protocol: **{summary['protocol']}** ({PROTOCOL_TEXT.get(summary['protocol'], '')})",
                  *_settings_lines(summary), ""]
    lines += ["| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def fmt(name, r):
        vals = [_pct(r["iou"]), _pct(r["pdice"]), _pct(r["dice"]), _pct(r["disc_dice"]), _pct(r["giou"]),
                _pct(r["ciou"]), f"{r['refusals']} ({r['refusal_rate']:.1f}%)", str(r["n"])]
        return f"| {name} | " + " | ".join(vals) + " |"

    lines.append(fmt("**all**", summary["overall"]))
    for name, r in summary["by_supercategory"].items():
        lines.append(fmt(name, r))
    lines += ["", "pDice is the reference's point metric (twice the disc IoU) as in the published table; "
              "disc Dice is the textbook Dice of the same discs. Refusals count as zeros."]
    return "\n".join(lines).lstrip("\n") + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _settings_lines(summary: dict) -> list[str]:
    """"Settings: ..." from ``summary["protocol_settings"]`` (what the run used), if recorded."""
    st = summary.get("protocol_settings") or {}
    keys = [k for k in ("asm", "asm_image_size", "asm_precision", "max_new_tokens") if k in st]
    if not keys:
        return []
    lines = ["", "Settings: " + ", ".join(f"{k.replace('_', ' ')} {'n/a' if st[k] is None else st[k]}"
                                         for k in keys)]
    if st.get("differs_from_reference"):
        lines += ["", "Differs from the reference evaluation: " + "; ".join(st["differs_from_reference"])]
    return lines


PROTOCOL_TEXT = {
    "robust": "this project's answer parser: safe repairs listed per sample; refusals = no usable box",
    "reference": "the public reference evaluation's strict extraction and validity rules, no repairs; "
                 "failures = answers its code could not score, 0 in every mean",
}


# -- the reference protocol ---------------------------------------------------------------------------


def reference_box_iou(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """Box IoU as the reference's eval/utils.py computes it, on the values as given: areas from the
    raw corners (an inverted box has a negative or zero area and no intersection, so IoU 0),
    inter / (A1 + A2 - inter + 1e-6). Raises where the reference raises (not 4 values, non-numbers)."""
    px1, py1, px2, py2 = pred
    gx1, gy1, gx2, gy2 = gt
    # the same argument order as the reference, so NaN and ties resolve the same way
    iw = max(0, min(px2, gx2) - max(px1, gx1))
    ih = max(0, min(py2, gy2) - max(py1, gy1))
    inter = iw * ih
    return inter / ((px2 - px1) * (py2 - py1) + (gx2 - gx1) * (gy2 - gy1) - inter + 1e-6)


def _reference_lens(r1: float, r2: float, d: float) -> float:
    """Disc intersection as the reference computes it (acos arguments not clamped: it raises there)."""
    if d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        return math.pi * min(r1, r2) ** 2
    a1 = r1 ** 2 * math.acos((d ** 2 + r1 ** 2 - r2 ** 2) / (2 * d * r1))
    a2 = r2 ** 2 * math.acos((d ** 2 + r2 ** 2 - r1 ** 2) / (2 * d * r2))
    k = (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    return a1 + a2 - 0.5 * math.sqrt(k)


def reference_pdice(pred: Sequence[Any], gt: Sequence[Any]) -> float:
    """The reference's pDice on raw key points: 2I / (A1 + A2 - I + 1e-5) of the discs the two point
    pairs span (radius = half the distance, no epsilon), with its numpy arithmetic (see
    ``answer.reference_disc``): coincident points give 0, odd shapes give what it computes."""
    from medreasoner.models.answer import reference_disc

    pcx, pcy, pr = reference_disc(*pred)
    gcx, gcy, gr = reference_disc(*gt)
    d = np.linalg.norm([pcx - gcx, pcy - gcy])
    inter = _reference_lens(pr, gr, d)
    union = math.pi * pr ** 2 + math.pi * gr ** 2 - inter
    return 2 * inter / (union + 1e-5)


REFERENCE_DIGITS = 4  # the reference stores every per-sample metric rounded to 4 places


def _finite4(value: Any, name: str, notes: list[str]) -> float:
    value = float(value)
    if not math.isfinite(value):
        notes.append(f"{name} is not finite ({value}); recorded as 0 (the reference's mean would be NaN)")
        return 0.0
    return round(value, REFERENCE_DIGITS)


def reference_sample_metrics(answer, gt: dict) -> dict[str, Any]:
    """IoU and pDice of a ``ReferenceAnswer`` the reference's way: computed together, and if the
    extraction or either computation raises, the sample is a failure and both are 0 (think "error").
    ``failed`` follows the reference's statistic.py: think == "error" and IoU == pDice == 0.
    ``dice`` is left None for the caller (it needs the ASM)."""
    import warnings

    from medreasoner.models.answer import REFERENCE_THINK_FAILED

    failure, think, notes = answer.failure, answer.think, []
    iou = pdice = 0.0
    if failure is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                iou = float(reference_box_iou(answer.box, gt["bbox_2d"]))
                pdice = float(reference_pdice(answer.points, gt["point_2d"]))
        except Exception as exc:  # noqa: BLE001 - as the reference: any error makes the sample a failure
            failure = f"the reference's IoU/pDice raised ({type(exc).__name__}: {exc})"
            iou = pdice = 0.0
    if failure is not None:
        think = REFERENCE_THINK_FAILED
    iou, pdice = _finite4(iou, "IoU", notes), _finite4(pdice, "pDice", notes)
    return {"iou": iou, "pdice": pdice, "dice": None, "failed": think == REFERENCE_THINK_FAILED and iou == 0
            and pdice == 0, "failure": failure, "think": think, "notes": notes}


def reference_mask_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference's mask Dice 2I / (|P| + |G| + 1e-6), rounded to 4 places (its GT is mask / 255;
    for the 0/255 masks of U-MRG that is the pixel count used here)."""
    return round(mask_dice(pred, gt), REFERENCE_DIGITS)


REFERENCE_METRIC_KEYS = ("iou", "pdice", "dice")


def _reference_row(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    row: dict[str, Any] = {"n": n}
    for k in REFERENCE_METRIC_KEYS:
        row[k] = _mean100([r["metrics"].get(k) for r in records], row, k)
    row["failures"] = sum(bool(r["metrics"].get("failed")) for r in records)
    row["valid"] = n - row["failures"]
    row["failure_rate"] = 100.0 * row["failures"] / n if n else 0.0
    return row


def summarize_reference(records: Iterable[dict]) -> dict[str, Any]:
    """The reference's statistic.py table from records carrying ``supercategory``, ``category`` and
    ``metrics`` (``reference_sample_metrics`` + ``dice``): overall, per super-category, and per
    category *within* its super-category (a category name under two super-categories is two rows);
    names sorted case-insensitively; a missing name is "unknown" (an empty one stays empty)."""
    records = list(records)
    nested: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        nested[r.get("supercategory", "unknown")][r.get("category", "unknown")].append(r)
    by_super = {}
    for sup in sorted(nested, key=str.lower):
        members = [r for cat in nested[sup].values() for r in cat]
        by_super[sup] = {**_reference_row(members), "categories": {
            cat: _reference_row(nested[sup][cat]) for cat in sorted(nested[sup], key=str.lower)}}
    return {
        "overall": _reference_row(records),
        "by_supercategory": by_super,
        "definitions": {
            "iou": "box IoU of the raw answer box (inverted or outside boxes scored as given), x100",
            "pdice": "reference point metric 2I/(A1+A2-I+1e-5) of the discs spanned by the raw key points",
            "dice": "mask Dice of the ASM mask for the raw box + both points (labels [1, 1], best of the "
                    "multimask outputs); 0 for failures",
            "failures": "samples whose answer the reference could not extract or score (think 'error', "
                        "IoU = pDice = 0); they stay in every mean as zeros",
            "categories": "nested under their super-category, as the reference's per_super table",
        },
    }


def markdown_reference_table(summary: dict, title: str = "") -> str:
    """The reference protocol's table: overall, each super-category and its categories."""
    cols = ("IoU", "pDice", "Dice", "failures", "n")
    lines = [f"### {title}" if title else "", "",
             f"Protocol: **reference** ({PROTOCOL_TEXT['reference']})", *_settings_lines(summary), "",
             "| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def fmt(name, r):
        vals = [_pct(r["iou"]), _pct(r["pdice"]), _pct(r["dice"]), f"{r['failures']} ({r['failure_rate']:.1f}%)",
                str(r["n"])]
        return f"| {name} | " + " | ".join(vals) + " |"

    lines.append(fmt("**all**", summary["overall"]))
    for sup, r in summary["by_supercategory"].items():
        lines.append(fmt(sup or "(none)", r))
        for cat, c in r["categories"].items():
            lines.append(fmt(f"{sup or '(none)'} / {cat or '(none)'}", c))
    lines += ["", "Means over every sample, x100; failures count as 0. Categories are nested under their "
              "super-category, as in the reference's statistic.py."]
    return "\n".join(lines).lstrip("\n") + "\n"
