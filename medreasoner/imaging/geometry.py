"""Pure geometry on boxes and points in pixel coordinates (x right, y down).

A box is (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; a point is (x, y). Coordinates are continuous:
pixel i spans [i, i+1), so an image of width W has x in [0, W].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]
Point = tuple[float, float]


def is_finite(values: Sequence[float]) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def order_box(box: Sequence[float]) -> tuple[Box, bool]:
    """Return the box with corners ordered, and whether they had to be swapped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    fixed = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
    return fixed, fixed != (x1, y1, x2, y2)


def clip_box(box: Box, width: float, height: float) -> tuple[Box, bool]:
    """Clip a box to [0, width] x [0, height]; also report whether anything changed."""
    x1, y1, x2, y2 = box
    clipped = (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )
    return clipped, clipped != tuple(box)


def clip_point(point: Point, width: float, height: float) -> tuple[Point, bool]:
    x, y = point
    clipped = (min(max(x, 0.0), width), min(max(y, 0.0), height))
    return clipped, clipped != tuple(point)


def box_area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_inside_fraction(box: Box, width: float, height: float) -> float:
    """Fraction of the box's area that lies inside the image (0 for a box fully outside)."""
    area = box_area(box)
    if area <= 0:
        return 0.0
    clipped, _ = clip_box(box, width, height)
    return box_area(clipped) / area


def scale_box(box: Sequence[float], sx: float, sy: float) -> Box:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def scale_point(point: Sequence[float], sx: float, sy: float) -> Point:
    return (point[0] * sx, point[1] * sy)


def point_in_box(point: Sequence[float], box: Sequence[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def box_iou(a: Sequence[float], b: Sequence[float], eps: float = 1e-5) -> float:
    """inter / (A1 + A2 - inter + eps), continuous coordinates (no +1 pixel convention)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (box_area(a) + box_area(b) - inter + eps)


def disc_from_diameter(p1: Sequence[float], p2: Sequence[float], eps: float = 1e-5) -> tuple[float, float, float]:
    """(cx, cy, r) of the disc whose diameter is the segment p1-p2 (r gets +eps, as the reference)."""
    return ((p1[0] + p2[0]) / 2.0, (p1[1] + p2[1]) / 2.0, math.dist(p1, p2) / 2.0 + eps)


def lens_area(r1: float, r2: float, d: float) -> float:
    """Intersection area of two discs with radii r1, r2 whose centres are d apart.

    Robust at the edges: disjoint (0), one inside the other (smaller disc), and acos arguments
    clamped to [-1, 1] against rounding.
    """
    if r1 < r2:  # one fixed argument order: the rounding, and so the result, is symmetric
        r1, r2 = r2, r1
    if r1 <= 0 or r2 <= 0 or d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        return math.pi * min(r1, r2) ** 2
    c1 = max(-1.0, min(1.0, (d * d + r1 * r1 - r2 * r2) / (2 * d * r1)))
    c2 = max(-1.0, min(1.0, (d * d + r2 * r2 - r1 * r1) / (2 * d * r2)))
    k = (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    return r1 * r1 * math.acos(c1) + r2 * r2 * math.acos(c2) - 0.5 * math.sqrt(max(0.0, k))
