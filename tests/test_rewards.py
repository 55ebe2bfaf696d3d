"""Rewards pinned to hand-computed values, plus property tests for bounds and symmetry."""

import json
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from medreasoner.imaging.geometry import box_iou, lens_area
from medreasoner.science.rewards import (
    BASE_KEYS,
    HARD_KEYS,
    MODES,
    SOFT_KEYS,
    box_align_error,
    box_scale_error,
    component_rewards,
    lens_area_with_tolerance,
    mode_keys,
    penalize,
    points_abs_cos,
    points_align_error,
    points_disc_overlap,
    reward_disc_overlap,
    score,
    sexp,
    slog,
)

GT = {"bbox_2d": [5, 0, 15, 10], "point_2d": [[8, 5], [12, 5]]}


def answer(box="[0, 0, 10, 10]", p1="[2, 5]", p2="[8, 5]", think="The target is left."):
    return f"<think>{think}</think><answer>{{'bbox': {box}, 'points_1': {p1}, 'points_2': {p2}}}</answer>"


def test_penalize_rounds_like_the_reference():
    # 0.7 * 0.1 + (1 - 0.7) * 0.1 * (0.25 + 0.5) / 2 = 0.08125 -> 0.0812 (the degenerate-box floor)
    assert penalize(0.1, 0.25, 0.5) == 0.0812
    # 0.7 * 0.001 + 0.30000000000000004 * 0.001 * 0.5 = 0.00085 + 1 ulp -> 0.0009 (0.3 would give 0.0008)
    assert penalize(0.001, 0.5, 0.5) == 0.0009
    assert penalize(1.3633, 1, 0.5) == 1.0 and penalize(-0.2, 1, 1) == 0.0  # clipped to [0, 1]


def test_smoothing_functions():
    assert slog(0) == pytest.approx(0.1) and slog(1) == pytest.approx(1.0)
    assert slog(1 / 3) == pytest.approx(0.55)  # 0.9 * ln 2 / ln 4 + 0.1
    assert sexp(0, 1) == pytest.approx(1.0, abs=1e-7) and sexp(2, 1) == pytest.approx(0.1)
    assert sexp(1, 1) == pytest.approx(0.55)  # the midpoint of the sigmoid
    assert sexp(0.98026, 0.5) == pytest.approx(0.30130, abs=1e-4)


def test_soft_components_by_hand():
    r = score(answer(), GT, "soft")
    assert r["format_think"] == 1.0 and r["format_answer"] == 1.0
    # IoU = 50 / (150 + 1e-5) -> slog 0.549999978; GT points: one inside the predicted box -> 0.5; equal
    # areas -> 1: 0.549999978 * (0.7 + 0.3 * 0.75) = 0.508749980 -> rounded to 4 places 0.5087
    assert r["bbox_iou"] == 0.5087
    # discs r=3 at (5,5) and r=2 at (10,5) touch: overlap 0 -> slog 0.1; one point out -> 0.5;
    # the predicted points are 6 px apart -> spread 0.5: 0.1 * (0.7 + 0.3 * 0.5) = 0.085
    assert r["points_dice"] == 0.085
    assert all(r[k] == 0.0 for k in HARD_KEYS)
    assert r["total"] == pytest.approx(1 + 1 + 0.5087 + 0.085, abs=1e-12)


def test_hard_components_by_hand():
    r = score(answer(), GT, "hard")
    # mean |corner diff| = 2.5, / (diag 14.1421356 + 1e-5) = 0.1767766 -> sexp(., 1) = 0.9695879;
    # box factors (0.5, 1): * 0.925 = 0.8968688 -> 0.8969
    assert r["bbox_align"] == 0.8969
    assert r["bbox_scale"] == 0.925  # same size and shape: sexp(0, .5) = 0.99999999 * 0.925 -> 0.925
    # order-free point error: 2.5 / 14.1421456 -> 0.9695879; point factors (0.5, 0.5): * 0.85 -> 0.8241
    assert r["points_align"] == 0.8241
    assert r["points_angle"] == 0.85  # parallel vectors: |cos| = 1 - 1e-9 -> slog ~ 1 -> 0.85
    assert r["total"] == pytest.approx(sum(r[k] for k in SOFT_KEYS + HARD_KEYS))


def test_bbox_scale_by_hand():
    gt = {"bbox_2d": [0, 0, 10, 10], "point_2d": [[2, 5], [8, 5]]}
    r = score(answer(box="[0, 0, 20, 10]"), gt, "hard")
    # ln 2 for area and aspect (1e-6 guards): sqrt(2) * ln 2 = 0.9802578 -> sexp(., 0.5) = 0.3013356;
    # area 200 is not < 2 * 100 -> 0.5; both GT points inside the predicted box -> 1:
    # 0.3013356 * (0.7 + 0.3 * 0.75) = 0.2787355 -> 0.2787
    assert r["bbox_scale"] == 0.2787


@pytest.mark.parametrize("completion,think,ans", [
    ("no tags at all", 0.0, 0.0),
    ("<think>  </think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5], 'points_2': [8, 5]}</answer>", 0.2, 1.0),
    ("<think>t</think><answer>left upper lobe</answer>", 1.0, 0.2),
    ("<think>t</think><answer>[1, 2]</answer>", 1.0, 0.2),  # JSON, but not an object
    ("<think>t</think><answer>" + "[" * 3000 + "]" * 3000 + "</answer>", 1.0, 0.2),  # too deep: still 0.2
    ("<think>t</think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5]}</answer>", 1.0, 0.4),
    ("<think>t</think><answer>{'bbox': [0, 0, 10, 10], 'points_1': [2, 5], 'points_2': [8, 5]}", 1.0, 0.0),
    (answer(box="[0, 0, 10]"), 1.0, 0.6),
    (answer(p1="[2]"), 1.0, 0.6),
    (answer(box="[0, 0, 10]", p2="['a', 5]"), 1.0, 0.4),
    (answer(p1="['2', 5]"), 1.0, 0.6),  # string numbers are not numbers
    (answer(box="[true, 0, 10, 10]"), 1.0, 1.0),  # booleans count as numbers, as in the reference
    (answer(box="[0, 0, NaN, 10]", p1="[Infinity, 5]"), 1.0, 1.0),  # so do NaN and infinities
])
def test_format_rewards(completion, think, ans):
    r = score(completion, GT, "soft")
    assert (r["format_think"], r["format_answer"]) == (think, ans)


# --- degenerate geometry, pinned to the reference's values ------------------------------------------
# Against GT = box [5, 0, 15, 10], points (8, 5), (12, 5), with the predicted points = the GT points
# unless a case says otherwise. Shared arithmetic:
# * a box term whose IoU is 0: slog(0) = 0.1. The GT points lie outside a degenerate box (x 0.5 each
#   -> 0.25) and its clamped area 0 is not in (50, 200) (-> 0.5): 0.1 * (0.7 + 0.3 * 0.375) = 0.08125,
#   rounded to 4 places (binary 0.081249...) -> 0.0812.
# * points equal to the GT points: identical discs r = 2 + 1e-5, nested -> 2 pi r^2 / (pi r^2 + 1e-5)
#   = 2 - 4e-7 -> slog = 1.3633 (the overlap is twice an IoU) -> factors (inside 1, 4 px apart 0.5):
#   1.3633 * 0.925 = 1.261 -> clipped to 1. Hard: align error 0 -> sexp = 0.99999999 -> * 0.925
#   -> 0.925; parallel -> |cos| ~ 1 -> 0.925.
# * hard box terms all fall together when any of them raises (the reference's one try block).
DEGENERATE = {
    # x corners swapped: soft IoU floor 0.0812; hard: area -10 * 10 + 1e-6 < 0 has no log -> raises
    "inverted_x": (answer(box="[15, 0, 5, 10]", p1="[8, 5]", p2="[12, 5]"),
                   {"bbox_iou": 0.0812, "points_dice": 1.0, "total": 3.0812},
                   {"bbox_iou": 0.0, "bbox_align": 0.0, "bbox_scale": 0.0, "points_dice": 1.0,
                    "points_align": 0.925, "points_angle": 0.925, "total": 4.85}),
    # both axes swapped: area and aspect are positive again. Align: mean |diff| = 10 / 14.1421456
    # = 0.7071063 -> sexp(., 1) = 0.7553740 * 0.8125 = 0.6137414 -> 0.6137; scale: w h = 100 and
    # w / h = 1 as the GT -> 0 -> sexp(0, .5) = 0.99999999 * 0.8125 -> 0.8125
    "inverted_xy": (answer(box="[15, 10, 5, 0]", p1="[8, 5]", p2="[12, 5]"),
                    {"bbox_iou": 0.0812, "total": 3.0812},
                    {"bbox_iou": 0.0812, "bbox_align": 0.6137, "bbox_scale": 0.8125, "total": 6.3574}),
    # zero width: align: (5 + 10 + 5 + 10) / 4 = 7.5 / 14.1421456 = 0.5303297 -> sexp(., 1):
    # (1 / (1 + e^(3 * -0.4696703)) - 0.0474259) / (0.9525741 - 0.0474259 + 1e-8) = 0.8354256
    # -> * 0.9 + 0.1 = 0.8518830 -> * 0.8125 = 0.6921550 -> 0.6922;
    # scale: ln(1e-6 / 100.000001) = -18.42, ln(1e-6 / 1.000001) = -13.82 -> capped at 1 ->
    # sexp(1, .5) = (0.1824255 - 0.0109869) / (0.8175745 - 0.0109869) * 0.9 + 0.1 = 0.2912932
    # -> * 0.8125 = 0.2366757 -> 0.2367
    "zero_width": (answer(box="[10, 10, 10, 20]", p1="[8, 5]", p2="[12, 5]"),
                   {"bbox_iou": 0.0812, "total": 3.0812},
                   {"bbox_iou": 0.0812, "bbox_align": 0.6922, "bbox_scale": 0.2367, "total": 5.8601}),
    # zero height: the aspect ratio divides by 0 -> the hard box terms are 0, the soft IoU is not
    "zero_height": (answer(box="[5, 0, 15, 0]", p1="[8, 5]", p2="[12, 5]"),
                    {"bbox_iou": 0.0812, "total": 3.0812},
                    {"bbox_iou": 0.0, "bbox_align": 0.0, "bbox_scale": 0.0, "total": 4.85}),
    # coincident points with the exact box. Box: IoU 100 / (100 + 1e-5) -> 1 - 4e-8 -> 1.0 (all three).
    # Points: disc r = 1e-5 at (8, 5) vs r = 2.00001 at (10, 5), d = 2 <= |r1 - r2| + 1e-5: nested ->
    # overlap 2 pi 1e-10 / (pi 4.00004 + 1e-5) = 5e-11 -> slog 0.1; factors (inside 1, spread 0 -> 0.5):
    # 0.1 * 0.925 = 0.0925. Align: min(0 + 2, 2 + 0) / 2 = 1 / 14.1421456 = 0.0707106 -> sexp(., 1)
    # = 0.9895026 * 0.925 = 0.9152899 -> 0.9153. Angle: a zero vector -> cos 0 -> slog(0) 0.1 -> 0.0925
    "coincident_points": (answer(box="[5, 0, 15, 10]", p1="[8, 5]", p2="[8, 5]"),
                          {"bbox_iou": 1.0, "points_dice": 0.0925, "total": 3.0925},
                          {"bbox_align": 1.0, "bbox_scale": 1.0, "points_dice": 0.0925, "points_align": 0.9153,
                           "points_angle": 0.0925, "total": 6.1003}),
    # coincident points outside the GT box, far from the GT disc: overlap 0 -> 0.1; factors (0.25,
    # 0.5) -> 0.1 * 0.8125 = 0.08125 -> 0.0812 (the reference's "~0.08" floor)
    "coincident_outside": (answer(box="[5, 0, 15, 10]", p1="[0, 30]", p2="[0, 30]"),
                           {"points_dice": 0.0812}, {"points_dice": 0.0812, "points_angle": 0.0812}),
    # points on the GT box's edges (inside: edges count), exactly 10 px apart (not > 10: 0.5): disc
    # r 5.00001 around the GT disc r 2.00001, same centre: 2 * 4.00004 / 25.0001 = 0.3200019 ->
    # ln(1.9600056) / ln 4 = 0.4854288 -> * 0.9 + 0.1 = 0.5368860 -> * 0.925 = 0.4966196 -> 0.4966
    "points_10px_apart": (answer(box="[5, 0, 15, 10]", p1="[5, 5]", p2="[15, 5]"),
                          {"points_dice": 0.4966, "total": 3.4966}, {"points_dice": 0.4966}),
    # booleans are numbers: box [1, 0, 15, 10]: GT points inside (1), area 140 in (50, 200) (1);
    # IoU 100 / 140.00001 = 0.7142857 -> ln(3.1428571) / ln 4 = 0.8260383 -> * 0.9 + 0.1 = 0.8434345
    # -> 0.8434. Point (1, 5) is outside (0.5), 11 px from (12, 5) (> 10: 1) -> * 0.925; disc r 5.50001
    # at (6.5, 5) holds the GT disc (d 3.5 <= 3.5 + 1e-5): 2 * 4.00004 / 30.25011 = 0.2644645
    # -> slog 0.4792114 -> * 0.925 = 0.4432706 -> 0.4433
    "booleans": (answer(box="[true, false, 15, 10]", p1="[true, 5]", p2="[12, 5]"),
                 {"format_answer": 1.0, "bbox_iou": 0.8434, "points_dice": 0.4433}, {"bbox_iou": 0.8434}),
    # an int too large for a float: the IoU's union + 1e-5 overflows -> the box terms are 0
    "huge_int": (answer(box=f"[5, 0, {10 ** 400}, 10]", p1="[8, 5]", p2="[12, 5]"),
                 {"format_answer": 1.0, "bbox_iou": 0.0, "total": 3.0}, {"bbox_iou": 0.0, "bbox_scale": 0.0}),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_cases_match_reference_values(name):
    completion, soft, hard = DEGENERATE[name]
    for mode, expected in (("soft", soft), ("hard", hard)):
        r = score(completion, GT, mode)
        got = {k: r[k] for k in expected}
        assert got == pytest.approx(expected, abs=1e-12), (mode, got)


def test_nan_coordinates_propagate_as_in_the_reference():
    # NaN in a box: max(0.0, nan) = 0.0 clamps the area and the IoU to 0 -> the 0.0812 floor; the hard
    # align and scale terms take |nan - 15| and ln(nan) and stay NaN (and so does the total)
    soft = score(answer(box="[0, 0, NaN, 10]", p1="[8, 5]", p2="[12, 5]"), GT, "soft")
    hard = score(answer(box="[0, 0, NaN, 10]", p1="[8, 5]", p2="[12, 5]"), GT, "hard")
    assert soft["bbox_iou"] == hard["bbox_iou"] == 0.0812 and soft["total"] == 3.0812
    assert math.isnan(hard["bbox_align"]) and math.isnan(hard["bbox_scale"]) and math.isnan(hard["total"])
    # NaN in a point: the disc radius is NaN -> NaN overlap; the box terms are unaffected
    r = score(answer(box="[5, 0, 15, 10]", p1="[NaN, 5]", p2="[12, 5]"), GT, "hard")
    assert math.isnan(r["points_dice"]) and math.isnan(r["points_align"]) and math.isnan(r["points_angle"])
    assert r["bbox_iou"] == r["bbox_align"] == r["bbox_scale"] == 1.0
    # infinite corner on a zero-height box: area inf * 0 = NaN -> soft IoU NaN; hard: inf / 0 raises -> 0
    inf = answer(box="[-Infinity, 5, 10, 5]", p1="[8, 5]", p2="[12, 5]")
    assert math.isnan(score(inf, GT, "soft")["bbox_iou"]) and score(inf, GT, "hard")["bbox_iou"] == 0.0


@pytest.mark.parametrize("completion", [
    answer(box="[10, 10, 10, 20]"),
    answer(box="[0, 0, NaN, 10]"),
    answer(p1="[8, 5]", p2="[8, 5]"),
    answer(box="'left'"),
    answer(box=f"[0, 0, {10 ** 400}, 10]", p1=f"[{10 ** 400}, 1]"),
    None,
])
@pytest.mark.parametrize("mode", ["soft", "hard", "base", "base_reference"])
def test_invalid_geometry_never_raises(completion, mode):
    r = score(completion, GT, mode)
    assert all(math.isnan(v) or 0 <= v <= 1 for k, v in r.items() if k != "total")


def test_missing_ground_truth_points_zero_all_geometry():
    # the reference reads gt["point_2d"][0] in both blocks: without it every geometric term fails
    r = score(answer(), {"bbox_2d": [5, 0, 15, 10]}, "hard")
    assert r["format_think"] == r["format_answer"] == 1.0 and r["total"] == 2.0


# --- base: the reference's (bug included) and the corrected one -------------------------------------
def dq(box="[5, 0, 15, 10]", p1="[8, 5]", p2="[12, 5]", think="t"):
    """A double-quoted answer (the reference's base mode cannot decode the single-quoted one)."""
    return f'<think>{think}</think><answer>{{"bbox": {box}, "points_1": {p1}, "points_2": {p2}}}</answer>'


# (format, json, iou, l1, points) for base_reference and base. Shared: the reference's IoU and L1 are
# always 0 (its bug: they call .strip() on the GT dict and fail); IoU is Seg-Zero's +1-pixel one.
BASE_CASES = {
    # single quotes: json.loads fails without the quote swap -> only the format counts
    "single_quoted": (answer("[5, 0, 15, 10]", "[8, 5]", "[12, 5]"), (1, 0, 0, 0, 0), (1, 1, 1, 1, 1)),
    # exact box: pixel IoU 121 / 121 = 1 > 0.5; L1 0 < 10; points inside, 0 px off
    "double_quoted": (dq(), (1, 1, 0, 0, 1), (1, 1, 1, 1, 1)),
    # the old example: pixel IoU 6 * 11 / (121 + 121 - 66) = 0.375 -> 0; L1 (5 + 0 + 5 + 0) / 4 = 2.5 -> 1;
    # points (2, 5), (8, 5) inside [0, 0, 10, 10], mean distance min(6 + 4, 10 + 0) / 2 = 5 -> 1
    "partial_overlap": (dq("[0, 0, 10, 10]", "[2, 5]", "[8, 5]"), (1, 1, 0, 0, 1), (1, 1, 0, 1, 1)),
    # left half of the GT box: pixel IoU 6 * 11 / 121 = 0.545 > 0.5 -> 1 (continuous 50 / 100 = 0.5 is not);
    # L1 (0 + 0 + 5 + 0) / 4 = 1.25 -> 1; (12, 5) lies outside [5, 0, 10, 10] -> points 0
    "half_box": (dq("[5, 0, 10, 10]"), (1, 1, 0, 0, 0), (1, 1, 1, 1, 0)),
    # inverted x: no strict overlap -> IoU 0; L1 (10 + 0 + 10 + 0) / 4 = 5 -> 1; 15 <= 8 fails -> points 0
    "inverted": (dq("[15, 0, 5, 10]"), (1, 1, 0, 0, 0), (1, 1, 0, 1, 0)),
    # zero width: max x1 = min x2 = 10 is no strict overlap -> 0; L1 (5 + 10 + 5 + 10) / 4 = 7.5 -> 1;
    # (8, 5) is not inside x in [10, 10] -> 0
    "zero_width": (dq("[10, 10, 10, 20]"), (1, 1, 0, 0, 0), (1, 1, 0, 1, 0)),
    # element types are not checked and points are int()-ed: "8" -> 8 works; 15.9 -> 15 is inside
    "string_point": (dq(p1='["8", "5"]'), (1, 1, 0, 0, 1), (1, 1, 1, 1, 1)),
    "truncated_point": (dq(p1="[15.9, 5]"), (1, 1, 0, 0, 1), (1, 1, 1, 1, 1)),
    # NaN corner: inter 0, area NaN -> IoU NaN > 0.5 is False; NaN L1 < 10 is False; NaN <= 8 fails
    "nan_corner": (dq("[NaN, 0, 15, 10]"), (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)),
    # a full match is required: a leading space fails the format (the rest is unaffected)
    "leading_space": (" " + dq(), (0, 1, 0, 0, 1), (0, 1, 1, 1, 1)),
    # far box: pixel IoU 0; L1 (95 + 100 + 105 + 110) / 4 = 102.5 -> 0; (8, 5) is outside it -> 0
    "far_box": (dq("[100, 100, 120, 120]"), (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)),
    # big box holding the points: IoU 121 / 401^2 -> 0; L1 (5 + 0 + 385 + 390) / 4 = 195 -> 0.
    # Points 60 px off: min(60 + 60, 56 + 64) / 2 = 60 < 100 -> 1; 150 px off: 300 / 2 = 150 -> 0
    "points_60px": (dq("[0, 0, 400, 400]", "[68, 5]", "[72, 5]"), (1, 1, 0, 0, 1), (1, 1, 0, 0, 1)),
    "points_150px": (dq("[0, 0, 400, 400]", "[158, 5]", "[162, 5]"), (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)),
    # the first {...} anywhere is taken: "{x}" in the reasoning is not JSON -> every answer term 0
    "brace_in_think": (dq(think="see {x}"), (1, 0, 0, 0, 0), (1, 0, 0, 0, 0)),
}


@pytest.mark.parametrize("name", list(BASE_CASES))
def test_base_variants_by_hand(name):
    completion, reference, corrected = BASE_CASES[name]
    for mode, expected in (("base_reference", reference), ("base", corrected)):
        r = score(completion, GT, mode)
        assert tuple(r[k] for k in BASE_KEYS) == expected, mode
        assert r["total"] == sum(expected)


def test_base_iou_failure_leaves_the_l1_term():
    # GT [0, 0, 1, 1] (pixel area 2 * 2 = 4), box [2, 0, -1, 1]: pixel area (-1 - 2 + 1) * 2 = -4, no
    # overlap -> union 0 -> the IoU divides by zero (-> 0), the L1 (2 + 0 + 2 + 0) / 4 = 1 < 10 -> 1
    gt = {"bbox_2d": [0, 0, 1, 1], "point_2d": [[0, 0], [1, 1]]}
    r = score(dq("[2, 0, -1, 1]", "[0, 0]", "[1, 1]"), gt, "base")
    assert (r["base_iou"], r["base_l1"], r["base_points"]) == (0.0, 1.0, 0.0)


def test_modes_and_component_rewards():
    with pytest.raises(ValueError, match="base_reference"):
        score(answer(), GT, "bogus")
    assert MODES == ("soft", "hard", "base", "base_reference")
    gt = json.dumps(GT)
    for mode in MODES:
        funcs = component_rewards(mode)
        assert [f.__name__ for f in funcs] == list(mode_keys(mode))
        total = sum(f([dq()], [gt])[0] for f in funcs)
        assert total == pytest.approx(score(dq(), gt, mode)["total"])


def test_perfect_answer_scores_max():
    gt = {"bbox_2d": [10, 10, 60, 40], "point_2d": [[20, 20], [50, 30]]}
    perfect = answer("[10, 10, 60, 40]", "[20, 20]", "[50, 30]")
    assert score(perfect, gt, "soft")["total"] == pytest.approx(4.0, abs=1e-6)
    assert score(perfect, gt, "hard")["total"] == pytest.approx(8.0, abs=1e-6)
    assert score(perfect, gt, "base")["total"] == 5.0
    assert score(perfect, gt, "base_reference")["total"] == 1.0  # single quotes: only the format counts
    assert score(perfect.replace("'", '"'), gt, "base_reference")["total"] == 3.0  # IoU and L1 stay 0


def test_reward_lens_tolerances():
    # the reward's disc intersection treats discs within 1e-5 of touching as apart, and within 1e-5 of
    # nested as nested (the evaluation's lens_area does not)
    assert lens_area_with_tolerance(1, 1, 2 - 5e-6) == 0.0 and lens_area(1, 1, 2 - 5e-6) > 0
    assert lens_area_with_tolerance(2, 1, 1 + 5e-6) == math.pi  # exactly pi * 1^2, not the lens formula
    # coincident points still span a disc of radius 1e-5: at the GT disc's centre it is nested ->
    # 2 pi 1e-10 / (pi (2 + 1e-5)^2 + 1e-5) = 6.2832e-10 / 12.5665 = 5.0e-11 (not 0)
    assert reward_disc_overlap([[10, 5], [10, 5]], [[8, 5], [12, 5]]) == pytest.approx(5.0e-11, rel=1e-4)
    assert lens_area_with_tolerance(1, 1, 1) == pytest.approx(2 * math.acos(0.5) - 0.5 * math.sqrt(3))


def test_error_terms_by_hand():
    # 2.5 / (sqrt(200) + 1e-5) = 2.5 / 14.1421456 = 0.17677657 (without the 1e-5: 0.17677670)
    assert box_align_error([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(0.17677657, abs=1e-8)
    assert box_align_error([500, 500, 600, 600], [5, 0, 15, 10]) == 2.0  # clipped at 2
    # same pairing: (|0-8| + 0) / 2 + (|20-12| + 0) / 2 = 8; swapped: (12 + 8) / 2 = 10 -> 8 / 2 = 4
    # -> 4 / 14.1421456 = 0.28284251
    assert points_align_error([[0, 5], [20, 5]], [[8, 5], [12, 5]], [5, 0, 15, 10]) == pytest.approx(
        0.28284251, abs=1e-8)
    # w h ratio 4, aspect ratio 1: |ln 4| = 1.386 -> capped at 1
    assert box_scale_error([0, 0, 20, 20], [0, 0, 10, 10]) == 1.0
    # (1e-8 on each length) a zero vector gives |cos| 0; perpendicular 0; opposite 1 - 5e-9
    assert points_abs_cos([[1, 1], [1, 1]], [[0, 0], [4, 0]]) == 0.0
    assert points_abs_cos([[0, 0], [0, 3]], [[0, 0], [4, 0]]) == 0.0
    assert points_abs_cos([[4, 0], [0, 0]], [[0, 0], [4, 0]]) == pytest.approx(1.0, abs=1e-8)
    # a 1e-8 vector: 4e-8 / ((4 + 1e-8) * (1e-8 + 1e-8)) = 0.5, where an exact cosine would be 1
    assert points_abs_cos([[0, 0], [1e-8, 0]], [[0, 0], [4, 0]]) == pytest.approx(0.5, abs=1e-8)


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
