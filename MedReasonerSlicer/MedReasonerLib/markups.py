"""A result's box and key points as markups: an ROI on the key slice and two fiducials, in RAS.

The result record gives the key slice's box as two opposite corners and the key points in LPS
millimetres (``box_corners_lps``, ``points_lps``). The ROI is oriented like the volume's voxel axes
(the core slices along them), so it is exact for oblique volumes too; it is one slice thick.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(point: Sequence[float]) -> np.ndarray:
    return np.asarray(point, float)[:3] * LPS_TO_RAS


def volume_directions(volume_node) -> np.ndarray:
    """3x3 IJK-to-RAS direction matrix (columns = voxel axes) of a volume node."""
    dirs = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(dirs)
    return dirs


def roi_geometry(volume_node, corners_lps: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre RAS, size along the volume's axes in mm, 4x4 object-to-node matrix) of the key-slice box."""
    dirs = volume_directions(volume_node)
    a, b = (lps_to_ras(c) for c in corners_lps)
    centre = (a + b) / 2.0
    extent = np.abs(dirs.T @ (b - a))  # the box in the volume's axes: two sides, ~0 across the slice
    spacing = np.asarray(volume_node.GetSpacing(), float)
    thin = int(np.argmin(extent / spacing))  # the slice normal: one voxel thick
    extent[thin] = spacing[thin]
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = dirs
    return centre, extent, object_to_node


def add_box(scene, volume_node, corners_lps, name: str, colour):
    """A locked ROI node around the box on the key slice."""
    import slicer

    centre, size, object_to_node = roi_geometry(volume_node, corners_lps)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    roi.SetCenter(*[float(v) for v in centre])
    roi.SetSize(*[float(v) for v in size])
    roi.SetLocked(True)
    _colour(roi, colour)
    return roi


def add_points(scene, points_lps, name: str, colour):
    """A locked fiducial node with the two key points, labelled P1 and P2."""
    import vtk

    fid = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    for k, p in enumerate(points_lps):
        fid.AddControlPoint(vtk.vtkVector3d(*[float(v) for v in lps_to_ras(p)]), f"P{k + 1}")
    fid.SetLocked(True)
    _colour(fid, colour)
    return fid


def _colour(node, colour) -> None:
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*colour)
        display.SetColor(*colour)


def roi_corners_ras(roi) -> list[np.ndarray]:
    """The ROI's two opposite corners in RAS (for checks and for jumping views)."""
    import slicer

    bounds = [0.0] * 6
    roi.GetObjectBounds(bounds)
    m = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    lo = m @ np.array([bounds[0], bounds[2], bounds[4], 1.0])
    hi = m @ np.array([bounds[1], bounds[3], bounds[5], 1.0])
    return [lo[:3], hi[:3]]


def key_slice_centre_ras(record) -> np.ndarray | None:
    """A RAS point on the key slice (the box centre, else the first key point), or None."""
    corners = record.get("box_corners_lps")
    if corners:
        return (lps_to_ras(corners[0]) + lps_to_ras(corners[1])) / 2.0
    points = record.get("points_lps")
    return lps_to_ras(points[0]) if points else None


def _transformed(node, ras, to_world: bool) -> list[float]:
    """A point between a node's own RAS and world RAS (what the views show), through its parent transform."""
    import vtk

    point = [float(v) for v in list(ras)[:3]]
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return point
    transform = vtk.vtkGeneralTransform()
    (parent.GetTransformToWorld if to_world else parent.GetTransformFromWorld)(transform)
    return [float(v) for v in transform.TransformPoint(point)]


def to_world(node, ras) -> list[float]:
    return _transformed(node, ras, True)


def to_local(node, ras) -> list[float]:
    return _transformed(node, ras, False)
