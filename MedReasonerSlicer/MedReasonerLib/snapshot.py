"""Slicer's slice view to a PNG.

Headless (slicer-core wheel, no Qt): the view is assembled from the pieces qMRMLSliceView is made of
(a vtkMRMLSliceLogic reformats and window/levels the background volume; a displayable manager group
draws segmentations and markups) on an offscreen render window. Inside the Slicer application the real
Red slice view is grabbed instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import MedReasonerSlicerError

# Offscreen OpenGL windows to try, in order; the first that draws in a probe process wins.
_WINDOW_CLASSES = ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow")
# Slice-view displayable managers for volume glyphs, model intersections, segments and markups.
_SLICE_MANAGERS = (
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
)
_PROBE = """
import sys
from vtkmodules import vtkRenderingOpenGL2 as gl
from vtkmodules.vtkRenderingCore import vtkRenderer, vtkWindowToImageFilter
w = getattr(gl, sys.argv[1])(); w.SetOffScreenRendering(1); w.SetShowWindow(False); w.SetSize(4, 4)
r = vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
f = vtkWindowToImageFilter(); f.SetInput(w); f.ReadFrontBufferOff(); f.Update()
print("PIXEL", f.GetOutput().GetScalarComponentAsDouble(1, 1, 0, 0))
"""
_window_class: str | None = None


def _offscreen_window_class() -> str:
    """The offscreen window class, chosen once per process. Probed in a child process because a
    missing libOSMesa or EGL device crashes Render() instead of failing cleanly."""
    global _window_class
    if _window_class is None:
        preferred = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
        candidates = ([preferred] if preferred else []) + [c for c in _WINDOW_CLASSES if c != preferred]
        for name in candidates:
            try:
                probe = subprocess.run([sys.executable, "-c", _PROBE, name], capture_output=True, text=True,
                                       timeout=120)
            except (OSError, subprocess.SubprocessError):
                continue
            if "PIXEL 255" in probe.stdout:
                _window_class = name
                break
        else:
            raise MedReasonerSlicerError(f"no offscreen OpenGL window draws here (tried {', '.join(candidates)})")
    return _window_class


def _in_slicer_gui() -> bool:
    import slicer

    try:
        return slicer.app.layoutManager() is not None
    except AttributeError:  # no slicer.app, or the headless stand-in without a layout manager
        return False


def _layout_node(scene, class_name: str, layout_name: str):
    nodes = scene.GetNodesByClass(class_name)
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetLayoutName() == layout_name:
            return node
    return None


def _show(slice_logic, volume_node, orientation: str, ras_offset: float | None, size=None) -> None:
    """Background volume, orientation, field of view fitted to the volume, then the slice offset."""
    slice_logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
    if not slice_logic.GetSliceNode().SetOrientation(orientation):
        raise MedReasonerSlicerError(f"unknown slice orientation {orientation!r}")
    if size is not None:
        slice_logic.ResizeSliceNode(*size)
    slice_logic.FitSliceToBackground()  # also puts the slice plane through the volume centre
    if ras_offset is None:
        slice_logic.SnapSliceOffsetToIJK()  # a real slice of the volume, as Slicer's own fit does
    else:
        slice_logic.SetSliceOffset(float(ras_offset))


def _grab(render_window, out_png: str) -> tuple[int, int]:
    from vtkmodules.vtkIOImage import vtkPNGWriter
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    grab = vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()  # the back buffer holds what was just rendered
    grab.Update()
    writer = vtkPNGWriter()
    writer.SetFileName(str(out_png))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    dims = grab.GetOutput().GetDimensions()
    return int(dims[0]), int(dims[1])


def _result(out_png: str, size: tuple[int, int], window, slice_node) -> dict:
    m = slice_node.GetXYToRAS()
    return {"path": str(out_png), "size": size, "window_class": window.GetClassName(),
            "xy_to_ras": [[m.GetElement(r, c) for c in range(4)] for r in range(4)]}


def _render_in_slicer(volume_node, out_png: str, ras_offset: float | None, orientation: str) -> dict:
    """Inside Slicer: show the volume in the real Red view and grab its render window (at the view's size)."""
    import slicer

    widget = slicer.app.layoutManager().sliceWidget("Red")
    if widget is None:
        raise MedReasonerSlicerError("the current layout has no Red slice view")
    _show(widget.sliceLogic(), volume_node, orientation, ras_offset)  # the view keeps the node sized itself
    view = widget.sliceView()
    view.forceRender()
    size = _grab(view.renderWindow(), out_png)
    return _result(out_png, size, view.renderWindow(), widget.sliceLogic().GetSliceNode())


def _render_headless(volume_node, out_png: str, ras_offset: float | None, orientation: str,
                     size: tuple[int, int], scene, app_logic) -> dict:
    import slicer
    from vtkmodules import vtkRenderingOpenGL2
    from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper, vtkRenderer
    from vtkmodules.vtkRenderingUI import vtkGenericRenderWindowInteractor

    window = getattr(vtkRenderingOpenGL2, _offscreen_window_class())()
    window.SetOffScreenRendering(1)
    window.SetShowWindow(False)
    window.SetSize(*size)
    renderer = vtkRenderer()
    renderer.GetActiveCamera().ParallelProjectionOn()
    window.AddRenderer(renderer)
    # displayable managers dereference the window's interactor (observers, widgets): this one needs
    # no display and runs no event loop
    interactor = vtkGenericRenderWindowInteractor()
    interactor.SetRenderWindow(window)

    # view nodes this call adds are removed again: a headless scene has no views of its own
    added = [c for c in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode") if _layout_node(scene, c, "Red") is None]
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    # reuse the scene's Red node: AddSliceNode would leave the logic on an orphan twin of it
    slice_node = _layout_node(scene, "vtkMRMLSliceNode", "Red")
    if slice_node is None:
        slice_node = slice_logic.AddSliceNode("Red")
    else:
        slice_logic.SetSliceNode(slice_node)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in _SLICE_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)

    # the slice logic's output is RGBA already window/levelled to 0..255: show it 1:1 behind the overlays
    mapper = vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    image_actor = vtkActor2D()
    image_actor.SetMapper(mapper)
    image_actor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(image_actor)

    # the segmentation and markups managers find the slice logic through the application logic
    app_logic.GetSliceLogics().AddItem(slice_logic)
    try:
        managers.SetMRMLDisplayableNode(slice_node)
        _show(slice_logic, volume_node, orientation, ras_offset, size)
        mapper.SetInputConnection(slice_logic.GetImageDataConnection())
        window.Render()
        return _result(out_png, _grab(window, out_png), window, slice_node)
    finally:
        app_logic.GetSliceLogics().RemoveItem(slice_logic)
        managers.SetMRMLDisplayableNode(None)
        window.Finalize()
        for class_name in added:
            node = _layout_node(scene, class_name, "Red")
            if node is not None:
                scene.RemoveNode(node)


def render_slice_view(volume_node, out_png: str, *, ras_offset: float | None = None, orientation: str = "Axial",
                      size: tuple[int, int] = (640, 512), scene=None, app_logic=None) -> dict:
    """Render Slicer's slice view of `volume_node` (+ every visible segmentation and markups node in the
    scene) offscreen to `out_png`.

    ras_offset: slice offset (mm along the slice normal, e.g. S for axial); None = the volume centre.
    Returns {"path": out_png, "size": (w, h), "window_class": render window class name, "xy_to_ras": the
    slice node's XYToRAS after fitting (4x4 nested list), for ras_to_png_pixel}. Inside the Slicer
    application (no scene/app_logic given) the real Red view is grabbed at its own size."""
    import slicer

    if volume_node is None:
        raise MedReasonerSlicerError("no volume to render")
    if scene is None and app_logic is None and _in_slicer_gui():
        return _render_in_slicer(volume_node, out_png, ras_offset, orientation)
    scene = scene if scene is not None else slicer.mrmlScene
    app_logic = app_logic if app_logic is not None else slicer.app.applicationLogic()
    return _render_headless(volume_node, out_png, ras_offset, orientation, (int(size[0]), int(size[1])),
                            scene, app_logic)


def ras_to_png_pixel(info: dict, ras) -> tuple[float, float]:
    """Map a RAS point on the rendered slice to (col, row) pixel coordinates of the PNG (row 0 = top)."""
    import numpy as np

    xy = np.linalg.solve(np.asarray(info["xy_to_ras"], float), np.r_[np.asarray(ras, float)[:3], 1.0])
    # XY is the slice image's pixel index, y up; PNG rows run down
    return float(xy[0]), float(info["size"][1] - 1 - xy[1])
