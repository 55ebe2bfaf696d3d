"""Thin adapter between ``configs/inference.json`` and the ``medreasoner`` core.

It only (1) turns the config values into a list of (image, query) cases, (2) loads the CRM and the
ASM once through ``medreasoner.models.crm.load_crm`` / ``medreasoner.models.asm.load_asm``, (3) hands everything to
``medreasoner.runner.run_cases`` and (4) reports where the outputs are and exits with the runner's
exit code. Image reading, windowing, orientation, slicing and segmentation all happen in the core.

Exit codes (see docs/README.md): 0 every case ok; 4 the CRM found no usable target for at least one
case (an empty mask and the reason are still written); 2 bad input (missing image, bad case list,
an option the core rejects) or a case that failed; 3 a model could not be loaded; 130 cancelled.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medreasoner.constants import DEFAULT_CRM as DEFAULT_CRM_HUB_ID
from medreasoner.constants import EXIT_CANCELLED, EXIT_INPUT, EXIT_MODEL

logger = logging.getLogger("medreasoner.bundle")

BUNDLE_ROOT = Path(__file__).resolve().parent.parent

_NULLS = ("", "null", "none")


def _fail(message: str, code: int) -> SystemExit:
    """Log ``message`` (printing it when logging is not configured) and return the SystemExit to raise."""
    logger.error(message)
    if not logging.getLogger().handlers and not logger.handlers:
        print(f"error: {message}", file=sys.stderr)
    return SystemExit(code)


def _optional(value: Any) -> Any:
    """``--key null`` reaches the config as the string 'null' (python-fire only maps None to None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
        return None
    return value


def _text(value: Any) -> str | None:
    """python-fire turns ``--query "liver, spleen"`` into a tuple and ``--query 42`` into an int."""
    value = _optional(value)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def window_option(value: Any) -> str | tuple[float, float] | None:
    """A window preset name (passed on as is) or (center, width).

    python-fire parses ``--window 40,400`` as a tuple; a 'center,width' string becomes the same tuple,
    which the core accepts for 2D images and volumes alike. Validation is left to the core.
    """
    value = _optional(value)
    if isinstance(value, str) and "," in value:
        value = tuple(v.strip() for v in value.split(","))
    if isinstance(value, (list, tuple)):
        try:
            return tuple(float(v) for v in value)  # type: ignore[return-value]
        except (TypeError, ValueError):
            return ",".join(str(v) for v in value)
    return None if value is None else str(value)


def slice_range_option(value: Any) -> str | None:
    """None, or 'a:b' passed through to the core unchanged."""
    value = _optional(value)
    return None if value is None else str(value)


def default_crm(bundle_root: str | Path) -> str:
    """The bundle's own ``models/crm`` folder when weights were copied there, else the hub id."""
    local = Path(bundle_root) / "models" / "crm"
    return str(local) if (local / "config.json").is_file() else DEFAULT_CRM_HUB_ID


def default_asm_checkpoint(bundle_root: str | Path, asm: str) -> str | None:
    """``models/MedSAM2_latest.pt`` for ``asm=medsam2`` when it is there; otherwise the ASM's default."""
    local = Path(bundle_root) / "models" / "MedSAM2_latest.pt"
    return str(local) if str(asm).lower() == "medsam2" and local.is_file() else None


def _read_case_list(folder: Path) -> list[dict[str, Any]]:
    csv_file, json_file = folder / "cases.csv", folder / "cases.json"
    if csv_file.is_file() and json_file.is_file():
        raise _fail(f"dataset_dir {folder} has both cases.csv and cases.json; keep one", EXIT_INPUT)
    try:
        if csv_file.is_file():
            with csv_file.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if "image" not in (reader.fieldnames or []):
                    raise _fail(f"{csv_file} needs the columns image,query; got {reader.fieldnames}", EXIT_INPUT)
                return [dict(row) for row in reader]
        if json_file.is_file():
            rows = json.loads(json_file.read_text(encoding="utf-8"))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise _fail(f"{json_file} must hold a list of {{\"image\": ..., \"query\": ...}}", EXIT_INPUT)
            return rows
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise _fail(f"cannot read the case list in {folder}: {exc}", EXIT_INPUT) from exc
    raise _fail(f"dataset_dir {folder} has neither cases.csv nor cases.json", EXIT_INPUT)


def build_cases(image: Any = None, query: Any = None, dataset_dir: Any = None) -> list[tuple[str, str]]:
    """(image path, query) pairs from either ``image`` + ``query`` or ``dataset_dir``.

    In a dataset folder, relative image paths resolve against the folder and ``query`` (when given)
    fills rows whose own query is empty. Every path is checked here, before any model is loaded.
    """
    image, query, dataset_dir = _text(image), _text(query), _text(dataset_dir)
    if image and dataset_dir:
        raise _fail("give either image (with query) or dataset_dir, not both", EXIT_INPUT)
    if dataset_dir:
        folder = Path(dataset_dir).expanduser()
        if not folder.is_dir():
            raise _fail(f"dataset_dir not found or not a folder: {folder}", EXIT_INPUT)
        pairs = []
        for n, row in enumerate(_read_case_list(folder), start=1):
            path = _text(row.get("image"))
            if not path:
                raise _fail(f"case {n} in {folder} has no image", EXIT_INPUT)
            full = Path(path).expanduser()
            pairs.append((str(full if full.is_absolute() else folder / full), _text(row.get("query")) or query))
        if not pairs:
            raise _fail(f"the case list in {folder} is empty", EXIT_INPUT)
    elif image:
        pairs = [(str(Path(image).expanduser().absolute()), query)]
    else:
        raise _fail("nothing to do: pass --image FILE --query TEXT, or --dataset_dir DIR", EXIT_INPUT)

    missing = [p for p, _ in pairs if not Path(p).exists()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise _fail("image not found: " + ", ".join(missing[:5]) + more, EXIT_INPUT)
    no_query = [p for p, q in pairs if not q or not q.strip()]
    if no_query:
        raise _fail("no query for: " + ", ".join(no_query[:5]) + " (pass --query or fill the query column)",
                    EXIT_INPUT)
    return [(p, q.strip()) for p, q in pairs]


def model_options(crm: str, crm_backend: str = "transformers", base_url: str | None = None, asm: str = "litemedsam",
                  asm_checkpoint: str | None = None, device: str = "auto", max_new_tokens: int = 1024,
                  batch_size: int = 4, asm_batch_size: Any = None, image_size: Any = None,
                  trust_remote_code: bool = False):
    """The core's ``ModelOptions`` from config values (checked before anything loads)."""
    from medreasoner.engine import ModelOptions
    from medreasoner.errors import InputError

    try:
        return ModelOptions(
            crm=str(crm), crm_backend=str(crm_backend), base_url=_text(base_url) or ModelOptions.base_url,
            asm=str(asm), asm_checkpoint=_text(asm_checkpoint), device=_text(device) or "auto",
            max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
            asm_batch_size=None if _optional(asm_batch_size) is None else int(asm_batch_size),
            image_size=None if _optional(image_size) is None else int(image_size),
            trust_remote_code=bool(trust_remote_code),
        ).checked()
    except (InputError, TypeError, ValueError) as exc:
        raise _fail(f"bad model option: {exc}", EXIT_INPUT) from exc


def run_options(prompt: str = "reasoning", strategy: str = "keyslice", axis: str = "axial", window: Any = None,
                slice_range: Any = None, key_slice: Any = None, n_candidates: int = 5, keep_largest: bool = True):
    """The core's ``RunOptions`` from config values (checked before anything loads)."""
    from medreasoner.engine import RunOptions
    from medreasoner.errors import InputError

    try:
        return RunOptions(prompt=str(prompt), strategy=str(strategy), axis=str(axis), window=window_option(window),
                          slice_range=slice_range_option(slice_range),
                          key_slice=None if _optional(key_slice) is None else int(key_slice),
                          n_candidates=int(n_candidates), keep_largest=bool(keep_largest)).checked()
    except (InputError, TypeError, ValueError) as exc:
        raise _fail(f"bad option: {exc}", EXIT_INPUT) from exc


def load_session(options):
    """Models loaded once through ``medreasoner.engine.load_models``, wrapped in a session."""
    from medreasoner.engine import Session, load_models
    from medreasoner.errors import InputError, ModelLoadError

    logger.info("loading CRM %s (%s) and ASM %s on %s", options.crm, options.crm_backend, options.asm, options.device)
    try:
        return Session(load_models(options))
    except ModelLoadError as exc:
        raise _fail(f"could not load the models: {exc}", EXIT_MODEL) from exc
    except InputError as exc:
        raise _fail(str(exc), EXIT_INPUT) from exc


class _LogEvents:
    """Progress to the bundle's logger (MONAI's logging.conf decides where it goes)."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._last: dict[str, int] = {}

    def progress(self, stage, done: int, total: int) -> None:
        if self.enabled and (done == total or done - self._last.get(str(stage), 0) >= max(1, total // 10)):
            self._last[str(stage)] = done
            logger.info("%s: %d/%d", stage, done, total)

    def log(self, message: str, level: str = "info") -> None:
        logger.log(logging.getLevelName(level.upper()), message)

    def cancelled(self) -> bool:
        return False

    def check_cancelled(self, where: str) -> None:
        pass


def run(cases: Sequence[tuple[str, str]], output_dir: str | Path, session, options, progress: bool = True) -> list[dict]:
    """Every case through ``medreasoner.engine.run_cases`` (the CLI's writer and layout); exits
    non-zero when a case was not ok."""
    from medreasoner.engine import Case, exit_code, run_cases
    from medreasoner.errors import CancelledError, MedReasonerError, ModelLoadError

    out = Path(str(output_dir)).expanduser().absolute()
    logger.info("%d case(s) -> %s", len(cases), out)
    try:
        summaries = run_cases(session, [Case(p, q) for p, q in cases], out, options, _LogEvents(progress))
    except ModelLoadError as exc:
        raise _fail(str(exc), EXIT_MODEL) from exc
    except CancelledError as exc:
        raise _fail(f"cancelled: {exc}", EXIT_CANCELLED) from exc
    except (MedReasonerError, ValueError) as exc:
        raise _fail(str(exc), EXIT_INPUT) from exc
    for s in summaries:
        line = f"{s.input}: {s.status}"
        if s.message:
            line += f" - {s.message}"
        (logger.info if s.status == "ok" else logger.warning)(line)
        for name, path in s.outputs.items():
            logger.info("  %s: %s", name, path)
    print(json.dumps([s.to_dict() for s in summaries], indent=2, default=str))
    code = exit_code(summaries)
    logger.info("outputs are in %s (exit code %d)", out, code)
    if code:
        raise SystemExit(code)
    return [s.to_dict() for s in summaries]
