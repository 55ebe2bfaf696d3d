"""A headless Slicer scene for the snapshot tests: real MRML scene and module logics from the
`slicer-core` wheel, plus the globals `slicer.util` and the snapshot renderer expect
(`slicer.mrmlScene`, `slicer.modules.<name>.logic()`, `slicer.app.applicationLogic()`).

Kept minimal (no IO manager): volumes are added with the volumes logic directly."""

from __future__ import annotations

import types

import numpy as np

_NS: types.SimpleNamespace | None = None


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _App:
    """Only what the renderer and slicer.util's array helpers touch; no layoutManager (headless)."""

    def __init__(self, app_logic):
        self._app_logic = app_logic

    def applicationLogic(self):
        return self._app_logic

    def processEvents(self):
        pass


def init() -> types.SimpleNamespace:
    """Create the scene and logics once; reuse a scene another fixture already installed."""
    global _NS
    if _NS is not None:
        return _NS
    import slicer
    from vtkmodules.vtkCommonCore import vtkCollection

    existing = getattr(slicer, "mrmlScene", None)
    app = getattr(slicer, "app", None)
    if existing is not None and app is not None and hasattr(app, "applicationLogic"):
        _NS = types.SimpleNamespace(scene=existing, app_logic=app.applicationLogic())
        return _NS

    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())

    modules = {}
    for name, cls in [("colors", slicer.vtkMRMLColorLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("markups", slicer.vtkSlicerMarkupsLogic),
                      ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic)]:
        logic = cls()
        logic.SetMRMLScene(scene)  # registers the module's node classes
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name.capitalize() if name != "subjecthierarchy" else "SubjectHierarchy", logic)
        modules[name] = _Module(logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)

    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)
    slicer.app = _App(app_logic)
    _NS = types.SimpleNamespace(scene=scene, app_logic=app_logic)
    return _NS


def oblique_direction() -> np.ndarray:
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
    img.SetDirection(oblique_direction().ravel().tolist())
    img.SetOrigin((60.0, 40.0, -30.0))
    sitk.WriteImage(img, path, True)
