"""The ``worker`` command: one subprocess serving JSON-line requests (what the Slicer module drives).

One worker (CRM test double + LiteMedSAM on CPU) is shared by the slow tests of this module, in file
order; the last one shuts it down. LiteMedSAM encodes cost seconds each on a busy 2-core machine, so
requests use a narrow slice range and the worker runs with ``--batch-size 1`` (a progress line, and
a cancel check, after every slice).
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from medreasoner.engine.worker import ProtocolError, check_ground, parse_message
from medreasoner.errors import InputError

DOUBLES = Path(__file__).resolve().parent / "doubles.py"
ROOT = Path(__file__).resolve().parent.parent
# key slice 3 and its two neighbours: three LiteMedSAM encodes for the first question, none after
NARROW = {"key_slice": 3, "slice_range": "2:5", "n_candidates": 1}


# ------------------------------------------------------------------------------------ fast: messages
def test_parse_message_and_check_ground(tmp_path):
    assert parse_message('{"type": "shutdown"}') == {"type": "shutdown"}
    assert parse_message('{"type": "cancel", "id": 7}')["id"] == 7
    for bad, why in [("{nope", "not JSON"), ("[1]", "JSON object"), ('{"type": "explode", "id": "a"}', "unknown"),
                     ('{"type": "ground"}', "needs an 'id'"), ('{"type": "cancel", "id": " "}', "needs an 'id'")]:
        with pytest.raises(ProtocolError, match=why):
            parse_message(bad)

    vol = tmp_path / "v.nrrd"
    vol.write_bytes(b"x")  # only existence is checked before the engine reads it
    good = {"type": "ground", "id": "r", "input": str(vol), "queries": [" q1 ", "q2"],
            "options": {"strategy": "slicewise"}, "out_dir": str(tmp_path / "out")}
    req = check_ground(good)
    assert req.queries == ["q1", "q2"] and req.options.strategy == "slicewise" and req.out_dir == tmp_path / "out"
    for change, why in [({"input": str(tmp_path / "missing.nrrd")}, "input not found"),
                        ({"queries": ["ok", "  "]}, "query is empty"), ({"queries": []}, "non-empty list"),
                        ({"options": {"strategy": "magic"}}, "unknown strategy"),
                        ({"options": {"colour": 1}}, "unknown run option"), ({"out_dir": None}, "out_dir"),
                        ({"options": {"n_candidates": "five"}}, "n_candidates must be a whole number"),
                        ({"options": {"slice_range": [44.5, "x"]}}, "slice range bounds must be whole numbers"),
                        ({"options": {"slice_range": "44"}}, "slice range must look like 'start:stop'"),
                        ({"queries": [5]}, "the query must be text"),
                        ({"input": "/tmp/" + "A" * 100_000}, r"input path is too long for this file system: .*\(100005 characters\)"),
                        ({"extra": 1}, "unknown request field")]:
        with pytest.raises(InputError, match=why) as exc:
            check_ground({**good, **change})
        assert len(str(exc.value)) < 400  # a huge path is never echoed back whole
    series = tmp_path / "series"  # a DICOM folder: results must not land among its slices (as the CLI)
    series.mkdir()
    for out_dir in (series, series / "out"):
        with pytest.raises(InputError, match="is inside the input folder"):
            check_ground({**good, "input": str(series), "out_dir": str(out_dir)})


class _LineSink:
    """A stdout stand-in that hands each written line to a queue."""

    def __init__(self):
        self.lines: queue.Queue = queue.Queue()
        self._buf = ""

    def write(self, text: str) -> None:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.lines.put(json.loads(line))

    def flush(self) -> None:
        pass


class _SlowSession:
    """A session double: each question is 100 steps of 20 ms, checking for a cancel between steps."""

    class models:  # noqa: N801 - mimics the attribute the worker reads
        is_tiny = False

        @staticmethod
        def describe():
            return {"crm": {"backend": "fake"}, "asm": {"name": "fake"}}

    def ground(self, source, query, options, events):
        from medreasoner.engine.events import Stage

        for step in range(100):
            events.check_cancelled("fake")
            events.progress(Stage.SLICES, step + 1, 100)
            time.sleep(0.02)
        raise AssertionError("the fake request should have been cancelled")


def test_worker_cancels_queued_requests_and_stops_on_eof(tmp_path):
    """In-process, no models: a cancel reaches a queued request; stdin EOF cancels the running one."""
    from medreasoner.engine.worker import Worker

    (tmp_path / "v.nrrd").write_bytes(b"x")
    r, w = os.pipe()
    stdin, sink = os.fdopen(r, "r"), _LineSink()
    worker = Worker(_SlowSession(), stdin, sink)
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.serve()), daemon=True)
    thread.start()
    assert sink.lines.get(timeout=5)["type"] == "ready"
    request = {"type": "ground", "input": str(tmp_path / "v.nrrd"), "queries": ["q"], "out_dir": str(tmp_path)}
    with os.fdopen(w, "w") as writer:
        for line in [{**request, "id": "a"}, {**request, "id": "b"}, {"type": "cancel", "id": "b"}]:
            writer.write(json.dumps(line) + "\n")
            writer.flush()
        assert sink.lines.get(timeout=5)["type"] == "progress"  # "a" runs, "b" waits (and is cancelled)
    # the writer closed: EOF
    thread.join(10)
    assert code == [0]
    finals = [m for m in list(sink.lines.queue) if m["type"] != "progress"]
    assert finals == [{"v": 1, "type": "cancelled", "id": "a"}, {"v": 1, "type": "cancelled", "id": "b"}]


# ----------------------------------------------------------------------------------- the subprocess
class WorkerProcess:
    """The worker on pipes; stdout lines arrive through a thread so every read has a deadline."""

    def __init__(self, *extra: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT)}  # one torch thread: far faster than two on a shared 2-core box
        cmd = [sys.executable, "-m", "medreasoner", "worker", "--plugins", str(DOUBLES), "--crm-backend",
               "test-brightest", "--crm", "double", "--asm", "litemedsam", "--device", "cpu", *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, cwd=ROOT, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, obj) -> None:
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 60) -> dict:
        line = self.lines.get(timeout=timeout)
        assert line is not None, "the worker closed stdout"
        msg = json.loads(line)  # stdout must carry protocol lines only
        assert msg["v"] == 1, msg
        return msg

    def until(self, types: set[str], timeout: float = 60) -> list[dict]:
        """Messages up to and including the first whose type is in ``types``."""
        deadline, seen = time.monotonic() + timeout, []
        while True:
            seen.append(self.next(max(0.1, deadline - time.monotonic())))
            if seen[-1]["type"] in types:
                return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def oblique_phantom(path: Path, n: int = 8, seed: int = 0) -> Path:
    """An int16 volume of ``n`` 32x32 slices, oblique and anisotropic, with a bright blob."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[0:n, 0:32, 0:32]
    a = 60 + 20 * rng.random((n, 32, 32))
    a += 500 * ((((y - 14) / 7.0) ** 2 + ((x - 18) / 6.0) ** 2) <= 1)
    image = sitk.GetImageFromArray(a.astype(np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.0, 7.25))
    ca, sa, cb, sb = math.cos(0.35), math.sin(0.35), math.cos(0.2), math.sin(0.2)
    rz = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cb, -sb], [0, sb, cb]])
    image.SetDirection(tuple(float(v) for v in (rz @ rx).ravel()))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def worker():
    w = WorkerProcess("--batch-size", "1")
    try:
        ready = w.next(timeout=120)
        assert ready["type"] == "ready", ready
        yield w, ready
    finally:
        w.close()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return oblique_phantom(tmp_path_factory.mktemp("worker_in") / "phantom.nrrd")


@pytest.mark.slow
def test_ready_line_describes_the_models(worker):
    _, ready = worker
    assert ready["models"]["crm"]["backend"] == "test-brightest" and ready["models"]["asm"]["name"] == "litemedsam"
    assert isinstance(ready["pid"], int)


@pytest.mark.slow
def test_two_questions_give_seg_nrrd_on_the_input_grid_and_reuse_caches(worker, phantom, tmp_path):
    import SimpleITK as sitk

    from medreasoner.engine import validate_record

    w, _ = worker
    w.send({"type": "ground", "id": "two", "input": str(phantom), "queries": ["Where is the bright blob?",
            "Which structure stands out?"], "options": NARROW, "out_dir": str(tmp_path / "out")})
    msgs = w.until({"done", "error", "cancelled"}, timeout=120)
    assert msgs[-1] == {"v": 1, "type": "done", "id": "two"}, msgs[-1]
    assert all(m["id"] == "two" for m in msgs)
    assert any(m["type"] == "progress" and m["query_index"] == 0 for m in msgs)
    results = [m for m in msgs if m["type"] == "result"]
    assert [r["query_index"] for r in results] == [0, 1] and all(r["status"] == "ok" for r in results)
    source = sitk.ReadImage(str(phantom))
    for r in results:
        validate_record(r["record"])
        assert r["record"]["query"] == r["query"] and r["record"]["outputs"] == r["outputs"]
        seg = sitk.ReadImage(r["outputs"]["mask_seg_nrrd"])
        assert r["outputs"]["mask_seg_nrrd"].endswith(".seg.nrrd") and seg.GetSize() == source.GetSize()
        assert np.allclose(seg.GetSpacing(), source.GetSpacing(), atol=1e-5)
        assert np.allclose(seg.GetOrigin(), source.GetOrigin(), atol=1e-4)
        assert np.allclose(seg.GetDirection(), source.GetDirection(), atol=1e-5)
        assert sitk.GetArrayFromImage(seg).any()
    first, second = (r["record"]["counts"] for r in results)
    assert first["asm_encodes"] > 0 and second["asm_encodes"] < first["asm_encodes"]
    assert second["volume_cache_hits"] == 1


@pytest.mark.slow
def test_bad_request_and_malformed_line_do_not_stop_the_worker(worker, phantom, tmp_path):
    w, _ = worker
    w.send({"type": "ground", "id": "bad", "input": str(tmp_path / "missing.nrrd"), "queries": ["q"],
            "out_dir": str(tmp_path / "out")})
    err = w.until({"done", "error", "cancelled"})[-1]
    assert err["type"] == "error" and err["id"] == "bad" and err["kind"] == "input" and "\n" not in err["message"]
    assert "missing.nrrd" in err["message"]

    w.send("this is not json")
    err = w.next()
    assert err["type"] == "error" and err["kind"] == "protocol"
    w.proc.stdin.buffer.write(b'{"type": "shutdown\xff"}\n')  # not UTF-8: one protocol error, no exit
    w.proc.stdin.flush()
    assert w.next()["kind"] == "protocol" and w.proc.poll() is None

    w.send({"type": "ground", "id": "after", "input": str(phantom), "queries": ["Where is the bright blob?"],
            "options": NARROW, "out_dir": str(tmp_path / "out")})
    msgs = w.until({"done", "error", "cancelled"}, timeout=120)
    assert msgs[-1]["type"] == "done" and [m["status"] for m in msgs if m["type"] == "result"] == ["ok"]


@pytest.mark.slow
def test_cancel_stops_a_running_request(worker, tmp_path):
    w, _ = worker
    volume = oblique_phantom(tmp_path / "long.nrrd", n=24, seed=1)  # new pixels: nothing cached
    w.send({"type": "ground", "id": "long", "input": str(volume), "queries": ["Where is the bright blob?"],
            "options": {"strategy": "slicewise"}, "out_dir": str(tmp_path / "out")})
    first = w.next(timeout=120)
    assert first["type"] == "progress" and first["id"] == "long", first
    w.send({"type": "cancel", "id": "long"})
    msgs = w.until({"done", "error", "cancelled"}, timeout=60)
    assert msgs[-1] == {"v": 1, "type": "cancelled", "id": "long"}
    progress = [first] + [m for m in msgs if m["type"] == "progress"]
    assert progress[-1]["done"] < progress[-1]["total"]  # stopped between slices, long before the end
    assert not any(m["type"] == "result" for m in msgs) and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_cancels_the_running_request_and_the_worker_keeps_serving(worker, tmp_path):
    import signal

    w, _ = worker
    volume = oblique_phantom(tmp_path / "sig.nrrd", n=24, seed=2)
    w.send({"type": "ground", "id": "sig", "input": str(volume), "queries": ["Where is the bright blob?"],
            "options": {"strategy": "slicewise"}, "out_dir": str(tmp_path / "out")})
    assert w.next(timeout=120)["type"] == "progress"
    w.proc.send_signal(signal.SIGTERM)
    assert w.until({"done", "error", "cancelled"}, timeout=60)[-1] == {"v": 1, "type": "cancelled", "id": "sig"}
    w.send({"type": "cancel", "id": "sig"})  # nothing runs now: a warning, and the worker still serves
    assert w.next()["type"] == "log" and w.proc.poll() is None


@pytest.mark.slow
def test_shutdown_exits_zero(worker):
    w, _ = worker
    w.send({"type": "shutdown"})
    assert w.proc.wait(30) == 0
    assert w.lines.get(timeout=10) is None  # nothing more on stdout


@pytest.mark.slow
@pytest.mark.parametrize("args,code,named", [
    (("--asm", "no-such-asm"), 2, "no-such-asm"),  # bad model options
    (("--crm-backend", "transformers", "--crm", "{tmp}/no_crm"), 3, "no_crm"),  # a model that cannot load
])
def test_startup_failure_prints_fatal_and_exits(tmp_path, args, code, named):
    w = WorkerProcess(*(a.format(tmp=tmp_path) for a in args))
    try:
        fatal = w.next(timeout=120)
        assert fatal["type"] == "fatal" and fatal["exit_code"] == code and named in fatal["message"]
        assert w.proc.wait(30) == code
    finally:
        w.close()


@pytest.mark.slow
def test_sigterm_while_idle_exits():
    import signal

    w = WorkerProcess()
    try:
        assert w.next(timeout=120)["type"] == "ready"
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0
    finally:
        w.close()
