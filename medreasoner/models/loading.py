"""Load the CRM and the ASM once, from one options object, for every front end.

The CLI, the MONAI bundle, ``evaluate``, the training mask reward, the Slicer worker and the MONAI
Label app all call :func:`load_models` with a :class:`ModelOptions`; nothing else builds models.
"""

from __future__ import annotations

import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
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
    # a prompt template file ({question} where the question goes); beats the checkpoint's sidecar and --prompt
    prompt_file: str | None = None

    def checked(self) -> ModelOptions:
        """Validate what can be checked without loading anything; returns self.

        Every front end calls this before it reads an input or loads a model, so a bad option costs
        milliseconds, never a model load."""
        from medreasoner.models.asm import asm_names
        from medreasoner.models.registry import ASMS, CRMS

        asm_names()  # importing registers the ASMs
        from medreasoner.models.crm import openai_compat, qwen_vl  # noqa: F401 - registers backends

        CRMS.check(self.crm_backend)
        ASMS.check(self.asm)
        crm = str(self.crm or "").strip()
        if not crm:
            raise InputError("no CRM given: pass a checkpoint folder or hub id")
        if self.crm_backend == "transformers" and Path(crm).expanduser().is_file():
            # a .pt / .safetensors file is the commonest mistake; transformers' own error is pages long
            raise InputError(f"a CRM is a folder (config.json + weights) or a hub id; {crm} is a file")
        for name in ("batch_size", "max_new_tokens"):
            if _whole(name, getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise InputError(f"max_new_tokens must be at most {MAX_NEW_TOKENS} (Qwen2.5-VL's context), got "
                             f"{self.max_new_tokens}; an answer needs a few hundred, the reference protocol 2048")
        if self.asm_batch_size is not None and _whole("asm_batch_size", self.asm_batch_size) < 1:
            raise InputError(f"asm_batch_size must be at least 1, got {self.asm_batch_size}")
        if self.image_size is not None:
            size = _whole("image_size", self.image_size)
            if not MIN_CRM_IMAGE_SIZE <= size <= MAX_CRM_IMAGE_SIZE:
                raise InputError(f"image_size must be between {MIN_CRM_IMAGE_SIZE} and {MAX_CRM_IMAGE_SIZE} pixels, "
                                 f"got {size} ({IMAGE_SIZE_LIMITS})")
        check_device_name(self.device)
        if self.crm_backend == "openai":
            from medreasoner.models.crm.openai_compat import checked_base_url

            checked_base_url(self.base_url)
        if self.asm_checkpoint is not None and str(self.asm_checkpoint).strip():
            check_local_weights(str(self.asm_checkpoint).strip())
        if self.prompt_file is not None:
            self.prompt_file = str(self.prompt_file)
            self.prompt_template()  # read and checked now: a bad template costs milliseconds, not a model load
        return self

    def prompt_template(self):
        """The explicit template (``prompt_file``) as a ``PromptTemplate``, or None (the checkpoint's
        sidecar template, else the built-in ``--prompt`` wording, is used then)."""
        from medreasoner.models.prompts import load_prompt_file

        return None if self.prompt_file is None else load_prompt_file(self.prompt_file)


def check_local_weights(checkpoint: str) -> None:
    """An ASM checkpoint that names a local file must be one (``repo:file`` and hub ids pass): a
    missing file costs milliseconds here, not a CRM load, and a FIFO never blocks the load."""
    from medreasoner.io.files import check_input_path

    path = Path(checkpoint).expanduser()
    local = checkpoint.startswith((".", "/", "~")) or (checkpoint.endswith((".pt", ".pth")) and ":" not in checkpoint)
    if not local and not path.exists():
        return
    st = check_input_path(path, "ASM checkpoint")
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"ASM checkpoint {checkpoint} is a folder; give the weights file (.pt/.pth)")


# Longest answer a CRM may generate: Qwen2.5-VL's context is 32768 tokens (128k with YaRN); more only
# lets a model that never closes its answer run for hours.
MAX_NEW_TOKENS = 32768

# The square the CRM sees. 28 = one 2x2 group of Qwen2.5-VL's 14-pixel patches (the processor rounds
# every side to a multiple of 28 and upscales anything under min_pixels = 56x56). 3584 = the largest
# square a Qwen2.5-VL processor keeps (max_pixels 12845056 = 3584^2 in the released 7B/3B configs);
# anything larger is shrunk back by the processor after we had resized the image to it (a 20000-pixel
# square is 1.2 GB as RGB and ~5 GB as the processor's float copy, for nothing).
MIN_CRM_IMAGE_SIZE = 28
MAX_CRM_IMAGE_SIZE = 3584
IMAGE_SIZE_LIMITS = ("the Qwen2.5-VL processor rounds each side to a multiple of 28 and caps the area at "
                     "max_pixels, 3584x3584 for the released checkpoints")

_DEVICE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def _whole(name: str, value: Any) -> int:
    """An int option from a CLI, a config file or a request (bools and fractions are mistakes)."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a whole number, got {value!r}") from exc
    if number != value and not isinstance(value, str):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    return number


def check_device_name(device: Any) -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``; returns it stripped. Whether the machine has
    it is :func:`check_device_present` (a bundle config may name a GPU it is parsed without)."""
    text = str(device or "auto").strip()
    match = _DEVICE.fullmatch(text.lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def check_device_present(device: Any) -> str:
    """The device named and present on this machine; checked before any model loads, since a
    CPU-only machine would otherwise read the CRM's weights before failing (torch is imported
    only when a GPU is named)."""
    text = check_device_name(device).lower()
    kind, index = _DEVICE.fullmatch(text).groups()  # type: ignore[union-attr] - checked just above
    if kind not in ("cuda", "mps"):
        return text
    try:
        import torch
    except ImportError as exc:
        raise InputError(f"device {text!r} needs torch, which is not installed") from exc
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {text!r}: MPS was asked for but torch sees no Apple GPU; use cpu or auto")
        return text
    if not torch.cuda.is_available():
        raise InputError(no_cuda_message(text, torch))
    count = torch.cuda.device_count()
    if int(index or 0) >= count:
        raise InputError(f"device {text!r}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return text


def no_cuda_message(device: str, torch: Any) -> str:
    """One wording for "no GPU" wherever it is found (options check, device resolution)."""
    return (f"device {device!r}: CUDA was asked for but torch sees no GPU (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use cpu or auto")


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
    template = options.prompt_template()  # before the load: the file may have changed since checked()
    try:
        crm = load_crm(str(options.crm), backend=options.crm_backend, **kwargs)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise ModelLoadError(f"could not load the CRM {options.crm!r}: {exc}") from exc
    return use_prompt_template(crm, template)


def use_prompt_template(crm: Any, template: Any) -> Any:
    """An explicit template replaces whatever the CRM would ask with (its sidecar's or the built-in
    wording); None leaves the CRM as it is. Returns ``crm``."""
    if template is not None:
        crm.prompt_template = template
    return crm


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
    elif crm is not None:
        use_prompt_template(crm, options.prompt_template())
    t1 = time.perf_counter()
    if asm is None:
        asm = load_asm_from(options)
        times["asm"] = time.perf_counter() - t1
    return Models(crm=crm, asm=asm, options=options, load_seconds=times)
