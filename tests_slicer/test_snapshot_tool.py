"""`make slicer-snapshot`'s tool: a local run through the Lib, then Slicer's own slice view as a PNG.

Run here on the blob phantom with the CRM test double (a deterministic box): the segment's
pixels in the picture must all sit inside the answer's box, drawn where the ROI is.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import slicer
from conftest import DOUBLE, MAIN_PYTHON, ROOT, WORKER_ENV, blob_volume
from MedReasonerLib.parameters import RunSettings
from MedReasonerLib.snapshot import ras_to_png_pixel, render_slice_view
from PIL import Image
from test_snapshot_render import convex_hull, inside

sys.path.insert(0, str(ROOT / "tools"))
import slicer_snapshot  # noqa: E402

pytestmark = pytest.mark.needs_worker


def test_snapshot_shows_the_segment_inside_the_box(tmp_path, scene):
    volume = blob_volume(tmp_path / "axial.nrrd", np.eye(3), n=8, size=64)
    settings = RunSettings(crm="double", crm_backend="test-brightest", device="cpu", key_slice_mode="number",
                           key_slice=3, slice_range="2:6", extra_worker_args=f"--plugins {DOUBLE} --batch-size 1")
    out = tmp_path / "snap.png"
    info = slicer_snapshot.snapshot(str(volume), "Where is the liver lesion?", settings, str(out),
                                    python=MAIN_PYTHON, env=WORKER_ENV, size=(400, 360))
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (360, 400, 3) and img.std() > 5
    # the same view without the segment: what differs is the segment's overlay
    seg_node = slicer.mrmlScene.GetNodeByID(info["segmentation_node_id"])
    seg_node.GetDisplayNode().SetVisibility(False)
    bare = tmp_path / "bare.png"
    render_slice_view(slicer.mrmlScene.GetNodeByID(info["volume_node_id"]), str(bare), ras_offset=info["offset"],
                      size=(400, 360))
    overlay = np.abs(img - np.asarray(Image.open(bare).convert("RGB")).astype(int)).sum(axis=2) > 30
    red = np.argwhere(overlay)[:, ::-1].astype(float)  # (col, row)
    r, g, b = img[overlay].mean(axis=0)
    assert len(red) > 50 and r > g + 40 and r > b + 40  # the segment's colour (the first of the palette, red)
    box = slicer.mrmlScene.GetNodeByID(info["roi_node_id"])
    bounds = [0.0] * 6
    box.GetObjectBounds(bounds)
    m = slicer.util.arrayFromVTKMatrix(box.GetObjectToNodeMatrix())
    corners = [ras_to_png_pixel(info, (m @ np.array([x, y, z, 1.0]))[:3])
               for x in bounds[:2] for y in bounds[2:4] for z in bounds[4:]]
    hull = convex_hull(np.array(corners))
    assert inside(hull, red, tol=2.5).all(), "segment pixels outside the box"
    # and the box is where the CRM's answer put it: the record's corners project onto the hull
    assert seg_node.GetSegmentation().GetNumberOfSegments() == 1
    pts = slicer.util.arrayFromMarkupsControlPoints(slicer.mrmlScene.GetNodeByID(info["points_node_id"]))
    px = np.array([ras_to_png_pixel(info, p) for p in pts])
    assert inside(hull, px, tol=1.0).all()
