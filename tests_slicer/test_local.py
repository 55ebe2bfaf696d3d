"""The module's local path for real: a Slicer scene (slicer-core), the Lib, and the worker process.

The worker runs the CRM test double (``tests/doubles.py``: a box around the brightest region, in the
CRM's real output format) with the real LiteMedSAM, so every answer is deterministic and the voxels
can be compared with what the core computes for the same question on the original file.
"""

from __future__ import annotations

import os
import queue
import signal
import time

import numpy as np
import pytest
import slicer
import vtk
from conftest import DOUBLE, LEFT_HANDED, MAIN_PYTHON, WORKER_ENV, blob_volume, oblique_direction
from MedReasonerLib import markups
from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.logic import MedReasonerLogic
from MedReasonerLib.parameters import RunSettings
from MedReasonerLib.scene import TERMINOLOGY_TAG, get_tag, segment_reasoning
from slicer_headless import scene_snapshot

pytestmark = pytest.mark.needs_worker

QUESTION = "Which structure in the left kidney stands out?"
# key slice 3 of slices 2..5: a few LiteMedSAM encodes per new volume, none for a second question
NARROW = dict(key_slice_mode="number", key_slice=3, slice_range="2:6")


def settings(**changes) -> RunSettings:
    base = dict(crm="double", crm_backend="test-brightest", asm="litemedsam", device="cpu",
                extra_worker_args=f"--plugins {DOUBLE} --batch-size 1", **NARROW)
    return RunSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    lg = MedReasonerLogic(worker_python=MAIN_PYTHON, worker_env=WORKER_ENV,
                          temp_root=str(tmp_path_factory.mktemp("lib")))
    yield lg
    lg.shutdown()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    d = tmp_path_factory.mktemp("volumes")
    return {"oblique": blob_volume(d / "oblique.nrrd", oblique_direction()),
            "left_handed": blob_volume(d / "las.nii.gz", LEFT_HANDED, seed=1)}


def core_mask(logic, path, question, options):
    """What the core answers for the same question on the original file (no Slicer in between)."""
    import SimpleITK as sitk

    sink: queue.Queue = queue.Queue()
    out = os.path.join(logic.temp_root, "core")
    logic.worker.submit({"input": str(path), "queries": [question], "options": options, "out_dir": out}, sink)
    result = None
    while True:
        msg = sink.get(timeout=300)
        if msg["type"] == "result":
            result = msg
        if msg["type"] in ("done", "error", "cancelled"):
            assert msg["type"] == "done", msg
            break
    image = sitk.ReadImage(result["outputs"]["mask_nifti"])
    return image, result["record"]


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def node_mask_on_file_grid(mask_kji: np.ndarray, volume_node, file_image) -> np.ndarray:
    """A mask on the Slicer node's grid, moved voxel by voxel onto the file's grid through RAS."""
    d = np.asarray(file_image.GetDirection()).reshape(3, 3) @ np.diag(file_image.GetSpacing())
    file_ijk_to_ras = np.eye(4)
    file_ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ d
    file_ijk_to_ras[:3, 3] = np.array(file_image.GetOrigin()) * [-1, -1, 1]
    node_to_file = np.linalg.inv(file_ijk_to_ras) @ ijk_to_ras(volume_node)
    k, j, i = np.nonzero(mask_kji)
    ijk = np.rint(node_to_file @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].astype(int)
    out = np.zeros(file_image.GetSize()[::-1], np.uint8)
    out[ijk[2], ijk[1], ijk[0]] = 1
    return out


def roi_all_corners(roi) -> list:
    bounds = [0.0] * 6
    roi.GetObjectBounds(bounds)
    m = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    return [(m @ np.array([x, y, z, 1.0]))[:3] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]


@pytest.mark.parametrize("name", ["oblique", "left_handed"])
def test_segment_equals_the_core_mask_with_markups_on_the_key_slice(logic, volumes, scene, name):
    import SimpleITK as sitk

    path = volumes[name]
    vol = slicer.util.loadVolume(str(path), {"name": name})
    if name == "left_handed":  # Slicer reversed K on load: the node's grid is not the file's
        assert np.linalg.det(ijk_to_ras(vol)[:3, :3]) > 0
    job = logic.start(vol, QUESTION, settings())
    events = []
    outcome = job.wait(300, on_event=events.append)
    assert any(e.kind == "progress" and 0 <= e.fraction <= 1 for e in events)
    assert events[-1].kind == "done"
    [item] = outcome.segments
    assert item.status == "ok" and item.segment_id and item.reasoning
    seg_node = scene.GetNodeByID(outcome.segmentation_node_id)
    segment = seg_node.GetSegmentation().GetSegment(item.segment_id)
    assert segment.GetName() == QUESTION
    # a known structure: the kidney's SNOMED CT code, the left-side modifier and its colour
    entry = get_tag(segment, TERMINOLOGY_TAG)
    assert "SCT^64033007^Kidney" in entry and "SCT^7771000^Left" in entry
    assert segment_reasoning(seg_node, item.segment_id)["question"] == QUESTION

    got = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, item.segment_id, vol)
    expected, record = core_mask(logic, path, QUESTION, settings().run_options())
    expected_arr = sitk.GetArrayFromImage(expected)
    assert expected_arr.sum() > 20
    np.testing.assert_array_equal(node_mask_on_file_grid(got, vol, expected), expected_arr)
    assert record["key_slice"] == item.record["key_slice"] == 3

    # the ROI is the key slice's box, the fiducials its key points (RAS = LPS with x, y negated)
    roi = scene.GetNodeByID(item.roi_node_id)
    corners = markups.roi_corners_ras(roi)
    want = [markups.lps_to_ras(c) for c in record["box_corners_lps"]]
    ras_to_ijk = np.linalg.inv(ijk_to_ras(vol))
    centre = np.array(roi.GetCenter())
    np.testing.assert_allclose(centre, (want[0] + want[1]) / 2, atol=1e-4)
    slice_axis = int(np.argmin(np.array(roi.GetSize()) / np.array(vol.GetSpacing())))
    assert np.isclose(roi.GetSize()[slice_axis], vol.GetSpacing()[slice_axis])  # one slice thick
    # the ROI's corners, flattened onto the key slice, include both corners of the CRM's box
    normal = markups.volume_directions(vol)[:, slice_axis]
    flat = [c - normal * np.dot(c - centre, normal) for c in roi_all_corners(roi)]
    for c in want:
        assert min(np.linalg.norm(c - f) for f in flat) < 1e-3
    key_index = (ras_to_ijk @ np.r_[centre, 1])[slice_axis]
    voxels_on_key = (ras_to_ijk @ np.r_[markups.lps_to_ras(record["points_lps"][0]), 1])[slice_axis]
    assert abs(key_index - round(key_index)) < 1e-3 and abs(voxels_on_key - key_index) < 1e-3
    fid = scene.GetNodeByID(item.points_node_id)
    np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(fid),
                               [markups.lps_to_ras(p) for p in record["points_lps"]], atol=1e-6)
    assert fid.GetNthControlPointLabel(0) == "P1"
    # the segment's voxels on the key slice sit inside the box
    key_slice_mask = np.zeros_like(got)
    sl = [slice(None)] * 3
    sl[2 - slice_axis] = int(round(key_index))
    key_slice_mask[tuple(sl)] = got[tuple(sl)]
    k, j, i = np.nonzero(key_slice_mask)
    ijk_lo, ijk_hi = (ras_to_ijk @ np.r_[c, 1] for c in corners)
    lo, hi = np.minimum(ijk_lo, ijk_hi)[:3] - 0.51, np.maximum(ijk_lo, ijk_hi)[:3] + 0.51
    inside = [(lo[a] <= v).all() and (v <= hi[a]).all() for a, v in enumerate((i, j, k))]
    assert len(i) > 0 and all(inside)


def test_second_question_adds_a_second_segment_and_reuses_the_caches(logic, volumes, scene):
    vol = slicer.util.loadVolume(str(volumes["oblique"]), {"name": "again"})
    first = logic.start(vol, "Which part of the liver is abnormal?", settings()).wait(300)
    seg_node = scene.GetNodeByID(first.segmentation_node_id)
    second = logic.start(vol, "Where is the spleen?", settings(), segmentation_node=seg_node).wait(300)
    assert second.segmentation_node_id == first.segmentation_node_id
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    names = [segmentation.GetNthSegment(i).GetName() for i in range(2)]
    colours = [tuple(segmentation.GetNthSegment(i).GetColor()) for i in range(2)]
    assert names == ["Which part of the liver is abnormal?", "Where is the spleen?"] and colours[0] != colours[1]
    counts = second.segments[0].record["counts"]
    assert counts["volume_cache_hits"] == 1 and counts["asm_encodes"] == 0  # same file, same session
    # undo: removing the answer removes its segment, box and points
    logic.remove_result(second.segments[0], seg_node)
    assert segmentation.GetNumberOfSegments() == 1 and scene.GetNodeByID(second.segments[0].roi_node_id) is None


def test_several_questions_one_per_line_become_segments(logic, volumes, scene):
    vol = slicer.util.loadVolume(str(volumes["oblique"]), {"name": "many"})
    outcome = logic.start(vol, "Where is the tumour?\n\n  Which organ is bright? \nWhere is the tumour?",
                          settings()).wait(300)
    assert [s.question for s in outcome.segments] == ["Where is the tumour?", "Which organ is bright?"]
    seg = scene.GetNodeByID(outcome.segmentation_node_id).GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    assert "SCT^108369006^Neoplasm" in get_tag(seg.GetNthSegment(0), TERMINOLOGY_TAG)
    generic = get_tag(seg.GetNthSegment(1), TERMINOLOGY_TAG)  # no structure named: Slicer's generic entry
    assert generic is None or "SCT^85756007^Tissue" in generic


def test_cancel_stops_promptly_and_leaves_the_scene_unchanged(logic, tmp_path, scene):
    vol = slicer.util.loadVolume(str(blob_volume(tmp_path / "long.nrrd", oblique_direction(), n=24, seed=5)))
    before = scene_snapshot(scene)
    job = logic.start(vol, "Where is the bright blob?", settings(strategy="slicewise", slice_range=""))
    deadline = time.monotonic() + 120
    while not any(e.kind == "progress" and e.stage not in ("loading models",) for e in job.poll()):
        assert time.monotonic() < deadline and not job.finished
        time.sleep(0.05)
    t0 = time.monotonic()
    job.cancel()
    with pytest.raises(MedReasonerSlicerError) as err:
        job.wait(60)
    assert err.value.kind == "cancelled" and time.monotonic() - t0 < 30
    assert scene_snapshot(scene) == before


@pytest.mark.parametrize("make,why", [
    (lambda s, v: (None, "Where?"), "choose an input volume"),
    (lambda s, v: (v, "  \n  "), "type a question"),
    (lambda s, v: (s.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels"), "Where?"), "not a scalar"),
])
def test_bad_input_is_refused_before_anything_starts(logic, volumes, scene, make, why):
    vol = slicer.util.loadVolume(str(volumes["oblique"]))
    node, question = make(scene, vol)
    before = scene_snapshot(scene)
    with pytest.raises(MedReasonerSlicerError, match=why):
        logic.start(node, question, settings())
    assert scene_snapshot(scene) == before


@pytest.mark.parametrize("change,why", [({"window_mode": "custom", "window_custom": "wide"}, "center,width"),
                                        ({"strategy": "everything"}, "unknown strategy"),
                                        ({"compute": "remote", "server_url": "ftp://x"}, "http://")])
def test_bad_settings_are_refused(logic, volumes, scene, change, why):
    vol = slicer.util.loadVolume(str(volumes["oblique"]))
    with pytest.raises(MedReasonerSlicerError, match=why):
        logic.start(vol, "Where?", settings(**change))


def test_an_error_in_the_worker_is_one_clear_line_and_the_worker_keeps_serving(logic, volumes, scene):
    vol = slicer.util.loadVolume(str(volumes["oblique"]))
    before = scene_snapshot(scene)
    with pytest.raises(MedReasonerSlicerError, match="outside the slice range") as err:
        logic.start(vol, "Where?", settings(key_slice=7)).wait(120)
    assert err.value.kind == "input" and "\n" not in str(err.value)
    assert scene_snapshot(scene) == before and logic.worker.alive


def test_no_target_adds_nothing_and_says_why(logic, tmp_path, scene):
    import SimpleITK as sitk

    arr = np.full((8, 32, 32), 50, np.int16)
    arr[6, 10:20, 10:20] = 900  # something to window, but nothing on the key slice
    image = sitk.GetImageFromArray(arr)
    sitk.WriteImage(image, str(tmp_path / "flat.nrrd"))
    vol = slicer.util.loadVolume(str(tmp_path / "flat.nrrd"))
    before = scene_snapshot(scene)
    outcome = logic.start(vol, "Where is the tumour?", settings()).wait(300)
    assert [s.status for s in outcome.segments] == ["no_target"] and outcome.segmentation_node_id is None
    assert scene_snapshot(scene) == before


def test_worker_death_is_reported_and_the_next_run_starts_a_new_worker(logic, volumes, scene):
    vol = slicer.util.loadVolume(str(volumes["oblique"]))
    logic.ensure_worker(settings()).wait_ready(120)
    before = scene_snapshot(scene)
    job = logic.start(vol, "Where is it?", settings(strategy="slicewise", slice_range=""))
    os.kill(logic.worker.proc.pid, signal.SIGKILL)
    with pytest.raises(MedReasonerSlicerError, match="stopped unexpectedly") as err:
        job.wait(60)
    assert err.value.kind == "worker" and scene_snapshot(scene) == before
    dead = logic.worker
    outcome = logic.start(vol, "Where is it?", settings()).wait(300)
    assert logic.worker is not dead and outcome.segments[0].status == "ok"


def test_a_missing_model_is_a_clear_error(tmp_path, volumes, scene):
    lg = MedReasonerLogic(worker_python=MAIN_PYTHON, worker_env=WORKER_ENV, temp_root=str(tmp_path))
    try:
        vol = slicer.util.loadVolume(str(volumes["oblique"]))
        before = scene_snapshot(scene)
        missing = str(tmp_path / "no_such_crm")
        with pytest.raises(MedReasonerSlicerError, match="no_such_crm") as err:
            lg.start(vol, "Where?", RunSettings(crm=missing, device="cpu")).wait(180)
        assert err.value.kind == "model" and scene_snapshot(scene) == before
    finally:
        lg.shutdown()


def test_real_tiny_qwen_crm_through_the_worker_says_it_is_a_test_model(tmp_path, volumes, scene):
    """The real architecture (a tiny random Qwen2.5-VL, built offline) behind the same local path."""
    import subprocess

    subprocess.run([MAIN_PYTHON, "-m", "medreasoner", "make-tiny", str(tmp_path / "models"), "--no-sam2"],
                   check=True, capture_output=True, env={**os.environ, **WORKER_ENV}, timeout=600)
    lg = MedReasonerLogic(worker_python=MAIN_PYTHON, worker_env=WORKER_ENV, temp_root=str(tmp_path))
    try:
        vol = slicer.util.loadVolume(str(volumes["oblique"]))
        events = []
        job = lg.start(vol, "Which organ is enlarged?", RunSettings(
            crm=str(tmp_path / "models" / "crm"), device="cpu", extra_worker_args="--max-new-tokens 160", **NARROW))
        outcome = job.wait(600, on_event=events.append)
    finally:
        lg.shutdown()
    assert lg.worker is None
    [item] = outcome.segments
    assert item.status in ("ok", "no_target") and item.record["crm"]["tiny_test_model"] is True
    assert any("TINY TEST MODEL" in e.message for e in events if e.kind == "warning")
    if item.status == "ok":
        seg = scene.GetNodeByID(outcome.segmentation_node_id).GetSegmentation()
        assert seg.GetSegment(item.segment_id).GetName() == "Which organ is enlarged?"


def test_jump_to_key_slice_moves_the_slice_views(logic, volumes, scene):
    vol = slicer.util.loadVolume(str(volumes["oblique"]))
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientation("Axial")
    outcome = logic.start(vol, QUESTION, settings()).wait(300)
    item = outcome.segments[0]
    assert logic.jump_to_key_slice(item)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(red.GetSliceToRAS())
    np.testing.assert_allclose(slice_to_ras[:3, 3], item.key_slice_ras, atol=1e-3)  # centred on the box
