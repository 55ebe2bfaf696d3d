"""The OpenAI-compatible CRM backend against a real HTTP server on loopback.

The fake server checks each request (model, auth header, one PNG data URL, the prompt text) and
answers from what it received: a box over the central half of the image *as decoded by the server*,
so the expected boxes in original pixels are derived independently of the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medreasoner.errors import ModelLoadError
from medreasoner.models.answer import AnswerStatus
from medreasoner.models.crm import GenerationConfig, load_crm
from medreasoner.models.crm.openai_compat import OpenAICompatCRM  # importing it registers "openai"
from medreasoner.models.prompts import build_prompt

MODEL = "zzzyzh/MedReasoner-Soft-7B"
KEY = "sk-test-123"
PNG_PREFIX = "data:image/png;base64,"


@dataclass
class ServerState:
    model: str = MODEL
    api_key: str = KEY
    expected_size: tuple[int, int] | None = None  # (w, h) every image must decode to
    failures: list[tuple[int, str]] = field(default_factory=list)  # served first, one per request
    content: Any = "computed"  # or a fixed completion content (str or None)
    raw_body: bytes | None = None  # a 200 body to send verbatim instead of a completion
    delay_by_value: dict[int, float] = field(default_factory=dict)  # image pixel value -> seconds
    delay: float = 0.0
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def central_half_answer(w: int, h: int, think: str) -> str:
    box = [w / 4, h / 4, 3 * w / 4, 3 * h / 4]
    p1, p2 = [w / 2, h / 2], [5 * w / 8, h / 2]
    return f"<think>{think}</think><answer>{json.dumps({'bbox': box, 'points_1': p1, 'points_2': p2})}</answer>"


def expected_central_half(w: int, h: int) -> tuple[tuple, list]:
    return (w / 4, h / 4, 3 * w / 4, 3 * h / 4), [(w / 2, h / 2), (5 * w / 8, h / 2)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes | dict, ctype: str = "application/json") -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

    def do_POST(self):  # noqa: N802 - http.server's naming
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            record = {"path": self.path, "auth": self.headers.get("Authorization"), "payload": req}
            state.requests.append(record)
            failure = state.failures.pop(0) if state.failures else None
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        if failure is not None:
            return self._error(*failure)
        if self.headers.get("Authorization") != f"Bearer {state.api_key}":
            return self._error(401, "Incorrect API key provided: " + str(self.headers.get("Authorization")))
        if req.get("model") != state.model:
            return self._error(404, f"The model `{req.get('model')}` does not exist.")
        if req.get("max_tokens", 0) > 4096:
            return self._error(400, f"max_tokens={req['max_tokens']} is too large for the context length 4096")
        msgs = req.get("messages")
        if not (isinstance(msgs, list) and len(msgs) == 1 and msgs[0].get("role") == "user"):
            return self._error(400, "expected one user message")
        parts = msgs[0]["content"]
        images = [p for p in parts if p.get("type") == "image_url"]
        texts = [p for p in parts if p.get("type") == "text"]
        if len(images) != 1 or len(texts) != 1 or parts[0] is not images[0]:
            return self._error(400, "expected the image first, then one text part")
        url = images[0]["image_url"]["url"]
        if not url.startswith(PNG_PREFIX):
            return self._error(400, "image is not a PNG data URL")
        png = base64.b64decode(url[len(PNG_PREFIX):], validate=True)
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            return self._error(400, "data URL does not hold a PNG")
        img = Image.open(io.BytesIO(png))
        img.load()
        w, h = img.size
        value = int(np.asarray(img.convert("RGB"))[0, 0, 0])
        with state.lock:
            record.update(size=(w, h), mode=img.mode, value=value, text=texts[0]["text"])
        if state.expected_size is not None and (w, h) != state.expected_size:
            return self._error(400, f"image is {w}x{h}, expected {state.expected_size}")
        time.sleep(state.delay + state.delay_by_value.get(value, 0.0))
        if state.raw_body is not None:
            return self._send(200, state.raw_body, "text/html")
        content = central_half_answer(w, h, f"value {value}") if state.content == "computed" else state.content
        self._send(200, {"id": "cmpl-1", "object": "chat.completion", "model": state.model,
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"  # type: ignore[attr-defined]
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make_crm(server, **kw) -> OpenAICompatCRM:
    kw.setdefault("api_key", KEY)
    crm = OpenAICompatCRM(MODEL, base_url=server.base_url, **kw)
    crm.retry_backoff = 0.01
    return crm


def uniform(h: int, w: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_non_square_image_maps_back_to_original_pixels(server, rng):
    server.state.expected_size = (840, 840)
    crm = make_crm(server)
    image = rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)  # 200 wide, 100 high
    a = crm.answer(image, "Where is the lesion?")
    assert a.answer.status is AnswerStatus.OK, a.answer.message
    (rec,) = server.state.requests
    assert rec["size"] == (840, 840) and rec["mode"] == "RGB"
    assert (a.resize.orig_w, a.resize.orig_h, a.resize.model_w, a.resize.model_h) == (200, 100, 840, 840)
    box, points = expected_central_half(200, 100)  # the server's central half, seen in original pixels
    assert a.answer.box == pytest.approx(box, abs=1e-9)
    assert [tuple(p) for p in a.answer.points] == [pytest.approx(p, abs=1e-9) for p in points]
    assert a.answer.box == pytest.approx((50, 25, 150, 75), abs=1e-9)
    assert a.seconds > 0 and a.to_dict()["model_input_size"] == [840, 840]


def test_request_shape_auth_prompt_and_greedy_settings(server):
    crm = make_crm(server, generation=GenerationConfig(max_new_tokens=321, extra={"seed": 7}))
    crm.answer(uniform(30, 40, 9), "Which structure is enlarged?", prompt="direct")
    (rec,) = server.state.requests
    p = rec["payload"]
    assert rec["path"] == "/v1/chat/completions" and rec["auth"] == f"Bearer {KEY}"
    assert p["model"] == MODEL and p["max_tokens"] == 321 and p["temperature"] == 0 and p["seed"] == 7
    assert "top_p" not in p
    assert rec["text"] == build_prompt("Which structure is enlarged?", "direct")
    assert "Which structure is enlarged?" in rec["text"]


def test_sampling_settings_are_sent(server):
    gen = GenerationConfig(max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9)
    make_crm(server, generation=gen).answer(uniform(8, 8, 1), "q?")
    p = server.state.requests[0]["payload"]
    assert (p["temperature"], p["top_p"], p["max_tokens"]) == (0.7, 0.9, 64)


@pytest.mark.parametrize("image_size, sent", [(None, (200, 100)), ((420, 210), (420, 210)), (56, (56, 56))])
def test_image_size_options(server, image_size, sent):
    server.state.expected_size = sent
    a = make_crm(server, image_size=image_size).answer(uniform(100, 200, 50), "q?")
    assert server.state.requests[0]["size"] == sent
    assert (a.resize.model_w, a.resize.model_h) == sent
    assert a.answer.box == pytest.approx(expected_central_half(200, 100)[0], abs=1e-9)


def test_grayscale_array_is_sent_as_rgb(server):
    make_crm(server).answer(np.full((20, 30), 77, dtype=np.uint8), "q?")
    rec = server.state.requests[0]
    assert rec["mode"] == "RGB" and rec["value"] == 77


def test_batch_order_is_kept_when_later_requests_finish_first(server):
    shapes = [(100, 200), (150, 90), (64, 64), (33, 250), (300, 120)]
    values = [10, 60, 110, 160, 210]
    # The first image answers last: completions arrive in reverse order.
    server.state.delay_by_value = {v: 0.08 * (len(values) - i) for i, v in enumerate(values)}
    crm = make_crm(server, concurrency=5)
    images = [uniform(h, w, v) for (h, w), v in zip(shapes, values)]
    questions = [f"question {i}?" for i in range(len(images))]
    t0 = time.perf_counter()
    answers = crm.answer_batch(images, questions)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.08 * sum(range(1, 6))  # the requests overlapped
    # Every image went out once, with its own question, in parallel.
    seen = {r["value"]: r["text"] for r in server.state.requests}
    assert {v: f"question {i}?" in seen[v] for i, v in enumerate(values)} == dict.fromkeys(values, True)
    for (h, w), v, a in zip(shapes, values, answers):
        assert a.answer.think == f"value {v}"
        assert (a.resize.orig_w, a.resize.orig_h) == (w, h)
        assert a.answer.box == pytest.approx(expected_central_half(w, h)[0], abs=1e-9)


def test_empty_batch_and_length_mismatch(server):
    crm = make_crm(server)
    assert crm.answer_batch([], []) == []
    with pytest.raises(ValueError, match="questions"):
        crm.answer_batch([uniform(4, 4, 0)], [])
    assert server.state.requests == []


def test_server_errors_are_retried(server):
    server.state.failures = [(500, "boom"), (503, "warming up")]
    a = make_crm(server, max_retries=2).answer(uniform(50, 80, 5), "q?")
    assert a.answer.status is AnswerStatus.OK
    assert len(server.state.requests) == 3


def test_retries_exhausted_is_a_clear_error(server):
    server.state.failures = [(500, "kaboom")] * 5
    crm = make_crm(server, max_retries=1)
    with pytest.raises(ModelLoadError) as err:
        crm.answer(uniform(50, 80, 5), "q?")
    msg = str(err.value)
    assert "HTTP 500" in msg and "kaboom" in msg and server.base_url in msg and "2 attempt" in msg
    assert len(server.state.requests) == 2


def test_wrong_api_key_is_401_not_retried(server):
    crm = make_crm(server, api_key="sk-wrong", max_retries=3)
    with pytest.raises(ModelLoadError) as err:
        crm.answer(uniform(10, 10, 1), "q?")
    msg = str(err.value)
    assert "HTTP 401" in msg and "Incorrect API key provided" in msg and server.base_url in msg
    assert len(server.state.requests) == 1


def test_bad_request_400_carries_server_message(server):
    crm = make_crm(server, generation=GenerationConfig(max_new_tokens=99999))
    with pytest.raises(ModelLoadError, match=r"HTTP 400.*max_tokens=99999 is too large"):
        crm.answer(uniform(10, 10, 1), "q?")
    assert len(server.state.requests) == 1


def test_unknown_model_404(server):
    crm = OpenAICompatCRM("not-served", base_url=server.base_url, api_key=KEY)
    with pytest.raises(ModelLoadError, match=r"HTTP 404.*`not-served` does not exist"):
        crm.answer(uniform(10, 10, 1), "q?")


def test_long_error_body_is_truncated(server):
    server.state.failures = [(400, "x" * 5000)]
    with pytest.raises(ModelLoadError) as err:
        make_crm(server).answer(uniform(10, 10, 1), "q?")
    assert len(str(err.value)) < 1000 and str(err.value).endswith("...")


def test_nothing_listening_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    crm = OpenAICompatCRM(MODEL, base_url=url, timeout=2, max_retries=1)
    crm.retry_backoff = 0.01
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        crm.answer(uniform(10, 10, 1), "q?")
    assert time.perf_counter() - t0 < 3
    assert url in str(err.value) and "could not reach" in str(err.value)


def test_slow_server_times_out(server):
    server.state.delay = 1.5
    crm = make_crm(server, timeout=0.3, max_retries=0)
    with pytest.raises(ModelLoadError, match="did not answer within 0.3 s"):
        crm.answer(uniform(10, 10, 1), "q?")


@pytest.mark.parametrize("content", ["I am not sure what you mean 🙂 {{{ <answer", "", None,
                                     "<answer>{'bbox': [1, 2]}</answer>"])
def test_garbage_completion_goes_through_the_parser(server, content):
    server.state.content = content
    a = make_crm(server).answer(uniform(10, 10, 1), "q?")
    assert a.answer.box is None
    assert a.text == (content or "")
    if content in ("", None) or "<answer>" not in content:
        assert a.answer.status is AnswerStatus.NO_ANSWER


def test_non_completion_200_body_is_a_clear_error(server):
    server.state.raw_body = b"<html>It works!</html>"
    with pytest.raises(ModelLoadError, match="did not return a chat completion.*It works"):
        make_crm(server).answer(uniform(10, 10, 1), "q?")


def test_load_crm_through_the_registry(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the default key comes from the environment
    crm = load_crm(MODEL, backend="openai", base_url=server.base_url + "/chat/completions/",
                   device="cpu", batch_size=4, trust_remote_code=False,
                   generation=GenerationConfig(max_new_tokens=100))
    assert isinstance(crm, OpenAICompatCRM) and crm.base_url == server.base_url
    a = crm.answer(uniform(64, 128, 3), "Where?")
    assert a.answer.box == pytest.approx(expected_central_half(128, 64)[0], abs=1e-9)
    d = crm.describe()
    assert d["backend"] == "openai" and d["model"] == MODEL and d["base_url"] == server.base_url
    assert KEY not in json.dumps(d) and KEY not in repr(crm)
    from medreasoner.models.registry import CRMS

    assert "openai" in CRMS.names()


def test_default_api_key_is_empty(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert OpenAICompatCRM(MODEL)._api_key == "EMPTY"


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "ftp://host/v1", ""])
def test_bad_base_url(url):
    with pytest.raises(ModelLoadError, match="base_url"):
        OpenAICompatCRM(MODEL, base_url=url)
