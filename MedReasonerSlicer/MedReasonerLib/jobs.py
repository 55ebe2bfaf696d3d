"""One run (a volume, its questions, the settings) in the background, polled from the GUI thread.

The work happens in the worker process (local) or on the server (remote, on a thread); the GUI's
timer calls ``poll()``, which turns what arrived into ``JobEvent``s and, when every answer is in,
applies them to the scene (MRML is only touched on the thread that polls). A cancelled or failed
run changes nothing in the scene.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from MedReasonerLib.errors import MedReasonerSlicerError
from MedReasonerLib.scene import Outcome, QuestionResult, apply_results

CANCEL_GRACE_S = 10.0  # a cancelled local run that does not stop by then: the worker is killed


@dataclass
class JobEvent:
    kind: str  # progress | log | warning | result | done | error | cancelled
    message: str = ""
    fraction: float | None = None  # 0..1 over the whole run
    stage: str = ""


STAGE_NAMES = {"load": "loading the volume", "key_slices": "reading candidate slices",
               "slices": "reading slices", "propagate": "propagating the mask", "segment": "segmenting",
               "crm": "reasoning", "asm": "segmenting", "write": "writing"}


class Job:
    """Base: collects answers, turns backend messages into events, applies the result once."""

    def __init__(self, scene, volume_node, questions: list[str], segmentation_node=None):
        self.scene, self.volume_node, self.questions = scene, volume_node, list(questions)
        self.segmentation_node = segmentation_node
        self.messages: queue.Queue = queue.Queue()
        self.results: dict[int, QuestionResult] = {}
        self.outcome: Outcome | None = None
        self.error: MedReasonerSlicerError | None = None
        self.finished = False
        self.cancel_requested = False
        self.started = time.monotonic()
        self.on_finish: list[Callable[[Job], None]] = []

    # -- GUI side --------------------------------------------------------------------------------
    def poll(self) -> list[JobEvent]:
        """Events since the last call (never blocks). Applies the answers when the run ends."""
        events: list[JobEvent] = []
        while not self.finished:
            try:
                msg = self.messages.get_nowait()
            except queue.Empty:
                break
            events += self._handle(msg)
        events += self._check()
        return events

    def wait(self, timeout: float = 600.0, on_event: Callable[[JobEvent], None] | None = None) -> Outcome:
        """Poll until the run ends (scripts, tests and the self-test); raises its error."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self.finished:
                break
            if time.monotonic() > deadline:
                self.cancel()
                raise MedReasonerSlicerError(f"the run did not finish within {timeout:.0f} s", "worker")
            time.sleep(0.05)
        if self.error is not None:
            raise self.error
        return self.outcome

    def cancel(self) -> None:
        self.cancel_requested = True

    # -- shared handling -------------------------------------------------------------------------
    def _handle(self, msg: dict[str, Any]) -> list[JobEvent]:
        kind = msg.get("type")
        n = max(1, len(self.questions))
        if kind == "progress":
            qi = int(msg.get("query_index") or 0)
            total = max(1, int(msg.get("total") or 1))
            fraction = (qi + min(1.0, float(msg.get("done") or 0) / total)) / n
            stage = STAGE_NAMES.get(str(msg.get("stage")), str(msg.get("stage") or ""))
            return [JobEvent("progress", f"question {qi + 1}/{n}: {stage}", fraction, stage)]
        if kind == "log":
            level = "warning" if msg.get("level") in ("warning", "error") else "log"
            return [JobEvent(level, str(msg.get("message", "")))]
        if kind == "result":
            qi = int(msg["query_index"])
            record = msg.get("record") or {}
            self.results[qi] = QuestionResult(self.questions[qi], record, msg.get("label_path"))
            status = record.get("status", "?")
            text = f"question {qi + 1}/{n}: {status}" + (f" ({record.get('message')})" if record.get("message") else "")
            return [JobEvent("result", text, (qi + 1) / n, "answered")]
        if kind == "done":
            return self._finish()
        if kind == "cancelled":
            return self._fail(MedReasonerSlicerError("cancelled; the scene was not changed", "cancelled"))
        if kind == "error":
            return self._fail(MedReasonerSlicerError(str(msg.get("message", "the run failed")),
                                                     str(msg.get("kind") or "worker")))
        return []

    def _check(self) -> list[JobEvent]:
        return []

    def _finish(self) -> list[JobEvent]:
        missing = [i for i in range(len(self.questions)) if i not in self.results]
        if missing:
            return self._fail(MedReasonerSlicerError(f"no answer came for question {missing[0] + 1}", "worker"))
        try:
            self.outcome = apply_results(self.scene, self.volume_node, [self.results[i] for i in
                                         range(len(self.questions))], self.segmentation_node)
        except MedReasonerSlicerError as exc:
            return self._fail(exc)
        except Exception as exc:  # a scene error must reach the user as a message, the scene unchanged
            return self._fail(MedReasonerSlicerError(f"could not add the result to the scene: {exc}", "internal"))
        events = [JobEvent("warning", w) for w in self.outcome.warnings]
        for item in self.outcome.no_target:
            events.append(JobEvent("warning", f"no target for {item.question!r}: {item.message or 'the model found none'}"))
        found = len(self.outcome.segments) - len(self.outcome.no_target)
        events.append(JobEvent("done", f"{found} of {len(self.questions)} question(s) answered with a segment in "
                                       f"{time.monotonic() - self.started:.1f} s", 1.0, "done"))
        self._end()
        return events

    def _fail(self, error: MedReasonerSlicerError) -> list[JobEvent]:
        self.error = error
        self._end()
        return [JobEvent("cancelled" if error.kind == "cancelled" else "error", str(error))]

    def _end(self) -> None:
        self.finished = True
        for callback in self.on_finish:
            callback(self)


class LocalJob(Job):
    """A ``ground`` request on the long-lived worker."""

    def __init__(self, scene, volume_node, questions, segmentation_node, client, input_path: str, out_dir: str,
                 options: dict[str, Any]):
        super().__init__(scene, volume_node, questions, segmentation_node)
        self.client = client
        self._cancel_sent: float | None = None
        self._told_loading = False
        self.rid = client.submit({"input": input_path, "queries": self.questions, "options": options,
                                  "out_dir": out_dir}, self.messages)

    def _handle(self, msg: dict[str, Any]) -> list[JobEvent]:
        if msg.get("type") == "result":
            msg = {**msg, "label_path": (msg.get("outputs") or {}).get("mask_seg_nrrd")}
        return super()._handle(msg)

    def cancel(self) -> None:
        if self.finished or self.cancel_requested:
            return
        super().cancel()
        self._cancel_sent = time.monotonic()
        with contextlib.suppress(MedReasonerSlicerError):  # a dead worker: its reader reports the request
            self.client.cancel(self.rid)

    def _check(self) -> list[JobEvent]:
        if not self._told_loading and self.client.ready is None and self.client.alive:
            self._told_loading = True  # the first run waits for the models: say so
            return [JobEvent("progress", "starting the worker and loading the models", 0.0, "loading models")]
        # a model call that never returns to check for the cancel: stop the worker itself
        if (not self.finished and self._cancel_sent is not None
                and time.monotonic() - self._cancel_sent > CANCEL_GRACE_S):
            self.client.kill()
            return self._fail(MedReasonerSlicerError("cancelled (the worker was stopped); the scene was not "
                                                     "changed", "cancelled"))
        return []


class RemoteJob(Job):
    """The questions sent one by one to a MONAI Label server from a thread."""

    def __init__(self, scene, volume_node, questions, segmentation_node, client, task: str, input_path: str,
                 out_dir: str, params: dict[str, Any]):
        super().__init__(scene, volume_node, questions, segmentation_node)
        self.client, self.task = client, task
        self._thread = threading.Thread(target=self._run, args=(input_path, out_dir, params),
                                        name="MedReasoner-remote", daemon=True)
        self._thread.start()

    def _run(self, input_path: str, out_dir: str, params: dict[str, Any]) -> None:
        try:
            self.client.check_task(self.task)
            for qi, question in enumerate(self.questions):
                if self.cancel_requested:
                    self.messages.put({"type": "cancelled"})
                    return
                self.messages.put({"type": "progress", "query_index": qi, "stage": "crm", "done": 0, "total": 1})
                label, record = self.client.infer(self.task, {**params, "query": question}, image_file=input_path,
                                                  out_dir=out_dir)
                self.messages.put({"type": "result", "query_index": qi, "record": record, "label_path": label})
            self.messages.put({"type": "cancelled"} if self.cancel_requested else {"type": "done"})
        except MedReasonerSlicerError as exc:
            self.messages.put({"type": "cancelled"} if self.cancel_requested
                              else {"type": "error", "kind": exc.kind, "message": str(exc)})
        except Exception as exc:  # a malformed answer: one message, not a traceback in the GUI
            self.messages.put({"type": "error", "kind": "server",
                               "message": f"unexpected answer from the server: {exc}"})

    def cancel(self) -> None:
        super().cancel()
        self.client.close()  # the server has no cancel: drop the connection, ignore its answer
