"""Load the CRM and the ASM once, from one options object, for every front end.

The CLI, the MONAI bundle, ``evaluate``, the training mask reward, the Slicer worker and the MONAI
Label app all call :func:`load_models` with a :class:`ModelOptions`; nothing else builds models.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from medreasoner.constants import (
    DEFAULT_ASM,
    DEFAULT_CRM,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_OPENAI_BASE_URL,
)
from medreasoner.errors import InputError, ModelLoadError

CRM_BACKENDS = ("transformers", "openai")


@dataclass
class ModelOptions:
    """Everything that decides which models are loaded and how they run."""

    crm: str = DEFAULT_CRM  # local folder or hub id (or a model name for the openai backend)
    crm_backend: str = "transformers"
    base_url: str = DEFAULT_OPENAI_BASE_URL  # openai backend only
    asm: str = DEFAULT_ASM
    asm_checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    image_size: int | None = None  # square side the CRM sees; None: the checkpoint's
    batch_size: int = 4  # images per CRM batch
    asm_batch_size: int | None = None  # images per ASM encoder batch; None: 8 on GPU, 1 on CPU
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    trust_remote_code: bool = False

    def checked(self) -> ModelOptions:
        """Validate what can be checked without loading anything; returns self."""
        from medreasoner.models.asm import asm_names
        from medreasoner.models.registry import ASMS, CRMS

        asm_names()  # importing registers the ASMs
        from medreasoner.models.crm import openai_compat, qwen_vl  # noqa: F401 - registers backends

        CRMS.check(self.crm_backend)
        ASMS.check(self.asm)
        if not str(self.crm or "").strip():
            raise InputError("no CRM given: pass a checkpoint folder or hub id")
        for name in ("batch_size", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.asm_batch_size is not None and int(self.asm_batch_size) < 1:
            raise InputError(f"asm_batch_size must be at least 1, got {self.asm_batch_size}")
        if self.image_size is not None and int(self.image_size) < 28:
            raise InputError(f"image_size must be at least 28 pixels, got {self.image_size}")
        dev = str(self.device or "auto")
        if dev != "auto" and not (dev == "cpu" or dev.startswith("cuda") or dev == "mps"):
            raise InputError(f"unknown device {dev!r}; use auto, cpu, cuda or cuda:N")
        return self



@dataclass
class Models:
    """A loaded CRM + ASM pair. Shared by sessions and threads: each model has its own lock, so
    concurrent requests interleave batch by batch and never run one model twice at once."""

    crm: Any  # medreasoner.models.crm.CRM
    asm: Any  # medreasoner.models.asm.ASM
    options: ModelOptions | None = None
    load_seconds: dict[str, float] = field(default_factory=dict)
    crm_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    asm_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def is_tiny(self) -> bool:
        return bool(getattr(self.crm, "is_tiny", False) or getattr(self.asm, "is_tiny", False))

    def describe(self) -> dict[str, Any]:
        return {"crm": self.crm.describe(), "asm": self.asm.describe()}


def load_crm_from(options: ModelOptions):
    from medreasoner.models.crm import GenerationConfig, load_crm

    kwargs: dict[str, Any] = {
        "device": options.device, "batch_size": int(options.batch_size),
        "generation": GenerationConfig(max_new_tokens=int(options.max_new_tokens), do_sample=options.do_sample,
                                       temperature=options.temperature, top_p=options.top_p),
    }
    if options.crm_backend == "openai":
        kwargs["base_url"] = options.base_url
    else:
        kwargs["trust_remote_code"] = bool(options.trust_remote_code)
        kwargs["dtype"] = options.dtype
    if options.image_size:
        kwargs["image_size"] = int(options.image_size)
    try:
        return load_crm(str(options.crm), backend=options.crm_backend, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise ModelLoadError(f"could not load the CRM {options.crm!r}: {exc}") from exc


def load_asm_from(options: ModelOptions):
    from medreasoner.models.asm import load_asm

    try:
        return load_asm(options.asm, checkpoint=options.asm_checkpoint, device=options.device,
                        batch_size=options.asm_batch_size)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise ModelLoadError(f"could not load the ASM {options.asm!r}: {exc}") from exc


def load_models(options: ModelOptions | None = None, *, crm: Any = None, asm: Any = None,
                with_crm: bool = True) -> Models:
    """Load the CRM and the ASM described by ``options`` (once; share the result).

    ``crm``/``asm`` take an already-built model instead (a test double, or a model kept from an
    earlier load) so callers never need a second builder. ``with_crm=False`` loads the ASM only
    (the training mask reward scores completions the trainer generated).
    """
    options = (options or ModelOptions()).checked()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if crm is None and with_crm:
        crm = load_crm_from(options)
        times["crm"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if asm is None:
        asm = load_asm_from(options)
        times["asm"] = time.perf_counter() - t1
    return Models(crm=crm, asm=asm, options=options, load_seconds=times)
