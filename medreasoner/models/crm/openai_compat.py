"""CRM backend for any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs).

Serve a checkpoint, then point this backend at it::

    vllm serve zzzyzh/MedReasoner-Soft-7B          # listens on http://127.0.0.1:8000/v1
    load_crm("zzzyzh/MedReasoner-Soft-7B", backend="openai", base_url="http://127.0.0.1:8000/v1")

Only the standard library is used. Each image is resized like the transformers backend does
(``image_size`` square by default, bicubic), sent as a PNG data URL, and the answer is parsed in the
pixel space of the image that was sent, then mapped back to the original image exactly. An API cannot
report any further resizing done by the server, so the sent size is taken as the model's pixel space.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from typing import Any

import numpy as np

from medreasoner.constants import DEFAULT_CRM_IMAGE_SIZE as DEFAULT_IMAGE_SIZE
from medreasoner.constants import DEFAULT_OPENAI_BASE_URL as DEFAULT_BASE_URL
from medreasoner.errors import InputError, ModelLoadError
from medreasoner.imaging.resize import ResizeMap, target_size
from medreasoner.models.crm.base import CRM, CRMAnswer, GenerationConfig, answer_in_original_pixels
from medreasoner.models.prompts import PromptKind, builtin_template
from medreasoner.models.registry import CRMS

log = logging.getLogger(__name__)


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_BODY_LIMIT = 500  # characters of a server's error body quoted in our messages



def checked_base_url(base_url: Any) -> str:
    """The server's API root (a trailing ``/chat/completions`` dropped); InputError unless http(s)."""
    url = str(base_url or "").strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {base_url!r}")
    return url

class _Retryable(Exception):
    """A failure worth another try (connection refused, timeout, 5xx); the message says which."""


def _clip(text: str, limit: int = _BODY_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_detail(body: bytes) -> str:
    """The server's own error message: ``{"error": {"message": ...}}`` when it sends one."""
    text = body.decode("utf-8", errors="replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return _clip(text)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _clip(err["message"])
        if isinstance(err, str):
            return _clip(err)
        if isinstance(obj.get("message"), str):
            return _clip(obj["message"])
        if isinstance(obj.get("detail"), str):
            return _clip(obj["detail"])
    return _clip(text)


def _completion_text(obj: Any) -> str:
    """``choices[0].message.content`` of a chat completion; "" when the model gave no text.

    A body that is not a chat completion at all raises ``ValueError``.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise ValueError("no 'choices' list")
    choice = obj["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise ValueError("choices[0] has no 'message' object")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers return content parts
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""  # null content (refusal, tool call): the parser reports no answer


class OpenAICompatCRM(CRM):
    """A CRM served behind ``POST {base_url}/chat/completions``."""

    name = "openai"
    retry_backoff = 0.5  # seconds before the first retry; doubled for each further one

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        image_size: int | tuple[int, int] | None | str = DEFAULT_IMAGE_SIZE,
        generation: GenerationConfig | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        concurrency: int = 4,
        **_ignored: Any,  # transformers-only options (device, batch_size, ...) passed by the CLI
    ):
        self.model_id = str(model)
        if not self.model_id:
            raise ModelLoadError("the openai backend needs the served model name (e.g. the hub id given to vllm serve)")
        try:
            url = checked_base_url(base_url)
        except InputError as exc:
            raise ModelLoadError(str(exc)) from exc
        self.base_url = url
        self.endpoint = url + "/chat/completions"
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "EMPTY"
        if image_size == "auto":
            image_size = DEFAULT_IMAGE_SIZE
        if isinstance(image_size, (list, tuple)):
            image_size = (int(image_size[0]), int(image_size[1]))
        self.image_size = image_size
        self.generation = generation or GenerationConfig()
        self.timeout = float(timeout)
        self.max_retries = max(0, int(max_retries))
        self.concurrency = max(1, int(concurrency))
        # Loopback servers are reached directly, whatever HTTP(S)_PROXY says; others honour it.
        handlers = [urllib.request.ProxyHandler({})] if urllib.parse.urlsplit(url).hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        if _ignored:
            log.debug("openai CRM backend ignores %s", ", ".join(sorted(_ignored)))

    def __repr__(self) -> str:  # never shows the api key
        return f"{type(self).__name__}(model={self.model_id!r}, base_url={self.base_url!r})"

    def extra_description(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "image_size": self.image_size,
                "max_new_tokens": self.generation.max_new_tokens, "greedy": not self.generation.do_sample,
                "concurrency": self.concurrency}

    # -- requests -------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray) -> tuple[str, ResizeMap]:
        """PNG data URL of the resized image, and the map between original and sent pixels."""
        from PIL import Image

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"CRM images must be uint8 RGB arrays, got dtype {arr.dtype}")
        h, w = arr.shape[:2]
        tw, th = target_size(w, h, self.image_size)
        pil = Image.fromarray(arr).convert("RGB")
        if (tw, th) != (w, h):
            pil = pil.resize((tw, th), Image.BICUBIC)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return url, ResizeMap(w, h, tw, th)

    def _payload(self, data_url: str, question: str, prompt: PromptKind) -> dict[str, Any]:
        gen = self.generation
        payload: dict[str, Any] = {
            "model": self.model_id,
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": self.prompt_text(question, prompt)},
                ],
            }],
            "max_tokens": int(gen.max_new_tokens),
        }
        if gen.do_sample:
            payload.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            payload["temperature"] = 0.0
        payload.update(gen.extra)  # server-specific options (seed, repetition_penalty, ...)
        return payload

    def _post_once(self, body: bytes) -> bytes:
        req = urllib.request.Request(
            self.endpoint, data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "Authorization": f"Bearer {self._api_key}"},
        )
        where = f"CRM server {self.endpoint}"
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = _error_detail(exc.read())
            except (OSError, HTTPException):
                detail = ""
            finally:
                exc.close()
            msg = f"{where} answered HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(msg) from exc
            hint = ""
            if exc.code in (401, 403):
                hint = " (check api_key / OPENAI_API_KEY)"
            elif exc.code == 404:
                hint = f" (is {self.base_url} the server's /v1 root, and is {self.model_id!r} the served model name?)"
            raise ModelLoadError(msg + hint) from exc
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise _Retryable(f"{where} did not answer within {self.timeout:g} s") from exc
            if isinstance(reason, OSError):
                raise _Retryable(f"could not reach {where}: {reason.strerror or reason}") from exc
            raise ModelLoadError(f"could not reach {where}: {reason}") from exc
        except TimeoutError as exc:
            raise _Retryable(f"{where} did not answer within {self.timeout:g} s") from exc
        except (OSError, HTTPException) as exc:  # reset, remote disconnected, truncated read
            raise _Retryable(f"connection to {where} failed: {exc!r}") from exc

    def _post(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload).encode("utf-8")
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                raw = self._post_once(body)
                break
            except _Retryable as exc:
                if attempt + 1 >= attempts:
                    raise ModelLoadError(f"{exc} (gave up after {attempts} attempt(s))") from exc
                delay = self.retry_backoff * (2 ** attempt)
                log.warning("%s; retrying in %.1f s", exc, delay)
                time.sleep(delay)
        try:
            return _completion_text(json.loads(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"CRM server {self.endpoint} did not return a chat completion ({exc}): "
                f"{_clip(raw.decode('utf-8', errors='replace'))}"
            ) from exc

    def _one(self, image: np.ndarray, question: str, prompt: PromptKind) -> CRMAnswer:
        t0 = time.perf_counter()
        data_url, rmap = self._prepare(image)
        text = self._post(self._payload(data_url, question, prompt))
        return CRMAnswer(text, answer_in_original_pixels(text, rmap), rmap, time.perf_counter() - t0)

    def answer_batch(
        self, images: Sequence[np.ndarray], questions: Sequence[str], prompt: PromptKind = "reasoning"
    ) -> list[CRMAnswer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if self.prompt_template is None:
            builtin_template(prompt)  # an unknown prompt kind fails here, before any request
        if not images:
            return []
        workers = min(self.concurrency, len(images))
        if workers == 1:
            return [self._one(im, q, prompt) for im, q in zip(images, questions)]
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medreasoner-crm")
        try:
            futures = [pool.submit(self._one, im, q, prompt) for im, q in zip(images, questions)]
            return [f.result() for f in futures]  # input order; the first failure is raised
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@CRMS.register("openai", help="any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted APIs); "
                              "pass base_url")
def _make_openai(**kwargs: Any) -> OpenAICompatCRM:
    return OpenAICompatCRM(**kwargs)
