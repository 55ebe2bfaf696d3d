"""Slicer's real MRML scene and module logics (the ``slicer-core`` wheel) without the application.

What this adds is only what the Slicer application would provide around those C++ logics:
``slicer.mrmlScene``, ``slicer.modules.<name>.logic()`` and a ``slicer.app`` whose IO manager routes
file loading to the same logic calls Slicer's readers make. Everything the tests check (scene,
volumes, segmentations, markups, geometry) is Slicer's own code.
"""

from __future__ import annotations

import types
from pathlib import Path

_STATE = None


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _IOManager:
    """Reading for ``slicer.util.loadVolume``/``loadSegmentation``: the calls Slicer's IO plugins make."""

    def __init__(self, state):
        self.state = state

    def fileType(self, filename):  # noqa: N802 - Slicer's API
        name = str(filename).lower()
        return "SegmentationFile" if name.endswith((".seg.nrrd", ".seg.nii.gz")) else "VolumeFile"

    def loadNodes(self, filetype, properties, loaded_nodes, user_messages=None):  # noqa: N802
        path = str(properties["fileName"])
        name = properties.get("name") or Path(path).name.split(".")[0]
        if filetype == "SegmentationFile":
            node = self.state.segmentations.LoadSegmentationFromFile(path, True, name, None)
        else:
            node = self.state.volumes.AddArchetypeVolume(path, name, 0x8 if properties.get("autoWindowLevel") else 0)
        if node is None:
            return False
        loaded_nodes.AddItem(node)
        return True


class _App:
    def __init__(self, state):
        self._io, self._logic = _IOManager(state), state.app_logic

    def coreIOManager(self):  # noqa: N802
        return self._io

    def applicationLogic(self):  # noqa: N802
        return self._logic

    def processEvents(self):  # noqa: N802
        pass

    def testingEnabled(self):  # noqa: N802
        return True


def init():
    """Create the scene and logics once and install the globals ``slicer.util`` expects."""
    global _STATE
    if _STATE is not None:
        return _STATE
    import slicer
    from vtkmodules.vtkCommonCore import vtkCollection, vtkOutputWindow

    out = vtkOutputWindow()
    out.SetDisplayModeToAlwaysStdErr()
    vtkOutputWindow.SetInstance(out)
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
    state = types.SimpleNamespace(scene=scene, app_logic=app_logic)

    def register(logic, name):
        logic.SetMRMLScene(scene)  # registers node classes (and the segmentation converter rules)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        return logic

    state.colors = register(slicer.vtkMRMLColorLogic(), "Colors")
    state.volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    state.segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    state.markups = register(slicer.vtkSlicerMarkupsLogic(), "Markups")
    state.subject_hierarchy = register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(volumes=_Module(state.volumes), segmentations=_Module(state.segmentations),
                                           markups=_Module(state.markups), colors=_Module(state.colors),
                                           subjecthierarchy=_Module(state.subject_hierarchy))
    slicer.app = _App(state)
    _STATE = state
    return state


def scene_snapshot(scene) -> list:
    """What a test compares before/after: every node's class and name, and segment names per segmentation."""
    out = []
    nodes = scene.GetNodes()
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        entry = (node.GetClassName(), node.GetName())
        if node.IsA("vtkMRMLSegmentationNode"):
            seg = node.GetSegmentation()
            entry += tuple(seg.GetNthSegment(k).GetName() for k in range(seg.GetNumberOfSegments()))
        out.append(entry)
    return sorted(out, key=str)
