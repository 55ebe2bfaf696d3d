"""The MONAI Label app (monailabel_app/) on a real `monailabel start_server`, spoken to over HTTP.

One server runs the deterministic CRM test double (``--conf plugins tests/doubles.py --conf crm_backend
test-brightest``) with the real LiteMedSAM, so answers are known; a second one runs a real tiny Qwen2.5-VL
CRM. Inputs are small oblique phantoms and a few key slices, so LiteMedSAM encodes stay few (each costs
seconds on 2 CPU cores); later requests reuse the session's caches.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("monailabel")  # the `label` extra

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "monailabel_app"
DOUBLES = REPO / "tests" / "doubles.py"
TASK = "medreasoner"
STARTUP_S = 120
# A narrow slice range keeps box tracking (one LiteMedSAM encode per slice) short.
VOLUME_OPTIONS = {"key_slice": "2", "slice_range": "2:4", "n_candidates": 1}


# ------------------------------------------------------------------------------------------- inputs
def oblique_direction() -> tuple[float, ...]:
    """A proper rotation that is not axis-aligned (about z, then about x)."""
    a, b = 0.35, 0.2
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def write_phantom(path: Path, seed: int = 0) -> Path:
    """An MR-like int16 volume (6 slices of 40x36) with a bright ellipsoid, oblique and anisotropic."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    n, h, w = 6, 36, 40
    z, y, x = np.ogrid[0:n, 0:h, 0:w]
    a = 80 + 20 * rng.random((n, h, w))
    a += 300 * ((((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.42 * w)) ** 2) <= 1)
    a += 600 * ((((y - 0.42 * h) / (0.16 * h)) ** 2 + ((x - 0.6 * w) / (0.13 * w)) ** 2) <= 1)
    image = sitk.GetImageFromArray(a.astype(np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.0, 7.25))
    image.SetDirection(oblique_direction())
    sitk.WriteImage(image, str(path))
    return path


def write_png(path: Path, uniform: bool = False) -> Path:
    """A bright ellipse; ``uniform``: flat but for one bright pixel, too small a region for the CRM double
    to answer about (a blank image is refused as input, not answered with no target)."""
    from PIL import Image

    h, w = 56, 64
    y, x = np.ogrid[0:h, 0:w]
    a = np.full((h, w), 90, np.uint8)
    if uniform:
        a[10, 10] = 240
    else:
        a[(((y - 20) / 9) ** 2 + ((x - 40) / 11) ** 2) <= 1] = 240
    Image.fromarray(a).save(path)
    return path


def same_grid(a, b) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


# ------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m monailabel.main start_server`` in its own process group, stopped by PID."""

    def __init__(self, studies: Path, log: Path, conf: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            cmd += ["--conf", key, value]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MONAI_LABEL_SESSION_PATH": str(log.parent / "sessions")}
        self._log_file = open(log, "wb")  # noqa: SIM115 - open for the server's whole life
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = STARTUP_S) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"server not ready in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        """The server's PID and its children, by PID: TERM, then KILL whatever is left."""
        try:
            import psutil

            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:  # already gone, or no psutil: the process group is ours alone
            procs = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        for p in procs[1:]:
            with contextlib.suppress(Exception):
                p.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for p in procs[1:]:
            with contextlib.suppress(Exception):
                p.kill()
        self._log_file.close()


def post_infer(url: str, *, image: str = "", params=None, upload: Path | None = None, raw_params: str | None = None,
               timeout: float = 300):
    """POST /infer/medreasoner as the Slicer client does: (status, record or error, label bytes, label name)."""
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    form = {"params": raw_params if raw_params is not None else json.dumps(params or {})}
    files = {"file": (upload.name, upload.read_bytes())} if upload else None
    r = requests.post(f"{url}/infer/{TASK}", params={"image": image} if image else None, data=form, files=files,
                      timeout=timeout)
    if r.status_code != 200:
        return r.status_code, r.json(), None, None
    if "multipart" not in r.headers.get("content-type", ""):
        return r.status_code, r.json(), None, None
    record, label, name = None, None, None
    for part in MultipartDecoder.from_response(r).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if "filename=" in disposition:
            label, name = part.content, disposition.split("filename=")[-1].strip('"')
        else:
            record = json.loads(part.content)
    return r.status_code, record, label, name


def read_label(data: bytes, name: str, tmp: Path):
    import SimpleITK as sitk

    path = tmp / name
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_app")
    studies = root / "studies"
    studies.mkdir()
    uploads = root / "uploads"
    uploads.mkdir()
    return {
        "root": root, "studies": studies,
        "volume": write_phantom(studies / "phantom.nii.gz"),
        "oblique": write_phantom(uploads / "oblique_upload.nii.gz"),  # same voxels: cached embeddings
        "png": write_png(uploads / "slice.png"),
        "uniform": write_png(uploads / "uniform.png", uniform=True),
    }


@pytest.fixture(scope="module")
def server(files):
    srv = Server(files["studies"], files["root"] / "server.log",
                 {"plugins": str(DOUBLES), "crm_backend": "test-brightest", "asm": "litemedsam", "device": "cpu"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# -------------------------------------------------------------------------------------------- tests
def test_info_lists_the_task_and_its_editable_options(server):
    import requests

    info = requests.get(server.url + "/info/", timeout=30).json()
    task = info["models"][TASK]
    assert task["type"] == "segmentation" and task["dimension"] == 3
    config = task["config"]
    assert set(config) >= {"query", "strategy", "axis", "window", "key_slice", "prompt"}
    # strings are editable fields and lists drop-downs (first item = default) in the Slicer client
    assert config["query"] == "" and config["strategy"][0] == "keyslice" and config["axis"][0] == "axial"
    assert config["prompt"][0] == "reasoning" and isinstance(config["window"], str)
    assert info["medreasoner"]["plugins"] == ["doubles"] and info["medreasoner"]["crm"]["backend"] == "test-brightest"
    assert info["medreasoner"]["threaded_infer_route"] is True and info["medreasoner"]["max_concurrent"] >= 1


def test_datastore_volume_through_the_stock_monailabel_client(server, files, tmp_path):
    import SimpleITK as sitk
    from monailabel.client import MONAILabelClient

    from medreasoner.engine import validate_record

    query = "Which organ would explain the patient's jaundice?"
    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    label_path, record = client.infer(TASK, "phantom", {"query": query, "result_extension": ".nrrd",
                                                        "result_dtype": "uint8", **VOLUME_OPTIONS})
    validate_record(record)
    assert record["status"] == "ok" and record["kind"] == "volume" and record["query"] == query
    assert record["schema_version"] and record["key_slice"] == 2 and record["box"] and record["points"]
    assert query in record["reasoning"] and record["label_names"] == {query[:60]: 1}
    assert record["input"]["path"] == "phantom"  # the id, not a server path
    label = sitk.ReadImage(label_path)
    assert label_path.endswith(".nrrd") and label.GetPixelID() == sitk.sitkUInt8
    assert same_grid(label, sitk.ReadImage(str(files["volume"])))
    assert sitk.GetArrayFromImage(label).sum() == record["voxels"] > 0


@pytest.mark.parametrize("ext,dtype", [(".nii.gz", "uint8"), (".seg.nrrd", "uint8"), (".nrrd", "int16")])
def test_uploaded_oblique_volume_label_keeps_the_input_geometry(server, files, tmp_path, ext, dtype):
    import SimpleITK as sitk

    from medreasoner.engine import validate_record

    query = "Where is the bright organ?"
    status, record, data, name = post_infer(server.url, upload=files["oblique"], params={
        "query": query, "result_extension": ext, "result_dtype": dtype, **VOLUME_OPTIONS})
    assert status == 200, record
    validate_record(record)
    assert record["status"] == "ok" and record["input"]["path"] == "oblique_upload.nii.gz"
    assert name.endswith(ext)
    label = read_label(data, name, tmp_path)
    source = sitk.ReadImage(str(files["oblique"]))
    assert same_grid(label, source) and not np.allclose(source.GetDirection(), np.eye(3).ravel())
    assert label.GetPixelID() == {"uint8": sitk.sitkUInt8, "int16": sitk.sitkInt16}[dtype]
    assert int(sitk.GetArrayFromImage(label).astype(bool).sum()) == record["voxels"] > 0
    if ext == ".seg.nrrd":
        assert label.GetMetaData("Segment0_Name") == query


def test_uploaded_2d_image_gets_a_label_of_its_size(server, files, tmp_path):
    from PIL import Image

    from medreasoner.engine import validate_record

    status, record, data, name = post_infer(server.url, upload=files["png"], params={"query": "Which spot is bright?"})
    assert status == 200, record
    validate_record(record)
    assert record["kind"] == "image" and record["status"] == "ok" and name.endswith(".png")
    mask = np.asarray(Image.open(io.BytesIO(data)))
    assert mask.shape == (56, 64) and mask.sum() == record["mask_area_px"] > 0
    status, record, data, name = post_infer(server.url, upload=files["png"], params={
        "query": "Which spot is bright?", "result_extension": ".nrrd"})
    assert status == 200 and read_label(data, name, tmp_path).GetSize() == (64, 56)


def test_a_single_slice_volume_file_is_grounded_as_2d_on_its_own_grid(server, files, tmp_path):
    """3D Slicer uploads a 2D image as a one-slice volume; the label must come back on that grid."""
    import SimpleITK as sitk
    from PIL import Image

    from medreasoner.engine import validate_record

    grey = np.asarray(Image.open(files["png"]), np.int16)[None]
    image = sitk.GetImageFromArray(grey)
    image.SetSpacing((0.7, 0.7, 5.0))
    image.SetOrigin((3.0, -4.0, 12.0))
    image.SetDirection(oblique_direction())
    path = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(image, str(path))
    status, record, data, name = post_infer(server.url, upload=path, params={"query": "Which spot is bright?"})
    assert status == 200, record
    validate_record(record)
    assert record["kind"] == "image" and record["status"] == "ok" and name.endswith(".nii.gz")
    label = read_label(data, name, tmp_path)
    assert same_grid(label, image) and sitk.GetArrayFromImage(label).sum() == record["mask_area_px"] > 0


def test_a_question_with_no_target_is_an_empty_label_not_an_error(server, files, tmp_path):
    import SimpleITK as sitk

    from medreasoner.engine import validate_record

    status, record, data, name = post_infer(server.url, upload=files["uniform"], params={
        "query": "Where is the tumour?", "result_extension": ".nii.gz"})
    assert status == 200, record
    validate_record(record)
    assert record["status"] == "no_target" and record["message"]
    label = read_label(data, name, tmp_path)
    assert label.GetSize() == (64, 56) and sitk.GetArrayFromImage(label).sum() == 0


BAD_REQUESTS = [
    ("missing query", dict(image="phantom", params={}), 400, "query is empty"),
    ("blank query", dict(image="phantom", params={"query": "   "}), 400, "query is empty"),
    ("query a list", dict(image="phantom", params={"query": ["a", "b"]}), 400, "query must be text"),
    ("unknown image id", dict(image="no_such_study", params={"query": "q"}), 404, "unknown image id"),
    ("path traversal", dict(image="../../etc/passwd", params={"query": "q"}), 400, "not an image id"),
    ("absolute path", dict(image="/etc/passwd", params={"query": "q"}), 400, "not an image id"),
    ("malformed params", dict(image="phantom", raw_params="{'query': oops"), 400, "not valid JSON"),
    ("params not an object", dict(image="phantom", raw_params="[1, 2]"), 400, "JSON object"),
    ("image smuggled in params", dict(image="phantom", params={"query": "q", "image": "/etc/passwd"}), 400,
     "may not set image"),
    ("unknown strategy", dict(image="phantom", params={"query": "q", "strategy": "magic"}), 400, "unknown strategy"),
    ("unknown axis", dict(image="phantom", params={"query": "q", "axis": "oblique"}), 400, "unknown axis"),
    ("slice range pair of junk", dict(image="phantom", params={"query": "q", "slice_range": [44.5, "x"]}), 400,
     "slice range bounds must be whole numbers"),
    ("slice range without a colon", dict(image="phantom", params={"query": "q", "slice_range": "3"}), 400,
     "slice range must look like 'start:stop'"),
    ("bad key slice", dict(image="phantom", params={"query": "q", "key_slice": "middle"}), 400, "key slice"),
    ("bad result extension", dict(image="phantom", params={"query": "q", "result_extension": ".exe"}), 400,
     "result_extension"),
    ("no image at all", dict(params={"query": "q"}), 400, "no image"),
]


def test_bad_requests_get_a_4xx_with_a_clear_message_and_the_server_keeps_serving(server, files, tmp_path):
    import requests

    got = {}
    for label, kwargs, code, words in BAD_REQUESTS:
        status, body, _, _ = post_infer(server.url, **kwargs)
        got[label] = (status, body)
        assert status == code and words in body["detail"], (label, status, body)
    # uploads that are not images: a text file by name, and a text file calling itself NIfTI
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    status, body, _, _ = post_infer(server.url, upload=text, params={"query": "q"})
    assert status == 415 and "unsupported upload" in body["detail"]
    fake = tmp_path / "fake.nii.gz"
    fake.write_text("not an image either")
    status, body, _, _ = post_infer(server.url, upload=fake, params={"query": "q"})
    assert 400 <= status < 500 and "fake.nii.gz" in body["detail"] and "/tmp" not in body["detail"]
    r = requests.post(f"{server.url}/infer/nope", params={"image": "phantom"}, data={"params": "{}"}, timeout=30)
    assert r.status_code == 404 and "no model" in r.json()["detail"]
    # still serving, and still right
    assert requests.get(server.url + "/info/", timeout=30).status_code == 200
    status, record, _, _ = post_infer(server.url, image="phantom", params={"query": "Still there?", **VOLUME_OPTIONS})
    assert status == 200 and record["status"] == "ok" and record["query"] == "Still there?"
    # JSON params may give the slice range as a [start, stop] pair, as the worker protocol does
    status, record, _, _ = post_infer(server.url, image="phantom", params={"query": "A pair?", **VOLUME_OPTIONS,
                                                                           "slice_range": [2, 4]})
    assert status == 200 and record["slice_range"] == [2, 4]


def test_eight_concurrent_questions_each_get_their_own_answer(server, files):
    import requests

    queries = [f"Question {i}: which structure explains symptom number {i}?" for i in range(8)]
    infos: list[float] = []
    stop = threading.Event()

    def probe():  # the event loop must keep answering while inference runs
        while not stop.is_set():
            t0 = time.perf_counter()
            assert requests.get(server.url + "/info/", timeout=60).status_code == 200
            infos.append(time.perf_counter() - t0)
            time.sleep(0.2)

    def ask(i: int):
        kwargs = dict(image="phantom") if i % 2 == 0 else dict(upload=files["oblique"])
        return post_infer(server.url, params={"query": queries[i], **VOLUME_OPTIONS}, **kwargs)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    finally:
        stop.set()
        prober.join(timeout=60)
    assert len(answers) == 8
    for q, (status, record, data, _) in zip(queries, answers):
        assert status == 200, record
        assert record["query"] == q and q in record["reasoning"] and record["label_names"] == {q[:60]: 1}
        assert record["status"] == "ok" and data
    assert infos and max(infos) < 30, infos


# ------------------------------------------------------------------------------- real tiny Qwen CRM
@pytest.fixture(scope="module")
def qwen_server(files, tmp_path_factory):
    from medreasoner.models.tiny import build_tiny_crm

    crm = build_tiny_crm(tmp_path_factory.mktemp("tiny_qwen") / "crm", format_steps=0)
    srv = Server(files["studies"], files["root"] / "qwen_server.log",
                 {"crm": str(crm), "asm": "litemedsam", "device": "cpu", "max_new_tokens": "48"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_real_tiny_qwen_crm_answers_over_http(qwen_server, files, tmp_path):
    from PIL import Image

    from medreasoner.constants import TINY_WARNING
    from medreasoner.engine import validate_record

    status, record, data, name = post_infer(qwen_server.url, upload=files["png"], params={
        "query": "Which organ would explain the pain?", "prompt": "direct"})
    assert status == 200, record
    validate_record(record)
    assert record["status"] in ("ok", "no_target") and TINY_WARNING in record["warnings"]
    assert record["crm"]["tiny_test_model"] is True and record["counts"]["crm_calls"] == 1
    # the server's folders are never named to clients: the weights by name (and fingerprint) only
    assert record["crm"]["model"] == "crm" and record["crm"]["fingerprint"]
    assert "/" not in str(record["asm"].get("checkpoint") or "")
    import requests

    info = requests.get(qwen_server.url + "/info/", timeout=30).json()
    described = info["models"][TASK]["description"]
    assert str(tmp_path.anchor) + "tmp" not in described and "CRM crm " in described
    assert info["medreasoner"]["crm"]["model"] == "crm" and "/" not in str(info["medreasoner"]["asm"]["checkpoint"])
    assert np.asarray(Image.open(io.BytesIO(data))).shape == (56, 64)


def test_a_missing_crm_folder_is_a_clear_startup_error(files, tmp_path):
    srv = Server(files["studies"], tmp_path / "bad_server.log", {"crm": str(tmp_path / "no_such_crm")})
    try:
        assert srv.proc.wait(timeout=STARTUP_S) != 0
    finally:
        srv.stop()
    assert f"CRM folder not found: {tmp_path / 'no_such_crm'}" in srv.tail(20_000)


# --------------------------------------------------------------------------------------- plugins
def test_load_plugins_imports_modules_and_files_once_with_clear_errors(tmp_path):
    from medreasoner.errors import InputError
    from medreasoner.models.registry import CRMS, load_plugins

    plugin = tmp_path / "my_crm_plugin.py"
    plugin.write_text("from medreasoner.models.registry import CRMS\n"
                      "@CRMS.register('unit-test-plugin-crm')\ndef make(**kw):\n    return None\n")
    first = load_plugins(f"json, {plugin}")
    assert [m.__name__ for m in first] == ["json", "my_crm_plugin"] and "unit-test-plugin-crm" in CRMS.names()
    assert load_plugins([str(plugin)])[0] is first[1]  # a second load does not register twice
    assert load_plugins("") == [] and load_plugins(None) == []
    with pytest.raises(InputError, match="could not import plugin 'no_such_plugin_module'"):
        load_plugins("no_such_plugin_module")
    with pytest.raises(InputError, match="plugin file not found"):
        load_plugins(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match="broken_plugin.py.*RuntimeError: boom"):
        load_plugins(str(broken))
