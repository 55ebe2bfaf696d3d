"""``inferer`` and the evaluator's ``prepare_batch``: one case, one question, through the session.

As a sliding-window inferer holds how a network is applied (window size, overlap), the
``GroundingInferer`` holds how the CRM + ASM are applied: the core's ``RunOptions`` (strategy,
axis, window, slice range, key slice, candidates, largest component, prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer

from medreasoner.engine.events import Events

from .transforms import CaseFailure

logger = logging.getLogger("medreasoner.bundle")


class LogEvents(Events):
    """The core's progress events to the bundle's logger (MONAI's logging.conf decides where they go)."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self._last: dict[str, int] = {}

    def progress(self, stage, done: int, total: int) -> None:
        if self.enabled and (done == total or done - self._last.get(str(stage), 0) >= max(1, total // 10)):
            self._last[str(stage)] = done
            logger.info("%s: %d/%d", stage, done, total)

    def log(self, message: str, level: str = "info") -> None:
        logger.log(logging.getLevelName(level.upper()), message)


class GroundingInferer(Inferer):
    """``inferer(image, network, query)`` -> the core's result for that case.

    A case the core refuses (a slice range outside the volume, an empty question, a bad image) comes
    back as a ``CaseFailure`` so that ``postprocessing`` reports it and the other cases still run;
    model failures and cancelling propagate and stop the run.
    """

    def __init__(self, options: Any = None, progress: bool = True):
        from medreasoner.engine import RunOptions

        self.options = options if options is not None else RunOptions()
        self.events = LogEvents(progress)

    def __call__(self, inputs: Any, network: Callable, query: str | None = None, *args: Any, **kwargs: Any) -> Any:
        from medreasoner.errors import InputError

        if isinstance(inputs, CaseFailure):
            return inputs
        try:
            return network(inputs, query, self.options, self.events)
        except (InputError, ValueError) as exc:
            logger.error("%s: %s", getattr(inputs, "path", "case"), exc)
            return CaseFailure(str(exc))


class PrepareCase(PrepareBatch):
    """``prepare_batch`` for the evaluator: (read image, no label, (query,), {}). Nothing moves to a
    device: the models place their own tensors."""

    def __init__(self, image_key: str = "image", query_key: str = "query"):
        self.image_key, self.query_key = image_key, query_key

    def __call__(self, batchdata: Mapping, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        return batchdata[self.image_key], None, (batchdata.get(self.query_key),), {}
