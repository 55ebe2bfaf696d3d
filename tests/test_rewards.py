"""Rewards pinned to hand-computed values, plus property tests for bounds and symmetry."""

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from medreasoner.imaging.geometry import box_iou, lens_area
from medreasoner.science.rewards import (
    HARD_KEYS,
    SOFT_KEYS,
    points_align_error,
    points_disc_overlap,
    score,
    sexp,
    slog,
)

GT = {"bbox_2d": [5, 0, 15, 10], "point_2d": [[8, 5], [12, 5]]}


def answer(box="[0, 0, 10, 10]", p1="[2, 5]", p2="[8, 5]", think="The target is left."):
    return f"<think>{think}</think><answer>{{'bbox': {box}, 'points_1': {p1}, 'points_2': {p2}}}</answer>"


def test_smoothing_functions():
    assert slog(0) == pytest.approx(0.1) and slog(1) == pytest.approx(1.0)
    assert slog(1 / 3) == pytest.approx(0.55)  # 0.9 * ln 2 / ln 4 + 0.1
    assert sexp(0, 1) == pytest.approx(1.0, abs=1e-7) and sexp(2, 1) == pytest.approx(0.1)
    assert sexp(1, 1) == pytest.approx(0.55)  # the midpoint of the sigmoid
    assert sexp(0.98026, 0.5) == pytest.approx(0.30130, abs=1e-4)


def test_soft_components_by_hand():
    r = score(answer(), GT, "soft")
    assert r["format_think"] == 1.0 and r["format_answer"] == 1.0
    # IoU = 50 / 150; slog = 0.55; GT points: one inside the predicted box -> 0.5; equal areas -> 1
    assert r["bbox_iou"] == pytest.approx(0.7 * 0.55 + 0.3 * 0.55 * 0.75, abs=1e-6)
    # discs r=3 at (5,5) and r=2 at (10,5) touch: overlap 0 -> slog 0.1; one point out -> 0.5;
    # the predicted points are 6 px apart -> spread 0.5
    assert r["points_dice"] == pytest.approx(0.085, abs=1e-6)
    assert all(r[k] == 0.0 for k in HARD_KEYS)
    assert r["total"] == pytest.approx(1 + 1 + 0.50875 + 0.085, abs=1e-5)


def test_hard_components_by_hand():
    r = score(answer(), GT, "hard")
    # mean |corner diff| = 2.5, / diag 14.142 = 0.17678 -> sexp(.,1) = 0.96958; box factors (0.5, 1)
    assert r["bbox_align"] == pytest.approx(0.925 * 0.96958, abs=1e-4)
    assert r["bbox_scale"] == pytest.approx(0.925 * 1.0, abs=1e-6)  # same size and shape
    # order-free point error: 2.5 / 14.142 -> 0.96958; point factors (0.5, 0.5)
    assert r["points_align"] == pytest.approx(0.85 * 0.96958, abs=1e-4)
    assert r["points_angle"] == pytest.approx(0.85, abs=1e-6)  # parallel vectors: |cos| = 1
    assert r["total"] == pytest.approx(sum(r[k] for k in SOFT_KEYS + HARD_KEYS))


def test_bbox_scale_by_hand():
    gt = {"bbox_2d": [0, 0, 10, 10], "point_2d": [[2, 5], [8, 5]]}
    r = score(answer(box="[0, 0, 20, 10]"), gt, "hard")
    # ln 2 for area and aspect: sqrt(2) * ln 2 = 0.98026 -> sexp(., 0.5) = 0.30130;
    # area 200 is not < 2 * 100 -> 0.5; both GT points inside the predicted box -> 1
    assert r["bbox_scale"] == pytest.approx((0.7 + 0.3 * 0.75) * 0.30130, abs=1e-4)


@pytest.mark.parametrize("completion,think,ans", [
    ("no tags at all", 0.0, 0.0),
    ("<think>  </think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5], 'points_2': [8, 5]}</answer>", 0.2, 1.0),
    ("<think>t</think><answer>left upper lobe</answer>", 1.0, 0.2),
    ("<think>t</think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5]}</answer>", 1.0, 0.4),
    (answer(box="[0, 0, 10]"), 1.0, 0.6),
    (answer(p1="[2]"), 1.0, 0.6),
    (answer(box="[0, 0, 10]", p2="['a', 5]"), 1.0, 0.4),
])
def test_format_rewards(completion, think, ans):
    r = score(completion, GT, "soft")
    assert (r["format_think"], r["format_answer"]) == (think, ans)


@pytest.mark.parametrize("completion", [
    answer(box="[10, 10, 10, 20]"),  # zero-area box
    answer(box="[0, 0, NaN, 10]"),
    answer(p1="[8, 5]", p2="[8, 5]"),  # coincident points
    answer(box="'left'"),
    None,
])
def test_invalid_geometry_gives_zero_not_crash(completion):
    r = score(completion, GT, "hard")
    assert all(math.isfinite(v) and 0 <= v <= 1 for k, v in r.items() if k != "total")


def test_zero_area_box_zeroes_box_terms_only():
    r = score(answer(box="[10, 10, 10, 20]"), GT, "hard")
    assert r["bbox_iou"] == r["bbox_align"] == r["bbox_scale"] == 0.0
    assert r["points_dice"] > 0


def test_base_reward_by_hand():
    r = score(answer(), GT, "base")
    # strict format 1, keys 1, IoU 1/3 -> 0, mean L1 2.5 < 10 -> 1, points in box and 5 px off -> 1
    assert r == {"base_format": 1.0, "base_json": 1.0, "base_iou": 0.0, "base_l1": 1.0, "base_points": 1.0,
                 "total": 4.0}
    assert score("text " + answer(), GT, "base")["base_format"] == 0.0  # full match required


def test_perfect_answer_scores_max():
    gt = {"bbox_2d": [10, 10, 60, 40], "point_2d": [[20, 20], [50, 30]]}
    perfect = answer("[10, 10, 60, 40]", "[20, 20]", "[50, 30]")
    assert score(perfect, gt, "soft")["total"] == pytest.approx(4.0, abs=1e-6)
    assert score(perfect, gt, "hard")["total"] == pytest.approx(8.0, abs=1e-6)
    assert score(perfect, gt, "base")["total"] == 5.0


def test_lens_area_cases():
    assert lens_area(1, 1, 1) == pytest.approx(2 * math.acos(0.5) - 0.5 * math.sqrt(3))
    assert lens_area(5, 2, 0) == pytest.approx(math.pi * 4)  # concentric
    assert lens_area(1, 1, 2) == 0.0 and lens_area(1, 1, 5) == 0.0  # touching, disjoint
    assert points_disc_overlap([[0, 0], [10, 0]], [[3, 0], [7, 0]]) == pytest.approx(8 / 25, abs=1e-5)


coord = st.floats(min_value=0, max_value=500, allow_nan=False)
box_st = st.tuples(coord, coord, coord, coord).map(lambda b: [min(b[0], b[2]), min(b[1], b[3]),
                                                             max(b[0], b[2]) + 1, max(b[1], b[3]) + 1])
pt_st = st.tuples(coord, coord).map(list)


@settings(max_examples=200, deadline=None)
@given(pb=box_st, gb=box_st, p1=pt_st, p2=pt_st, g1=pt_st, g2=pt_st, mode=st.sampled_from(["soft", "hard"]))
def test_bounds(pb, gb, p1, p2, g1, g2, mode):
    r = score(answer(str(pb), str(p1), str(p2)), {"bbox_2d": gb, "point_2d": [g1, g2]}, mode)
    assert all(0.0 <= v <= 1.0 for k, v in r.items() if k != "total")
    assert 0.0 <= r["total"] <= (4.0 if mode == "soft" else 8.0) + 1e-9


@settings(max_examples=200, deadline=None)
@given(a=box_st, b=box_st, p1=pt_st, p2=pt_st, g1=pt_st, g2=pt_st)
@example(a=[0.0, 0.0, 1.0, 1.0], b=[0.0, 0.0, 1.0, 1.0], p1=[0.0, 124.0], p2=[0.0, 125.0], g1=[0.0, 125.0],
         g2=[0.0, 3.6943826934909367])  # a sliver lens: found by hypothesis in CI
def test_symmetries(a, b, p1, p2, g1, g2):
    assert box_iou(a, b) == pytest.approx(box_iou(b, a))
    assert 0.0 <= box_iou(a, b) <= 1.0
    assert points_disc_overlap([p1, p2], [g1, g2]) == pytest.approx(points_disc_overlap([g1, g2], [p1, p2]))
    assert points_disc_overlap([p1, p2], [g1, g2]) == pytest.approx(points_disc_overlap([p2, p1], [g2, g1]))
    assert points_align_error([p1, p2], [g1, g2], b) == pytest.approx(points_align_error([p1, p2], [g2, g1], b))
