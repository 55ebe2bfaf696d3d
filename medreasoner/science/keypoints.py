"""Ground truth (box + two key points) derived from a binary mask, as U-MRG defines it.

The CRM is trained to answer a tight box and two points that lie well inside the target, so that a
promptable segmenter given them cannot leak into the background. The points are:

- P1, the deepest interior pixel (largest Euclidean distance to the background);
- P2, the deepest pixel among those farther from P1 than the median mask pixel, so that the two
  points spread over the structure instead of clustering at its centre.

Points are integer pixel indices (x, y); the box is in continuous coordinates (pixel i spans
[i, i+1)), the convention of ``medreasoner.imaging.geometry``. Ties are broken by the first pixel in
row-major order, so the result never depends on floating-point luck or library versions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medreasoner.errors import InputError

Pixel = tuple[int, int]


def _as_mask(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise InputError(f"a mask must be 2D (H, W), got shape {m.shape}")
    m = m > 0
    if not m.any():
        raise InputError("the mask is empty: no box or key points can be derived from it")
    return m


def box_from_mask(mask: Any) -> tuple[float, float, float, float]:
    """Tight box ``(xmin, ymin, xmax + 1, ymax + 1)``: it covers every mask pixel and nothing more."""
    m = _as_mask(mask)
    ys, xs = np.nonzero(m)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def distance_map(mask: Any) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest background pixel (0 off the mask).

    The mask is padded with one pixel of background first: pixels on the image border count as
    boundary pixels, otherwise a mask touching the border would look infinitely deep there.
    """
    m = _as_mask(mask)
    return ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]


def keypoints_from_mask(mask: Any) -> tuple[Pixel, Pixel]:
    """The two key points ``((x1, y1), (x2, y2))``; both are mask pixels.

    P1 is the argmax of the distance map. P2 is the argmax of the distance map over the mask
    pixels strictly farther from P1 than the median distance from P1; when there are none (tiny
    masks such as a pixel with two neighbours) it is the mask pixel farthest from P1. P1 != P2
    whenever the mask has at least two pixels.
    """
    m = _as_mask(mask)
    depth = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    y1, x1 = np.unravel_index(int(np.argmax(depth)), depth.shape)  # argmax: first in row-major order
    ys, xs = np.nonzero(m)  # row-major order
    # Squared integer distances: exact comparisons, and the same "> median" set as true distances.
    d2 = (xs.astype(np.int64) - x1) ** 2 + (ys.astype(np.int64) - y1) ** 2
    far = d2 > np.median(d2)
    if far.any():
        i = int(np.argmax(np.where(far, depth[ys, xs], -1.0)))
    else:
        i = int(np.argmax(d2))
    return (int(x1), int(y1)), (int(xs[i]), int(ys[i]))


def ground_truth_from_mask(mask: Any) -> dict:
    """``{"bbox_2d": [x1, y1, x2, y2], "point_2d": [[x, y], [x, y]]}``, the U-MRG ground truth."""
    p1, p2 = keypoints_from_mask(mask)
    return {"bbox_2d": list(box_from_mask(mask)), "point_2d": [list(p1), list(p2)]}
