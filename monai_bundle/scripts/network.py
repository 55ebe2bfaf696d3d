"""``network_def``: the CRM and the ASM behind one ``torch.nn.Module``.

MONAI tools expect a ``network_def`` they can instantiate and call. MedReasoner's "network" is two
models run in sequence with non-tensor glue (a generated answer is parsed into a box and two key
points, which prompt the ASM; volumes go through key slices and propagation), so this module is an
honest wrapper around a loaded ``medreasoner.engine.Session``:

* ``forward(image, query)`` grounds one question on one case read by the preprocessing (a
  ``medreasoner`` ``Volume`` or ``Image2D``) and returns the core's result: ``result.mask`` is the
  mask on exactly the input's grid (a SimpleITK image for volumes, a bool array for 2D images),
  the rest is what ``result.json`` records.
* The weights are **not** one state dict: the CRM is a Hugging Face folder or hub id and the ASM
  has its own checkpoint, both loaded by ``medreasoner.engine.load_models`` from ``model_options``.
  ``state_dict()`` is therefore empty and ``load_state_dict`` refuses (a ``models/model.pt`` could
  not describe this network). Instantiating loads nothing; ``load()`` does (the evaluator's
  ``SessionLoader`` handler calls it when the run starts, after every input was checked).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger("medreasoner.bundle")


class GroundingNet(torch.nn.Module):
    """CRM (box + 2 key points from an implicit question) + frozen ASM (mask) as one callable module."""

    def __init__(self, model_options: Any = None, session: Any = None):
        super().__init__()
        self.model_options = model_options
        self._session = session  # a plain attribute: the models are not sub-modules (see module doc)
        self.load_seconds: dict[str, float] = {}
        self.eval()  # inference only; keeps eval_mode() from toggling anything

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self):
        """Load the CRM and the ASM once (exit 3 when one cannot be loaded); returns the session."""
        if self._session is None:
            from .inference import load_session

            if self.model_options is None:
                raise RuntimeError("GroundingNet has neither model_options nor a session")
            t0 = time.perf_counter()
            self._session = load_session(self.model_options)
            self.load_seconds = {**{k: round(v, 3) for k, v in self._session.models.load_seconds.items()},
                                 "total": round(time.perf_counter() - t0, 3)}
            logger.info("models loaded in %.1f s (%s)", self.load_seconds["total"],
                        ", ".join(f"{k} {v:.1f} s" for k, v in self.load_seconds.items() if k != "total"))
        return self._session

    @property
    def session(self):
        return self.load()

    def release(self) -> None:
        """Drop the loaded models (and the session's caches) so their memory can be freed."""
        self._session = None

    def forward(self, image: Any, query: str, options: Any = None, events: Any = None):
        """Ground ``query`` on ``image`` (a ``Volume``, ``Image2D``, SimpleITK image or path); returns
        the core's ``VolumeResult`` / ``ImageResult`` (``.mask`` on the input grid)."""
        return self.session.ground(image, query, options, events)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        raise RuntimeError("GroundingNet has no single state dict: the CRM and the ASM load from "
                           "model_options (crm, asm, asm_checkpoint); see the bundle's docs/README.md")

    def extra_repr(self) -> str:
        o = self.model_options
        desc = f"crm={o.crm!r}, crm_backend={o.crm_backend!r}, asm={o.asm!r}" if o is not None else "session given"
        return f"{desc}, loaded={self.loaded}"
