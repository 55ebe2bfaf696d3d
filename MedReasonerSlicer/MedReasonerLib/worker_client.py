"""The local worker: ``python -m medreasoner worker`` started once, models kept loaded between runs.

The worker speaks JSON lines on stdin/stdout (see the project README, "Worker protocol"). A reader
thread routes each line to the queue of the request it belongs to, so the GUI thread only ever
drains queues and never blocks. Its stderr goes to a log file whose last lines explain a crash.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from MedReasonerLib.errors import MedReasonerSlicerError

PROTOCOL_VERSION = 1
STOP_GRACE_S = 5.0  # after a shutdown/cancel message, before the process is killed
FINAL_TYPES = ("done", "error", "cancelled")


@dataclass(frozen=True)
class WorkerCommand:
    """How to start a worker; a run with a different command restarts it (new models)."""

    python: str
    args: tuple
    env: tuple = ()  # extra environment (name, value) pairs
    cwd: str | None = None

    def argv(self) -> list[str]:
        return [self.python, "-m", "medreasoner", "worker", *self.args]


def worker_command(settings, python: str | None = None, env: dict[str, str] | None = None) -> WorkerCommand:
    """The worker command for these settings (model options only; run options travel per request)."""
    args: list[str] = ["--asm", settings.asm, "--device", settings.device]
    if settings.crm:
        args += ["--crm", settings.crm]
    if settings.crm_backend and settings.crm_backend != "transformers":
        args += ["--crm-backend", settings.crm_backend]
    try:  # quoted paths with spaces stay one argument
        args += shlex.split(str(settings.extra_worker_args or ""), posix=os.name == "posix")
    except ValueError as exc:
        raise MedReasonerSlicerError(f"extra worker arguments: {exc}") from exc
    return WorkerCommand(python or settings.python_path or default_python(), tuple(args),
                         tuple(sorted((env or {}).items())))


def default_python() -> str:
    """Slicer's own Python (PythonSlicer next to the running interpreter), else this interpreter."""
    here = os.path.dirname(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = os.path.join(here, name)
        if os.path.exists(candidate):
            return candidate
    return sys.executable


class WorkerClient:
    """One worker process and the requests in flight on it."""

    def __init__(self, command: WorkerCommand):
        self.command = command
        self.ready: dict[str, Any] | None = None
        self.fatal: str | None = None
        self._ids = itertools.count(1)
        self._sinks: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._ready_event = threading.Event()
        self._exit_code: int | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="MedReasoner-worker-", suffix=".log")
        os.close(fd)
        env = {**_base_environment(), "PYTHONUNBUFFERED": "1", **dict(command.env)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        try:
            self.proc = subprocess.Popen(command.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, cwd=command.cwd, env=env, bufsize=0,
                                         **_new_process_group())
        except OSError as exc:
            self._log.close()
            raise MedReasonerSlicerError(f"cannot start the worker with {command.python}: {exc}", "worker") from exc
        self._reader = threading.Thread(target=self._read, name="MedReasoner-worker-reader", daemon=True)
        self._reader.start()

    # -- state -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.fatal is None

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the models are loaded (tests and the self-test; the GUI polls instead)."""
        if not self._ready_event.wait(timeout):
            raise MedReasonerSlicerError(f"the worker did not load its models within {timeout:.0f} s", "worker")
        if self.ready is None:
            raise MedReasonerSlicerError(self.fatal or self.death_message(), "model")
        return self.ready

    def death_message(self) -> str:
        code = self.proc.poll()
        tail = self.log_tail(3)
        return (f"the MedReasoner worker stopped unexpectedly (exit code {code})"
                + (f": {tail}" if tail else "") + f"; full log: {self.log_path}")

    def log_tail(self, n: int = 3) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: dict[str, Any], sink: queue.Queue) -> str:
        """Send a ``ground`` request; its protocol lines (dicts) arrive on ``sink``. Returns its id."""
        rid = f"r{next(self._ids)}"
        with self._lock:
            if not self.alive:
                raise MedReasonerSlicerError(self.fatal or self.death_message(), "worker")
            self._sinks[rid] = sink
        self._send({**request, "type": "ground", "id": rid})
        return rid

    def cancel(self, rid: str) -> None:
        self._send({"type": "cancel", "id": rid})

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode("utf-8")
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # the worker is gone; the reader reports it
            raise MedReasonerSlicerError(self.death_message(), "worker") from exc

    def _read(self) -> None:
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue  # not a protocol line (the worker keeps stdout clean; be safe anyway)
            kind = msg.get("type")
            if kind == "ready":
                self.ready = msg
                self._ready_event.set()
                continue
            if kind == "fatal":
                self.fatal = f"the worker could not start: {msg.get('message', '')}"
                self._ready_event.set()
                continue
            with self._lock:
                sink = self._sinks.get(msg.get("id"))
                if kind in FINAL_TYPES and msg.get("id") in self._sinks:
                    self._sinks.pop(msg["id"])
            if sink is not None:
                sink.put(msg)
            elif kind == "log" or (kind == "error" and msg.get("id") is None):
                for s in list(self._sinks.values()):  # worker-wide notes: everyone in flight sees them
                    s.put(msg)
        # stdout closed: the process ended. Every request still in flight learns why.
        self._exit_code = self.proc.wait()
        self._ready_event.set()
        message = self.fatal or self.death_message()
        kind = "model" if self.fatal else "worker"
        with self._lock:
            sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.put({"type": "error", "kind": kind, "message": message})

    # -- stopping --------------------------------------------------------------------------------
    def shutdown(self, timeout: float = STOP_GRACE_S) -> None:
        """Ask the worker to exit; kill it (and its children) if it does not within ``timeout``."""
        if self.proc.poll() is None:
            try:
                self._send({"type": "shutdown"})
                self.proc.stdin.close()
            except (MedReasonerSlicerError, OSError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        """Stop the process tree now (a hung model call ignores messages)."""
        if self.proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, 9)
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True,
                               check=False)
        except OSError:
            self.proc.kill()
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def _new_process_group() -> dict[str, Any]:
    # its own group: a kill reaches the worker's children too, and Slicer's Ctrl-C does not reach it
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def _base_environment() -> dict[str, str]:
    """Slicer's start-up environment when inside Slicer (its own paths removed), else this one."""
    try:
        import slicer

        startup = getattr(slicer.util, "startupEnvironment", None)
        if startup is not None and getattr(slicer, "app", None) is not None and hasattr(slicer.app, "slicerHome"):
            return dict(startup())
    except Exception:  # headless: slicer.util without the application
        pass
    return dict(os.environ)
