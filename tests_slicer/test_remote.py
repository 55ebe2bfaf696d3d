"""Remote mode for real: the Lib against the project's MONAI Label app on a real server (127.0.0.1).

The server (``monailabel start_server``, from the project's ``.venv``) runs the same CRM test double
and LiteMedSAM as the local tests, so the remote answer must equal the local one voxel for voxel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import slicer
from conftest import DOUBLE, MAIN_PYTHON, ROOT, WORKER_ENV, blob_volume, oblique_direction
from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.logic import MedReasonerLogic
from MedReasonerLib.parameters import RunSettings
from MedReasonerLib.remote_client import RemoteClient
from slicer_headless import scene_snapshot

pytestmark = pytest.mark.needs_worker
STARTUP_S = 180
QUESTION = "Where is the liver lesion?"
NARROW = dict(key_slice_mode="number", key_slice=3, slice_range="2:6")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "studies").mkdir()
    port = free_port()
    cmd = [MAIN_PYTHON, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "monailabel_app"),
           "--studies", str(root / "studies"), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "plugins", DOUBLE, "--conf", "crm_backend", "test-brightest", "--conf", "asm", "litemedsam",
           "--conf", "device", "cpu"]
    env = {**os.environ, **WORKER_ENV, "MONAI_LABEL_SESSION_PATH": str(root / "sessions")}
    log = open(root / "server.log", "wb")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:  # bounded readiness poll
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(url + "/info/", timeout=5).status == 200:
                    break
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def logic(tmp_path_factory):
    lg = MedReasonerLogic(worker_python=MAIN_PYTHON, worker_env=WORKER_ENV,
                          temp_root=str(tmp_path_factory.mktemp("remote_lib")))
    yield lg
    lg.shutdown()


def remote(url: str, **changes) -> RunSettings:
    return RunSettings(compute="remote", server_url=url, **{**NARROW, **changes})


def test_remote_answer_equals_the_local_one(server, logic, tmp_path, scene):
    vol = slicer.util.loadVolume(str(blob_volume(tmp_path / "oblique.nrrd", oblique_direction(), seed=3)))
    events = []
    outcome = logic.start(vol, QUESTION, remote(server)).wait(300, on_event=events.append)
    [item] = outcome.segments
    assert item.status == "ok" and events[-1].kind == "done"
    seg_node = scene.GetNodeByID(outcome.segmentation_node_id)
    assert seg_node.GetSegmentation().GetSegment(item.segment_id).GetName() == QUESTION
    assert item.record["query"] == QUESTION and item.record["schema_version"].startswith("1.")
    assert item.roi_node_id and item.points_node_id
    got_remote = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, item.segment_id, vol)

    local = RunSettings(crm="double", crm_backend="test-brightest", asm="litemedsam", device="cpu",
                        extra_worker_args=f"--plugins {DOUBLE} --batch-size 1", **NARROW)
    local_outcome = logic.start(vol, QUESTION, local).wait(300)
    local_item = local_outcome.segments[0]
    got_local = slicer.util.arrayFromSegmentBinaryLabelmap(
        scene.GetNodeByID(local_outcome.segmentation_node_id), local_item.segment_id, vol)
    assert got_remote.sum() > 20
    np.testing.assert_array_equal(got_remote, got_local)
    np.testing.assert_allclose(local_item.record["box_corners_lps"], item.record["box_corners_lps"], atol=1e-6)


def test_current_slice_as_key_point_reaches_the_server(server, logic, tmp_path, scene):
    """The slice on screen travels as an LPS point; the server picks that display slice."""
    import vtk

    vol = slicer.util.loadVolume(str(blob_volume(tmp_path / "kp.nrrd", oblique_direction(), seed=3)))
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    ras = slicer.util.arrayFromVTKMatrix(m) @ np.array([16, 16, 4, 1.0])  # a point on voxel slice k=4
    outcome = logic.start(vol, QUESTION, remote(server, key_slice_mode="current", slice_range=""),
                          key_point_ras=ras[:3]).wait(300)
    record = outcome.segments[0].record
    assert record["key_slice_volume_index"] == 4


def test_unreachable_server_and_unknown_task_are_clear_errors(server, logic, tmp_path, scene):
    vol = slicer.util.loadVolume(str(blob_volume(tmp_path / "v.nrrd", oblique_direction())))
    before = scene_snapshot(scene)
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MedReasonerSlicerError, match="cannot reach the MONAI Label server") as err:
        logic.start(vol, QUESTION, remote(closed)).wait(60)
    assert err.value.kind == "server"
    with pytest.raises(MedReasonerSlicerError, match="no task 'nope'.*medreasoner"):
        logic.start(vol, QUESTION, remote(server, server_task="nope")).wait(60)
    with pytest.raises(MedReasonerSlicerError, match=r"HTTP 4..\): key slice 99"):  # the server's own reason
        logic.start(vol, QUESTION, remote(server, key_slice=99, slice_range="")).wait(120)
    assert scene_snapshot(scene) == before


def test_client_info_and_multipart_parsing(server, tmp_path):
    """The standard-library client reads /info/ and a multipart answer (label file + params)."""
    client = RemoteClient(server)
    task = client.check_task("medreasoner")
    assert "query" in task["config"]
    path = blob_volume(tmp_path / "upload.nrrd", np.eye(3))
    label, record = client.infer("medreasoner", {"query": QUESTION, **{"key_slice": 3, "slice_range": "2:6"}},
                                 image_file=str(path), out_dir=str(tmp_path))
    assert label and Path(label).parent == tmp_path and label.endswith(".seg.nrrd")
    assert record["status"] == "ok" and record["query"] == QUESTION
