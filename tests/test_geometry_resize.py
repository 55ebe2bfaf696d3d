"""Coordinates survive the trip to the model's pixel space and back exactly."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medreasoner.imaging.geometry import clip_box, order_box, point_in_box
from medreasoner.imaging.resize import ResizeMap, target_size
from medreasoner.models.crm.base import answer_in_original_pixels

sizes = st.integers(min_value=2, max_value=4096)
coords = st.floats(min_value=0, max_value=1.0)


@given(ow=sizes, oh=sizes, mw=sizes, mh=sizes, fx=coords, fy=coords)
def test_round_trip_point(ow, oh, mw, mh, fx, fy):
    m = ResizeMap(ow, oh, mw, mh)
    p = (fx * ow, fy * oh)
    back = m.point_to_orig(m.point_to_model(p))
    assert back == pytest.approx(p, rel=1e-12, abs=1e-9)


@given(ow=sizes, oh=sizes, mw=sizes, mh=sizes)
def test_round_trip_box_corners_map_to_image_corners(ow, oh, mw, mh):
    m = ResizeMap(ow, oh, mw, mh)
    assert m.box_to_orig((0, 0, mw, mh)) == pytest.approx((0, 0, ow, oh))


def test_model_answer_maps_to_original_pixels():
    # The model saw 840x840; the image is 512 wide and 256 high.
    m = ResizeMap(512, 256, 840, 840)
    text = "<answer>{'bbox': [84, 168, 420, 840], 'points_1': [210, 420], 'points_2': [0, 0]}</answer>"
    a = answer_in_original_pixels(text, m)
    assert a.box == pytest.approx((51.2, 51.2, 256.0, 256.0))
    assert a.points == [pytest.approx((128.0, 128.0)), pytest.approx((0.0, 0.0))]


def test_target_size_variants():
    assert target_size(100, 50, 840) == (840, 840)
    assert target_size(100, 50, None) == (100, 50)
    assert target_size(100, 50, (64, 32)) == (64, 32)


def test_box_helpers():
    assert order_box((5, 6, 1, 2)) == ((1.0, 2.0, 5.0, 6.0), True)
    assert clip_box((-1, 2, 12, 8), 10, 10) == ((0, 2, 10, 8), True)
    assert point_in_box((1, 1), (0, 0, 2, 2)) and not point_in_box((3, 1), (0, 0, 2, 2))
