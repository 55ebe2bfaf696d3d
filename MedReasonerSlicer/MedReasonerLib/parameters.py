"""Run settings kept in the module's parameter node, the questions typed, and their history.

Values live as strings on a ``vtkMRMLScriptedModuleNode`` (the scene saves them with the rest),
so the settings survive scene save/load and the widget, the logic and the self-test share them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from MedReasonerLib.errors import MedReasonerSlicerError

# Choices the core accepts (medreasoner.engine.session / imaging.intensity); the worker re-checks.
STRATEGIES = ("keyslice", "slicewise")
AXES = ("axial", "coronal", "sagittal")
WINDOW_PRESETS = ("abdomen", "lung", "brain", "mediastinum", "bone")
WINDOW_MODES = ("auto",) + WINDOW_PRESETS + ("custom",)
PROMPTS = ("reasoning", "direct")
ASMS = ("litemedsam", "medsam2", "sam2")
COMPUTE_MODES = ("local", "remote")
DEVICES = ("auto", "cpu", "cuda")
KEY_SLICE_MODES = ("auto", "current", "number")

MAX_QUESTIONS = 20  # one run; each question is a CRM call plus propagation
MAX_QUESTION_CHARS = 2000
HISTORY_LENGTH = 20
PARAMETER_PREFIX = "MedReasoner."


@dataclass
class RunSettings:
    """Everything a run needs besides the volume and the questions."""

    strategy: str = "keyslice"
    axis: str = "axial"
    window_mode: str = "auto"  # auto | a preset | custom
    window_custom: str = ""  # "center,width" when window_mode is custom
    key_slice_mode: str = "auto"  # auto | current (the slice on screen) | number
    key_slice: int = 0  # display slice number when key_slice_mode is number
    slice_range: str = ""  # "start:stop" display slices to consider ("" = all)
    asm: str = "litemedsam"
    prompt: str = "reasoning"
    compute: str = "local"  # local | remote
    python_path: str = ""  # "" = Slicer's own Python
    crm: str = ""  # CRM weights folder or hub id ("" = the core's default)
    crm_backend: str = "transformers"
    device: str = "auto"
    extra_worker_args: str = ""  # e.g. "--plugins my_plugin.py"; split on whitespace
    server_url: str = "http://127.0.0.1:8000"
    server_task: str = "medreasoner"
    timeout_s: float = 3600.0

    def checked(self) -> RunSettings:
        """Refuse unknown choices with a one-line message (before anything starts)."""
        for name, allowed in (("strategy", STRATEGIES), ("axis", AXES), ("window_mode", WINDOW_MODES),
                              ("key_slice_mode", KEY_SLICE_MODES), ("prompt", PROMPTS),
                              ("compute", COMPUTE_MODES), ("device", DEVICES)):
            value = getattr(self, name)
            if value not in allowed:
                raise MedReasonerSlicerError(f"unknown {name.replace('_', ' ')} {value!r}; "
                                             f"choose one of {', '.join(allowed)}")
        if not str(self.asm).strip():
            raise MedReasonerSlicerError("choose a segmentation model (ASM)")
        if self.window_mode == "custom":
            parse_custom_window(self.window_custom)
        if self.key_slice_mode == "number" and int(self.key_slice) < 0:
            raise MedReasonerSlicerError(f"key slice must be 0 or more, got {self.key_slice}")
        if self.compute == "remote" and not str(self.server_url).strip().lower().startswith(("http://", "https://")):
            raise MedReasonerSlicerError(f"server URL must start with http:// or https://, got {self.server_url!r}")
        return self

    def window(self) -> str | None:
        """The window the core takes: None (automatic from the question), a preset name or 'c,w'."""
        if self.window_mode == "auto":
            return None
        if self.window_mode == "custom":
            c, w = parse_custom_window(self.window_custom)
            return f"{c:g},{w:g}"
        return self.window_mode

    def run_options(self, key_point_lps: list[float] | None = None) -> dict[str, Any]:
        """The core's ``RunOptions`` fields (worker ``options`` / MONAI Label ``params``)."""
        options: dict[str, Any] = {"strategy": self.strategy, "axis": self.axis, "prompt": self.prompt,
                                   "window": self.window()}
        if str(self.slice_range).strip():
            options["slice_range"] = str(self.slice_range).strip()
        if self.strategy == "keyslice":
            if self.key_slice_mode == "number":
                options["key_slice"] = int(self.key_slice)
            elif self.key_slice_mode == "current":
                if key_point_lps is None:
                    raise MedReasonerSlicerError("no slice is on screen to use as the key slice")
                options["key_point"] = [float(v) for v in key_point_lps]
        return options

    # -- parameter node -----------------------------------------------------------------------
    def to_parameter_node(self, node) -> None:
        for f in dataclasses.fields(self):
            node.SetParameter(PARAMETER_PREFIX + f.name, str(getattr(self, f.name)))

    @classmethod
    def from_parameter_node(cls, node) -> RunSettings:
        """Settings stored on ``node``; missing or unreadable values keep their defaults."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            text = node.GetParameter(PARAMETER_PREFIX + f.name) if node is not None else ""
            if not text:
                continue
            default = f.default
            try:
                values[f.name] = type(default)(text) if not isinstance(default, str) else text
            except ValueError:
                continue  # a hand-edited scene with a bad number: keep the default
        return cls(**values)


def parse_custom_window(text: str):
    """'center,width' (HU) -> (center, width); a one-line error otherwise."""
    parts = [p for p in str(text).replace(";", ",").replace("/", ",").split(",") if p.strip()]
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise MedReasonerSlicerError(f"custom window must be 'center,width' (e.g. -600,1500), got {text!r}") from None
    if width <= 0:
        raise MedReasonerSlicerError(f"window width must be positive, got {width:g}")
    return center, width


def parse_questions(text: str) -> list[str]:
    """One question per non-blank line, whitespace tidied, duplicates dropped (order kept)."""
    questions: list[str] = []
    for line in str(text or "").splitlines():
        q = " ".join(line.split())
        if q and q not in questions:
            questions.append(q)
    if not questions:
        raise MedReasonerSlicerError("type a question about the image (one per line)")
    if len(questions) > MAX_QUESTIONS:
        raise MedReasonerSlicerError(f"{len(questions)} questions: ask at most {MAX_QUESTIONS} at once")
    for q in questions:
        if len(q) > MAX_QUESTION_CHARS:
            raise MedReasonerSlicerError(f"a question is {len(q)} characters long; keep each under "
                                         f"{MAX_QUESTION_CHARS}")
    return questions


class QuestionHistory:
    """The last questions asked, newest first, in a string store (Qt settings in Slicer, a dict in tests)."""

    KEY = "MedReasoner/QuestionHistory"

    def __init__(self, store: MutableMapping[str, Any], length: int = HISTORY_LENGTH):
        self.store, self.length = store, length

    def items(self) -> list[str]:
        try:
            values = json.loads(self.store.get(self.KEY) or "[]")
        except (TypeError, ValueError):
            return []
        return [v for v in values if isinstance(v, str)][: self.length]

    def add(self, questions: list[str]) -> list[str]:
        items = list(questions) + [q for q in self.items() if q not in questions]
        self.store[self.KEY] = json.dumps(items[: self.length])
        return self.items()
