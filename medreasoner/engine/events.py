"""One events channel between a running job and whoever watches it: progress, log, cancel.

The core reports through an :class:`Events` object and never draws a bar or prints. Front ends
subclass or wrap it: the CLI maps it to tqdm or to JSON lines, the Slicer worker forwards the JSON
lines, a server sets the cancel flag when a client goes away.

JSON line protocol (``JsonLinesEvents``), one object per line, ``"v": 1``::

    {"v": 1, "event": "progress", "stage": "key_slices", "done": 2, "total": 5}
    {"v": 1, "event": "log", "level": "warning", "message": "..."}
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from enum import Enum
from typing import IO

from medreasoner.errors import CancelledError

EVENTS_PROTOCOL_VERSION = 1


class Stage(str, Enum):
    """What the job is doing; ``done``/``total`` count the unit named in the comment."""

    READ = "read"  # inputs read and windowed (inputs)
    GROUND = "ground"  # 2D images through CRM + ASM (images)
    KEY_SLICES = "key_slices"  # candidate key slices through CRM + ASM (slices)
    SLICES = "slices"  # every-slice strategy through CRM + ASM (slices)
    PROPAGATE = "propagate"  # key-slice mask carried through the volume (slices)
    WRITE = "write"  # output files written (cases)
    CASES = "cases"  # whole cases of a batch run (cases)
    EVALUATE = "evaluate"  # evaluation samples (samples)

    def __str__(self) -> str:
        return self.value


class Events:
    """The no-op channel: subclasses override what they care about."""

    def progress(self, stage: Stage, done: int, total: int) -> None:
        pass

    def log(self, message: str, level: str = "info") -> None:
        pass

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self, where: str) -> None:
        """Raise :class:`CancelledError` when the watcher asked to stop (called between steps)."""
        if self.cancelled():
            raise CancelledError(f"cancelled during {where}")

    def close(self) -> None:
        """Release what the channel holds (bars, files) once the job is over."""


class CancelToken:
    """A thread-safe stop flag (``set()`` from a signal handler, a GUI or a server thread)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class CallbackEvents(Events):
    """Events from plain callables, any of them optional."""

    def __init__(self, progress: Callable[[Stage, int, int], None] | None = None,
                 log: Callable[[str, str], None] | None = None, cancel: CancelToken | None = None):
        self._progress, self._log, self.cancel = progress, log, cancel

    def progress(self, stage: Stage, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(stage, done, total)

    def log(self, message: str, level: str = "info") -> None:
        if self._log is not None:
            self._log(message, level)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


class JsonLinesEvents(Events):
    """Write every event as one JSON line (the protocol a GUI or a driver process reads)."""

    def __init__(self, stream: IO[str], cancel: CancelToken | None = None, extra: dict | None = None):
        self.stream, self.cancel, self.extra = stream, cancel, dict(extra or {})
        self._lock = threading.Lock()

    def _emit(self, obj: dict) -> None:
        line = json.dumps({"v": EVENTS_PROTOCOL_VERSION, **obj, **self.extra}, ensure_ascii=False)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def progress(self, stage: Stage, done: int, total: int) -> None:
        self._emit({"event": "progress", "stage": str(stage), "done": int(done), "total": int(total)})

    def log(self, message: str, level: str = "info") -> None:
        self._emit({"event": "log", "level": level, "message": str(message)})

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


NO_EVENTS = Events()
