"""A long-lived worker: models loaded once, requests served as JSON lines over stdin/stdout.

This is what a GUI (the 3D Slicer module) drives: it writes the volume to a temporary file, sends a
``ground`` request and reads progress, one ``result`` per question (with the ``.seg.nrrd`` path) and
``done``. stdout carries protocol lines only (``{"v": 1, "type": ...}``); human logs go to stderr.

Client -> worker::

    {"type": "ground", "id": "r1", "input": "/tmp/vol.nrrd", "queries": ["q1", "q2"],
     "options": {"strategy": "keyslice", ...RunOptions fields}, "out_dir": "/tmp/out"}
    {"type": "cancel", "id": "r1"}
    {"type": "shutdown"}

Worker -> client: ``ready`` once; per request ``progress``/``log`` lines, ``result`` per question,
then exactly one of ``done``, ``error`` or ``cancelled``; ``error`` with ``kind: protocol`` for lines
that are not a valid message; ``fatal`` before exiting when the models cannot be loaded.

Requests run one at a time on a worker thread while a reader thread keeps reading stdin, so a
``cancel`` is seen while a request runs; the engine stops between batches.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from medreasoner.constants import EXIT_CANCELLED, EXIT_INPUT, EXIT_MODEL, EXIT_OK
from medreasoner.engine.events import EVENTS_PROTOCOL_VERSION, CancelToken, Events, Stage
from medreasoner.errors import CancelledError, InputError, MedReasonerError

log = logging.getLogger("medreasoner.worker")

MESSAGE_TYPES = ("ground", "cancel", "shutdown")


class ProtocolError(MedReasonerError):
    """A line that is not a message this worker understands (the worker keeps serving)."""


@dataclass
class GroundRequest:
    id: str
    input: str
    queries: list[str]
    options: Any  # RunOptions, checked
    out_dir: Path


def parse_message(line: str) -> dict[str, Any]:
    """One stdin line as a message dict with a known ``type``; ``ProtocolError`` otherwise."""
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    if msg.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {msg.get('type')!r}; expected one of {', '.join(MESSAGE_TYPES)}")
    if msg["type"] != "shutdown" and not _valid_id(msg.get("id")):
        raise ProtocolError(f"a {msg['type']} message needs an 'id' (a non-empty string or an integer)")
    return msg


def _valid_id(value: Any) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def check_ground(msg: dict[str, Any]) -> GroundRequest:
    """Validate a ``ground`` message without touching the models; ``InputError`` says what is wrong."""
    from medreasoner.engine.session import RunOptions, check_query
    from medreasoner.io.files import check_input_path

    unknown = sorted(set(msg) - {"v", "type", "id", "input", "queries", "options", "out_dir"})
    if unknown:
        raise InputError(f"unknown request field(s): {', '.join(unknown)}")
    source = msg.get("input")
    if not isinstance(source, str) or not source.strip():
        raise InputError("'input' must be the path of a volume or image file")
    check_input_path(source, "input")
    queries = msg.get("queries")
    if isinstance(queries, str):
        queries = [queries]
    if not isinstance(queries, list) or not queries:
        raise InputError("'queries' must be a non-empty list of questions")
    queries = [check_query(q) for q in queries]
    options = msg.get("options") or {}
    if not isinstance(options, dict):
        raise InputError("'options' must be an object of run options")
    run_options = RunOptions.from_mapping(options)
    out_dir = msg.get("out_dir")
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise InputError("'out_dir' must be the folder to write results into")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"out_dir {out_dir} exists and is not a folder")
    if Path(source).is_dir():  # a DICOM series folder: our files would land among its slices
        from medreasoner.engine.output_sets import check_output_root

        check_output_root(Path(out_dir), [Path(source)])
    return GroundRequest(msg["id"], source, queries, run_options, Path(out_dir))


MAX_MESSAGE_CHARS = 2000  # a protocol line quotes what it was sent; a 20 MB path must not come back whole


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 20] + f"... ({len(text)} chars)"


class _RequestEvents(Events):
    """Engine events of one question as protocol lines tagged with the request id."""

    def __init__(self, worker: Worker, rid: Any, index: int, cancel: CancelToken):
        self.worker, self.rid, self.index, self.cancel = worker, rid, index, cancel

    def progress(self, stage: Stage, done: int, total: int) -> None:
        self.worker.emit({"type": "progress", "id": self.rid, "query_index": self.index, "stage": str(stage),
                          "done": int(done), "total": int(total)})

    def log(self, message: str, level: str = "info") -> None:
        self.worker.emit({"type": "log", "id": self.rid, "query_index": self.index, "level": level,
                          "message": str(message)})

    def cancelled(self) -> bool:
        return self.cancel.is_set()


class Worker:
    """Serves requests for one session; ``serve()`` returns the process exit code."""

    def __init__(self, session: Any, stdin: IO, stdout: IO[str]):
        """``stdin`` may be text or binary (lines are decoded here); ``stdout`` is text."""
        self.session, self.stdin, self.stdout = session, stdin, stdout
        self._out_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._state_lock = threading.Lock()  # guards the running request, its token and the cancelled ids
        self._running: Any = None
        self._token: CancelToken | None = None
        self._signalled = False
        self._pending: list = []  # ids received and not started yet (the queue itself is not inspected)
        self._cancelled_ids: set = set()
        self._shutdown = False
        self._finished = threading.Event()
        self._exit_code = EXIT_OK

    # -- output --------------------------------------------------------------------------------
    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps({"v": EVENTS_PROTOCOL_VERSION, **obj}, ensure_ascii=False, default=str)
        with self._out_lock:  # reader, runner and signal paths all write; lines must not interleave
            self.stdout.write(line + "\n")
            self.stdout.flush()

    # -- threads -------------------------------------------------------------------------------
    def serve(self) -> int:
        self.emit({"type": "ready", "models": self.session.models.describe(), "pid": os.getpid(),
                   "tiny_test_model": self.session.models.is_tiny})
        threading.Thread(target=self._read, name="worker-stdin", daemon=True).start()
        # daemon: a forced exit (second signal) must not wait for a model call to return
        threading.Thread(target=self._run, name="worker-run", daemon=True).start()
        while not self._finished.wait(0.2):  # a timed wait keeps the main thread free for signals
            pass
        return self._exit_code

    def on_signal(self, *_: Any) -> None:
        """First signal cancels the running request; a second one, or one while idle, exits."""
        with self._state_lock:
            if self._running is not None and not self._signalled:
                self._signalled = True
                self._token.set()
                return
            code = EXIT_CANCELLED if self._running is not None else EXIT_OK
        self._stop(code)

    def _stop(self, code: int) -> None:
        self._exit_code = code
        self._finished.set()

    def _read(self) -> None:
        while True:
            line = self.stdin.readline()
            if not line:
                break
            if isinstance(line, bytes):  # binary stdin: a bad byte spoils one line, not the stream
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.emit({"type": "error", "id": None, "kind": "protocol", "message": f"not UTF-8: {exc}"})
                    continue
            if not line.strip():
                continue
            try:
                msg = parse_message(line)
            except ProtocolError as exc:
                self.emit({"type": "error", "id": None, "kind": "protocol", "message": one_line(exc)})
                continue
            if msg["type"] == "cancel":
                self._cancel(msg["id"])
            elif msg["type"] == "shutdown":
                if not self._shutdown:  # requests already received still run, then the worker exits
                    self._shutdown = True
                    self._queue.put(None)
            elif self._shutdown:
                self.emit({"type": "error", "id": msg["id"], "kind": "protocol",
                           "message": "the worker is shutting down"})
            else:
                with self._state_lock:
                    self._pending.append(msg["id"])
                self._queue.put(msg)
        if not self._shutdown:  # the client went away: nobody reads the results any more
            with self._state_lock:
                self._cancelled_ids.update(self._pending)
                if self._token is not None:
                    self._token.set()
            self._queue.put(None)

    def _cancel(self, rid: Any) -> None:
        with self._state_lock:
            if self._running == rid and self._token is not None:
                self._token.set()
                return
            if rid in self._pending:
                self._cancelled_ids.add(rid)  # the runner answers "cancelled" when it reaches it
                return
        self.emit({"type": "log", "level": "warning", "message": f"cancel: no running or queued request {rid!r}"})

    def _run(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                self._stop(EXIT_OK)
                return
            rid = msg["id"]
            with self._state_lock:  # one step from pending to running: a cancel always finds the request
                self._pending.remove(rid)
                if rid in self._cancelled_ids:
                    self._cancelled_ids.discard(rid)
                    skip = True
                else:
                    skip = False
                    self._running, self._token, self._signalled = rid, CancelToken(), False
            if skip:
                self.emit({"type": "cancelled", "id": rid})
                continue
            try:
                final = self._handle(msg, self._token)
            finally:
                with self._state_lock:
                    self._running = self._token = None
            # after the state is cleared: a client that saw the last line may send the next cancel at once
            self.emit(final)

    # -- one request ---------------------------------------------------------------------------
    def _handle(self, msg: dict[str, Any], token: CancelToken) -> dict[str, Any]:
        """Run one request, emitting progress and results; returns its last line (done/error/cancelled)."""
        from medreasoner.engine.writer import case_stem, write_result

        rid = msg["id"]
        try:
            req = check_ground(msg)
            stem = case_stem(req.input)
            for k, query in enumerate(req.queries):
                token_events = _RequestEvents(self, rid, k, token)
                token_events.check_cancelled("the request")
                result = self.session.ground(req.input, query, req.options, token_events)
                token_events.check_cancelled("writing")  # a cancelled request writes nothing more
                outputs = write_result(result, req.out_dir / f"{k}_{stem}", inputs=[req.input])
                record = json.loads(Path(outputs["result"]).read_text())
                self.emit({"type": "result", "id": rid, "query_index": k, "query": query,
                           "status": str(result.status), "message": result.message, "outputs": outputs,
                           "record": record})
        except CancelledError:
            return {"type": "cancelled", "id": rid}
        except InputError as exc:
            return {"type": "error", "id": rid, "kind": "input", "message": one_line(exc)}
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                log.exception("request %r failed", rid)
                return {"type": "error", "id": rid, "kind": "internal", "message": one_line(exc)}
            return {"type": "error", "id": rid, "kind": "input",
                    "message": f"a path in the request is too long for this file system ({len(str(exc.filename))} chars)"}
        except Exception as exc:  # one failed request must not take the worker down
            log.exception("request %r failed", rid)
            return {"type": "error", "id": rid, "kind": "internal", "message": one_line(exc)}
        return {"type": "done", "id": rid}


def run_worker(args, model_options) -> int:
    """The ``worker`` command: load plugins and models once, then serve stdin until told to stop.

    ``model_options`` turns the parsed arguments into checked ``ModelOptions`` (the CLI's helper)."""
    from medreasoner.engine.session import Session
    from medreasoner.models.loading import load_models
    from medreasoner.models.registry import load_plugins

    protocol_out = sys.stdout
    sys.stdout = sys.stderr  # a stray print() from any library must not corrupt the protocol
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def fatal(code: int, exc: BaseException) -> int:
        line = {"v": EVENTS_PROTOCOL_VERSION, "type": "fatal", "exit_code": code, "message": one_line(exc)}
        protocol_out.write(json.dumps(line, ensure_ascii=False) + "\n")
        protocol_out.flush()
        return code

    try:
        try:
            load_plugins(args.plugins)
            options = model_options(args)
        except InputError as exc:
            return fatal(EXIT_INPUT, exc)
        try:
            models = load_models(options)
        except InputError as exc:
            return fatal(EXIT_INPUT, exc)
        except Exception as exc:  # any load failure (missing weights, CUDA, imports) is a model error
            log.exception("model load failed")
            return fatal(EXIT_MODEL, exc)
        # unbuffered raw reads: a buffered stdin held by the blocked reader thread aborts interpreter exit
        stdin = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)  # noqa: SIM115 - lives as long as the process
        worker = Worker(Session(models), stdin, protocol_out)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, worker.on_signal)
        return worker.serve()
    finally:
        sys.stdout = protocol_out
