"""Metrics pinned to hand-computed values; aggregation keeps refusals as zeros."""

import math

import numpy as np
import pytest

from medreasoner.science.metrics import (
    disc_dice,
    markdown_table,
    mask_dice,
    pdice_reference,
    sample_metrics,
    summarize,
)

GT = {"bbox_2d": [0, 0, 10, 10], "point_2d": [[2, 5], [8, 5]]}


def test_point_metrics_by_hand():
    # concentric discs r=5 and r=2: I = 4 pi; reference 2I/(A1+A2-I) = 8/25; true Dice 8/29
    pred, gt = [[0, 0], [10, 0]], [[3, 0], [7, 0]]
    assert pdice_reference(pred, gt) == pytest.approx(8 / 25, abs=1e-5)
    assert disc_dice(pred, gt) == pytest.approx(8 / 29, abs=1e-5)
    same = [[0, 0], [4, 0]]
    assert disc_dice(same, same) == pytest.approx(1.0)
    assert pdice_reference(same, same) == pytest.approx(2.0, abs=1e-4)  # the reference's factor 2
    assert disc_dice([[0, 0], [2, 0]], [[10, 0], [12, 0]]) == 0.0


def test_mask_metrics_by_hand():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:5] = True  # 20 px
    b[2:6, 0:5] = True  # 20 px, 10 shared
    assert mask_dice(a, b) == pytest.approx(0.5, abs=1e-6)
    m = sample_metrics((0, 0, 5, 10), [[1, 1], [3, 3]], GT, a, b)
    assert m["mask_iou"] == pytest.approx(10 / 30) and (m["inter"], m["union"]) == (10, 30)
    assert m["iou"] == pytest.approx(50 / 100, abs=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_dice(a, b[:5])


def test_refusal_counts_as_zero_and_cumulative_iou():
    gt_mask = np.zeros((10, 10), bool)
    gt_mask[:5] = True
    pred = gt_mask.copy()
    good = {"supercategory": "Lung", "category": "nodule",
            "metrics": sample_metrics((0, 0, 10, 10), [[2, 5], [8, 5]], GT, pred, gt_mask)}
    refused = {"supercategory": "Brain", "category": "tumour",
               "metrics": sample_metrics(None, None, GT, None, gt_mask)}
    assert refused["metrics"]["refused"] and refused["metrics"]["dice"] == 0.0
    s = summarize([good, refused])
    o = s["overall"]
    assert o["n"] == 2 and o["refusals"] == 1 and o["refusal_rate"] == 50.0
    assert o["iou"] == pytest.approx(50.0, abs=1e-3)  # (100 + 0) / 2
    assert o["giou"] == pytest.approx(50.0) and o["ciou"] == pytest.approx(100 * 50 / 100)
    assert set(s["by_supercategory"]) == {"Brain", "Lung"} and s["by_supercategory"]["Lung"]["iou"] > 99
    table = markdown_table(s, "test")
    assert "| **all** |" in table and "| Lung |" in table and "1 (50.0%)" in table


def test_degenerate_points_do_not_crash():
    m = sample_metrics((0, 0, 10, 10), [[5, 5], [5, 5]], GT, None, None)
    assert m["pdice"] == 0.0 and all(math.isfinite(v) for v in (m["iou"], m["dice"]))
