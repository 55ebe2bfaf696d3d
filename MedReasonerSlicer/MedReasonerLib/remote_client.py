"""A MONAI Label server as the compute back end, over its REST API, with the standard library only.

Speaks what MONAI Label's own Slicer plugin speaks: ``GET /info/``, and ``POST /infer/<task>?image=<id>``
with a multipart form holding ``params`` (JSON: the task options, ``result_extension``,
``result_dtype``) and, when the image is not in the server's datastore, the image ``file``. The
answer is multipart: a ``params`` part (our result record) and the label file. (``cgi`` is gone in
Python 3.13, so the answer is parsed with ``email``.)
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import http.client
import json
import os
import socket
import uuid
from typing import Any
from urllib.parse import quote, urlparse

from MedReasonerLib.errors import MedReasonerSlicerError

RESULT_EXTENSION = ".seg.nrrd"  # Slicer reads segment names and exact geometry from it
INFO_TIMEOUT_S = 10.0


class RemoteClient:
    def __init__(self, server_url: str, timeout: float = 3600.0):
        url = urlparse(str(server_url).strip())
        if url.scheme not in ("http", "https") or not url.hostname:
            raise MedReasonerSlicerError(f"server URL must look like http://host:port, got {server_url!r}", "input")
        self.url, self.timeout = url, float(timeout)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
        self._conn = cls(self.url.hostname, self.url.port, timeout=timeout)
        return self._conn

    def _request(self, method: str, path: str, body: bytes = b"", headers=None, timeout: float = INFO_TIMEOUT_S):
        conn = self._connection(timeout)
        where = f"{self.url.scheme}://{self.url.netloc}"
        try:
            conn.request(method, self.url.path.rstrip("/") + path, body=body or None, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        except (ConnectionError, socket.timeout, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, socket.timeout):
                raise MedReasonerSlicerError(f"the MONAI Label server at {where} did not answer in {timeout:.0f} s",
                                             "server") from exc
            raise MedReasonerSlicerError(f"cannot reach the MONAI Label server at {where}: {exc}", "server") from exc
        finally:
            conn.close()

    def close(self) -> None:
        """Abort a request in flight (cancel): its socket is closed, its answer is dropped."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def info(self) -> dict[str, Any]:
        response, body = self._request("GET", "/info/")
        if response.status != 200:
            raise MedReasonerSlicerError(_server_message(response.status, body), "server")
        return json.loads(body)

    def check_task(self, task: str) -> dict[str, Any]:
        """The task's description from /info/; a clear error when the server has no such task."""
        models = self.info().get("models", {})
        if task not in models:
            raise MedReasonerSlicerError(f"the server has no task {task!r}; it offers "
                                         f"{', '.join(sorted(models)) or 'none'}", "server")
        return models[task]

    def infer(self, task: str, params: dict[str, Any], image_file: str | None = None, image_id: str = "",
              out_dir: str | None = None) -> tuple[str | None, dict[str, Any]]:
        """Run ``task`` on an uploaded file or a datastore image; returns (label path or None, result params)."""
        params = {"result_extension": RESULT_EXTENSION, "result_dtype": "uint8", **params}
        files = {"file": image_file} if image_file else {}
        ctype, body = _multipart({"params": json.dumps(params)}, files)
        path = f"/infer/{quote(task, safe='')}?image={quote(image_id, safe='')}&output=all"
        response, data = self._request("POST", path, body, {"Content-Type": ctype,
                                                            "Content-Length": str(len(body))}, self.timeout)
        if response.status != 200:
            raise MedReasonerSlicerError(_server_message(response.status, data), "server")
        rtype = response.getheader("content-type", "")
        if "multipart" not in rtype:
            return None, json.loads(data or b"{}")
        return _parse_multipart(rtype, data, out_dir)


def _multipart(fields: dict[str, str], files: dict[str, str]) -> tuple[str, bytes]:
    boundary = "MedReasoner" + uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n').encode()
        out += value.encode("utf-8") + b"\r\n"
    for name, path in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{os.path.basename(path)}"\r\nContent-Type: application/octet-stream\r\n\r\n').encode()
        with open(path, "rb") as f:
            out += f.read()
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(out)


def _parse_multipart(content_type: str, data: bytes, out_dir: str | None) -> tuple[str | None, dict[str, Any]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + data)
    label, result = None, {}
    for part in message.iter_parts():
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename:
            if out_dir is None:
                raise MedReasonerSlicerError("no folder to save the server's label into", "server")
            # the server names the file; only its base name is used, inside our own folder
            name = os.path.basename(filename.replace("\\", "/")) or "label" + RESULT_EXTENSION
            label = os.path.join(out_dir, name)
            with open(label, "wb") as f:
                f.write(payload)
        elif part.get_param("name", header="content-disposition") == "params":
            result = json.loads(payload or b"{}")
    return label, result


def _server_message(status: int, body: bytes) -> str:
    """The server's own one-line reason (FastAPI's ``detail``) with the HTTP status."""
    text = body.decode("utf-8", "replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    detail = " ".join(str(detail).split())[:300]
    return f"the MONAI Label server refused the request (HTTP {status}): {detail}"
