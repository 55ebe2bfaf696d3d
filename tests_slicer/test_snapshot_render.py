"""Slicer's own slice view rendered offscreen (slicer-core wheel): background volume, a segment, an ROI and
key points land where their RAS coordinates say, mapped with ras_to_png_pixel.

The headless scene comes from conftest.py (tools/slicer_headless.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk
from MedReasonerLib.snapshot import ras_to_png_pixel, render_slice_view
from PIL import Image

SHAPE_KJI = (30, 120, 140)
BLOCK = {"i": (40, 62), "j": (50, 68), "k": (11, 19)}  # half-open voxel ranges of the red segment
MARGIN = 3  # ROI margin around the block, voxels
SIZE = (480, 400)


def reddish(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., c].astype(int) for c in range(3))
    return (r > 150) & (g < 100) & (b < 100) & (r - g > 80)


def bluish(img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., c].astype(int) for c in range(3))
    return (b > 150) & (r < 100) & (g < 100)


def convex_hull(pts: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull (monotone chain) of 2D points."""
    pts = sorted(map(tuple, pts))

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and np.cross(np.subtract(out[-1], out[-2]), np.subtract(p, out[-2])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def inside(poly: np.ndarray, pts: np.ndarray, tol: float) -> np.ndarray:
    """Points within `tol` of the inside of a counter-clockwise convex polygon."""
    ok = np.ones(len(pts), bool)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        edge = b - a
        normal = np.array([edge[1], -edge[0]]) / np.linalg.norm(edge)  # outward for counter-clockwise
        ok &= (pts - a) @ normal <= tol
    return ok


def tilted_direction() -> np.ndarray:
    """LPS direction cosines of a volume rotated 15 deg about S (plus a small tilt), like a gantry-tilted scan."""
    c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    t = np.radians(4)
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return rz @ rx


def write_volume(path: str, shape_kji=(30, 120, 140), spacing=(1.1, 1.1, 2.5)) -> None:
    """A CT-like phantom (air, body ellipse, bright organ) written by SimpleITK as NRRD (LPS on disk)."""
    import SimpleITK as sitk

    nk, nj, ni = shape_kji
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    vox = np.full(shape_kji, -1000, np.int16)
    vox[((i - ni / 2) / (ni * 0.45)) ** 2 + ((j - nj / 2) / (nj * 0.42)) ** 2 < 1] = 40
    vox[((i - ni * 0.62) / 14) ** 2 + ((j - nj * 0.5) / 11) ** 2 + ((k - nk / 2) / 6) ** 2 < 1] = 250
    img = sitk.GetImageFromArray(vox)
    img.SetSpacing(spacing)
    img.SetDirection(tilted_direction().ravel().tolist())
    img.SetOrigin((60.0, 40.0, -30.0))
    sitk.WriteImage(img, path, True)


@pytest.fixture(scope="module")
def view_scene(tmp_path_factory):
    """An oblique volume with a red block segment, an ROI around the block and two key points on its slice."""
    d = tmp_path_factory.mktemp("snapshot")
    path = str(d / "oblique.nrrd")
    write_volume(path, SHAPE_KJI)
    vol = slicer.modules.volumes.logic().AddArchetypeVolume(path, "oblique", 0)
    assert vol is not None
    vol.GetDisplayNode().SetAutoWindowLevel(False)
    vol.GetDisplayNode().SetWindowLevel(400, 40)  # soft tissue mid-grey, so the segment fill stays red
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
    directions = ijk_to_ras[:3, :3] / np.array(vol.GetSpacing())
    assert np.abs(directions - np.diag(np.diag(directions))).max() > 0.1, "volume must be oblique"

    mask = np.zeros(SHAPE_KJI, np.uint8)
    (i0, i1), (j0, j1), (k0, k1) = BLOCK["i"], BLOCK["j"], BLOCK["k"]
    mask[k0:k1, j0:j1, i0:i1] = 1
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "block")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("", "block", [1.0, 0.0, 0.0])
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, vol)

    # ROI along the volume axes (as a box found in IJK is), the block plus a margin
    spacing = np.array(vol.GetSpacing())
    centre_ijk = np.array([(i0 + i1 - 1) / 2, (j0 + j1 - 1) / 2, (k0 + k1 - 1) / 2])
    centre = (ijk_to_ras @ np.r_[centre_ijk, 1])[:3]
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = ijk_to_ras[:3, :3] / spacing
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    roi.SetCenter(centre)
    roi.SetSize(*((np.array([i1 - i0, j1 - j0, k1 - k0]) + 2 * MARGIN) * spacing))
    roi.CreateDefaultDisplayNodes()
    roi_display = roi.GetDisplayNode()
    for setter in (roi_display.SetColor, roi_display.SetSelectedColor):
        setter(1.0, 1.0, 0.0)  # yellow outline; no fill or (red/green) handles to mix with the segment's red
    roi_display.SetFillVisibility(False)
    roi_display.SetHandlesInteractive(False)

    offset = float(centre[2])  # axial slice through the block centre
    points = [np.array([centre[0], centre[1], offset]),
              np.array([centre[0] + 30.0, centre[1] + 20.0, offset])]
    fid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "key points")
    fid.CreateDefaultDisplayNodes()
    for setter in (fid.GetDisplayNode().SetColor, fid.GetDisplayNode().SetSelectedColor):
        setter(0.0, 0.2, 1.0)  # blue
    for n, p in enumerate(points):
        fid.AddControlPoint(vtk.vtkVector3d(*p), f"P{n + 1}")
    yield dict(dir=d, vol=vol, seg=seg, roi=roi, fid=fid, offset=offset, points=points)
    for node in (fid, roi, seg, vol):
        slicer.mrmlScene.RemoveNode(node)


def roi_corners(roi) -> np.ndarray:
    size = roi.GetSize()
    m = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    return (m @ np.c_[signs * np.array(size) / 2, np.ones(8)].T).T[:, :3]


def render(view_scene, name: str) -> tuple[dict, np.ndarray]:
    info = render_slice_view(view_scene["vol"], str(view_scene["dir"] / name), ras_offset=view_scene["offset"],
                             size=SIZE)
    return info, np.asarray(Image.open(info["path"]).convert("RGB"))


def test_slice_view_shows_volume_segment_roi_and_points(view_scene):
    info, img = render(view_scene, "axial.png")
    assert Path(info["path"]).is_file()
    assert img.shape == (SIZE[1], SIZE[0], 3) and tuple(info["size"]) == SIZE
    assert info["window_class"] in ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow")
    assert np.asarray(info["xy_to_ras"]).shape == (4, 4)
    assert abs(info["xy_to_ras"][2][3] - view_scene["offset"]) < 1e-3  # the slice plane is at the offset asked

    grey = img.mean(axis=2)
    assert (grey > 30).mean() > 0.2 and grey.std() > 20, "blank view"

    rows, cols = np.nonzero(reddish(img))
    assert len(rows) > 50, "segment not drawn"
    hull = convex_hull(np.array([ras_to_png_pixel(info, c) for c in roi_corners(view_scene["roi"])]))
    outside = ~inside(hull, np.c_[cols, rows].astype(float), tol=2.0)
    assert not outside.any(), f"{outside.sum()} segment pixels outside the ROI, e.g. {np.c_[cols, rows][outside][:5]}"
    # the segment fills most of the block's section, the ROI is only a few voxels bigger
    box = np.c_[cols, rows]
    extent = box.max(axis=0) - box.min(axis=0)
    assert (extent > 0.5 * (hull.max(axis=0) - hull.min(axis=0))).all()

    blue_rows, blue_cols = np.nonzero(bluish(img))
    for p in view_scene["points"]:
        col, row = ras_to_png_pixel(info, p)
        near = np.hypot(blue_cols - col, blue_rows - row) < 6
        assert near.sum() > 10, f"key point {p} not drawn at pixel ({col:.0f}, {row:.0f})"


def test_hidden_segmentation_leaves_no_red(view_scene):
    """The control for the red-pixel count: with the segment hidden the same view has (almost) none."""
    display = view_scene["seg"].GetDisplayNode()
    display.SetVisibility(False)
    try:
        _, img = render(view_scene, "axial_no_segment.png")
    finally:
        display.SetVisibility(True)
    assert reddish(img).sum() < 5


def test_default_offset_is_the_volume_centre_and_scene_is_left_as_found(view_scene):
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    info = render_slice_view(view_scene["vol"], str(view_scene["dir"] / "centre.png"), size=(200, 160))
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before
    bounds = np.zeros(6)
    view_scene["vol"].GetRASBounds(bounds)
    spacing_s = max(view_scene["vol"].GetSpacing())
    assert abs(info["xy_to_ras"][2][3] - (bounds[4] + bounds[5]) / 2) <= spacing_s
    assert tuple(info["size"]) == (200, 160)
