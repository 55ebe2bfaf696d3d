"""Evaluator handlers (``handlers`` in the config, attached as ``val_handlers``).

* ``SessionLoader`` loads the CRM and the ASM into ``network_def`` when the run starts, the place
  model-zoo bundles load weights (``CheckpointLoader``); by then the case list has been checked.
* ``CaseLog`` collects each case's summary, logs it, and at ``finalize`` prints the JSON summary
  and ends with the bundle's exit code.
* ``ExitCodes`` turns a failure that stops the run into the documented exit code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from .inference import fail

logger = logging.getLogger("medreasoner.bundle")


class SessionLoader:
    """Load ``network``'s models at ``Events.STARTED`` (after the dataset was built and checked)."""

    def __init__(self, network: Any):
        self.network = network

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.network.load()


class CaseLog:
    """Every case's ``CaseSummary`` (``engine.state.output[summary_key]``, set by ``SaveResultd``)."""

    def __init__(self, output_dir: str | Path = "eval", summary_key: str = "summary"):
        self.output_dir = Path(str(output_dir)).expanduser().absolute()
        self.summary_key = summary_key
        self.summaries: list[Any] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)

    def reset(self, engine: Engine | None = None) -> None:
        self.summaries = []

    def record(self, engine: Engine) -> None:
        summary = (engine.state.output or {}).get(self.summary_key)
        if summary is None:
            return
        self.summaries.append(summary)
        line = f"{summary.input}: {summary.status}" + (f" - {summary.message}" if summary.message else "")
        (logger.info if summary.status == "ok" else logger.warning)(line)
        for name, path in summary.outputs.items():
            logger.info("  %s: %s", name, path)

    def exit_code(self) -> int:
        from medreasoner.engine import exit_code

        return exit_code(self.summaries)

    def finish(self) -> list[dict[str, Any]]:
        """Print the summary of all cases as JSON on stdout; exit non-zero unless every case was ok."""
        from medreasoner.constants import EXIT_INPUT

        if not self.summaries:
            raise fail("nothing to do: pass --image FILE --query TEXT, or --dataset_dir DIR with the "
                       "configs/batch_inference.json overlay", EXIT_INPUT)
        records = [s.to_dict() for s in self.summaries]
        print(json.dumps(records, indent=2, default=str))
        code = self.exit_code()
        logger.info("outputs are in %s (exit code %d)", self.output_dir, code)
        if code:
            raise SystemExit(code)
        return records


class ExitCodes:
    """At ``Events.EXCEPTION_RAISED``: model load failure -> 3, cancelled -> 130, another deliberate
    medreasoner error -> 2; anything else propagates unchanged (a bug keeps its traceback)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, exc: BaseException) -> None:
        from medreasoner.constants import EXIT_CANCELLED, EXIT_INPUT, EXIT_MODEL
        from medreasoner.errors import CancelledError, MedReasonerError, ModelLoadError

        if isinstance(exc, ModelLoadError):
            raise fail(f"could not load the models: {exc}", EXIT_MODEL) from exc
        if isinstance(exc, (CancelledError, KeyboardInterrupt)):
            raise fail(f"cancelled: {exc}", EXIT_CANCELLED) from exc
        if isinstance(exc, MedReasonerError):
            raise fail(str(exc), EXIT_INPUT) from exc
        raise exc
