"""Config helpers for ``configs/inference.json``: option objects, case lists, exit codes.

The bundle is a MONAI workflow (``network_def``, ``preprocessing``, ``dataset``, ``inferer``,
``postprocessing``, ``evaluator``); the pieces live in ``network.py``, ``transforms.py``,
``inferer.py`` and ``handlers.py``. This module only turns config values into what those pieces
take: the core's ``ModelOptions`` / ``RunOptions`` (checked before anything loads) and the list of
``{"image", "query", "case"}`` dicts the ``dataset`` holds (every path checked before any model
loads). Image reading, windowing, orientation, slicing and segmentation all happen in the
``medreasoner`` core.

Exit codes (see docs/README.md): 0 every case ok; 4 the CRM found no usable target for at least one
case (an empty mask and the reason are still written); 2 bad input (missing image, bad case list,
an option the core rejects) or a case that failed; 3 a model could not be loaded; 130 cancelled.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from medreasoner.constants import DEFAULT_CRM as DEFAULT_CRM_HUB_ID
from medreasoner.constants import EXIT_INPUT, EXIT_MODEL

logger = logging.getLogger("medreasoner.bundle")

BUNDLE_ROOT = Path(__file__).resolve().parent.parent
BATCH_OVERLAY = "configs/batch_inference.json"

_NULLS = ("", "null", "none")


def fail(message: str, code: int) -> SystemExit:
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


def bundle_root() -> str:
    """``bundle_root``: the folder holding ``configs/`` and ``scripts/``, wherever the run starts from."""
    return str(BUNDLE_ROOT)


def default_crm(bundle_root: str | Path) -> str:
    """The bundle's own ``models/crm`` folder when weights were copied there, else the hub id."""
    local = Path(bundle_root) / "models" / "crm"
    return str(local) if (local / "config.json").is_file() else DEFAULT_CRM_HUB_ID


def default_asm_checkpoint(bundle_root: str | Path, asm: str) -> str | None:
    """``models/MedSAM2_latest.pt`` for ``asm=medsam2`` when it is there; otherwise the ASM's default."""
    local = Path(bundle_root) / "models" / "MedSAM2_latest.pt"
    return str(local) if str(asm).lower() == "medsam2" and local.is_file() else None


def torch_device(device: Any):
    """The evaluator's ``torch.device``: ``auto`` picks CUDA when present. The models choose their own
    device from ``model_options`` (the evaluator moves no tensors: a case is not one)."""
    import torch

    from medreasoner.models.devices import resolve_device

    text = _text(device) or "auto"
    try:
        return resolve_device("auto") if text == "auto" else torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise fail(f"bad device {text!r}: {exc}", EXIT_INPUT) from exc


# ------------------------------------------------------------------------------------------ cases


def _checked(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every image must exist and every case needs a question; folder names are fixed here, in case
    order, so a re-run writes to the same folders (the core CLI's naming)."""
    from medreasoner.engine import StemAllocator

    missing = [c["image"] for c in cases if not Path(c["image"]).exists()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise fail("image not found: " + ", ".join(missing[:5]) + more, EXIT_INPUT)
    no_query = [c["image"] for c in cases if not c["query"] or not c["query"].strip()]
    if no_query:
        raise fail("no query for: " + ", ".join(no_query[:5]) + " (pass --query or fill the query column)",
                   EXIT_INPUT)
    stems = StemAllocator()
    return [{"image": c["image"], "query": c["query"].strip(), "case": stems.take(c["image"])} for c in cases]


# MONAI's config parser reads a value that starts with one of these as syntax, not text: "$" runs it
# as Python, "@" and "%" substitute other config content. A question typed after --query must never
# be code, so such a value is refused before anything runs; --query_file passes any text literally.
CONFIG_SYNTAX_PREFIXES = ("$", "@", "%")
TEXT_OPTIONS = ("query",)
MAX_QUERY_FILE_BYTES = 1 << 20


def refuse_config_syntax_in_text(argv: list[str] | None = None) -> None:
    """First item of ``run`` in ``inference.json`` (evaluated before anything that reads the query): refuse
    ``--query`` values MONAI would evaluate. Reads the raw command line, since by the time a config
    value reaches a script MONAI has already evaluated it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        for name in TEXT_OPTIONS:
            value = None
            if arg == f"--{name}" and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(f"--{name}="):
                value = arg.split("=", 1)[1]
            if value is not None and value.lstrip().startswith(CONFIG_SYNTAX_PREFIXES):
                raise fail(f"--{name} starts with {value.lstrip()[0]!r}, which MONAI's config parser runs as code or "
                           f"a reference, not text; put the question in a file and pass --{name}_file FILE",
                           EXIT_INPUT)


def query_from_file(path: Any) -> str | None:
    """``--query_file FILE``: the question, read literally (UTF-8, one question; surrounding blank
    space dropped), for text MONAI's parser or the shell would change."""
    from medreasoner.errors import InputError
    from medreasoner.io.files import read_text_file

    text = _text(path)
    if text is None:
        return None
    try:
        question = read_text_file(text, "query file", max_bytes=MAX_QUERY_FILE_BYTES).strip()
    except InputError as exc:
        raise fail(str(exc), EXIT_INPUT) from exc
    if not question:
        raise fail(f"query file {text} holds no question", EXIT_INPUT)
    return question


def single_case(image: Any = None, query: Any = None, dataset_dir: Any = None,
                query_file: Any = None) -> list[dict[str, Any]]:
    """``dataset#data`` of ``inference.json``: the one case ``--image`` + ``--query`` (or ``--query_file``).

    With neither given the list is empty: the bundle still parses (``check_properties``, MONAI
    tools that set ``dataset_data`` themselves) and ``run`` stops with "nothing to do" (exit 2).
    """
    image, query = _text(image), _query(query, query_file)
    if _text(dataset_dir) and not image:
        raise fail(f"dataset_dir needs the batch overlay: --config_file \"['configs/inference.json',"
                   f"'{BATCH_OVERLAY}']\"", EXIT_INPUT)
    if not image:
        return []
    return _checked([{"image": str(Path(image).expanduser().absolute()), "query": query}])


def _read_rows(folder: Path) -> list[dict[str, Any]]:
    csv_file, json_file = folder / "cases.csv", folder / "cases.json"
    if csv_file.is_file() and json_file.is_file():
        raise fail(f"dataset_dir {folder} has both cases.csv and cases.json; keep one", EXIT_INPUT)
    try:
        if csv_file.is_file():
            with csv_file.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                if "image" not in (reader.fieldnames or []):
                    raise fail(f"{csv_file} needs the columns image,query; got {reader.fieldnames}", EXIT_INPUT)
                return [dict(row) for row in reader]
        if json_file.is_file():
            rows = json.loads(json_file.read_text(encoding="utf-8"))
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise fail(f"{json_file} must hold a list of {{\"image\": ..., \"query\": ...}}", EXIT_INPUT)
            return rows
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise fail(f"cannot read the case list in {folder}: {exc}", EXIT_INPUT) from exc
    raise fail(f"dataset_dir {folder} has neither cases.csv nor cases.json", EXIT_INPUT)


def _query(query: Any, query_file: Any) -> str | None:
    if _text(query) is not None and _text(query_file) is not None:
        raise fail("give either query or query_file, not both", EXIT_INPUT)
    return query_from_file(query_file) if _text(query_file) is not None else _text(query)


def case_list(dataset_dir: Any, query: Any = None, image: Any = None, query_file: Any = None) -> list[dict[str, Any]]:
    """``dataset#data`` of the ``batch_inference.json`` overlay: the cases in ``dataset_dir``.

    ``cases.csv`` (columns image,query) or ``cases.json``; relative image paths resolve against the
    folder and ``query`` (when given) fills rows whose own query is empty.
    """
    folder_text = _text(dataset_dir)
    if _text(image):
        raise fail("give either image (with query) or dataset_dir, not both", EXIT_INPUT)
    if not folder_text:
        raise fail("the batch overlay needs --dataset_dir DIR (a folder with cases.csv or cases.json)", EXIT_INPUT)
    folder = Path(folder_text).expanduser()
    if not folder.is_dir():
        raise fail(f"dataset_dir not found or not a folder: {folder}", EXIT_INPUT)
    default_query = _query(query, query_file)
    cases = []
    for n, row in enumerate(_read_rows(folder), start=1):
        path = _text(row.get("image"))
        if not path:
            raise fail(f"case {n} in {folder} has no image", EXIT_INPUT)
        full = Path(path).expanduser()
        cases.append({"image": str(full if full.is_absolute() else folder / full),
                      "query": _text(row.get("query")) or default_query})
    if not cases:
        raise fail(f"the case list in {folder} is empty", EXIT_INPUT)
    return _checked(cases)


# ---------------------------------------------------------------------------------------- options


def model_options(crm: str, crm_backend: str = "transformers", base_url: str | None = None, asm: str = "litemedsam",
                  asm_checkpoint: str | None = None, device: str = "auto", max_new_tokens: int = 1024,
                  batch_size: int = 4, asm_batch_size: Any = None, image_size: Any = None,
                  trust_remote_code: bool = False, prompt_file: Any = None):
    """The core's ``ModelOptions`` from config values (checked before anything loads). ``prompt_file``:
    a prompt template file ({question} where the question goes), as the CLI's ``--prompt-file``."""
    from medreasoner.engine import ModelOptions
    from medreasoner.errors import InputError

    try:
        return ModelOptions(
            crm=str(crm), crm_backend=str(crm_backend), base_url=_text(base_url) or ModelOptions.base_url,
            asm=str(asm), asm_checkpoint=_text(asm_checkpoint), device=_text(device) or "auto",
            max_new_tokens=int(max_new_tokens), batch_size=int(batch_size),
            asm_batch_size=None if _optional(asm_batch_size) is None else int(asm_batch_size),
            image_size=None if _optional(image_size) is None else int(image_size),
            trust_remote_code=bool(trust_remote_code), prompt_file=_text(prompt_file),
        ).checked()
    except (InputError, TypeError, ValueError) as exc:
        raise fail(f"bad model option: {exc}", EXIT_INPUT) from exc


def output_dir_option(value: Any) -> Path:
    """``output_dir``, checked where the bundle checks its other options, before any model loads: the
    core CLI's check (a file in the way, a name too long, a folder not writable: exit 2). Creates nothing."""
    from medreasoner.cli import check_output_dir
    from medreasoner.errors import InputError

    try:
        return check_output_dir(str(_text(value) or "eval"), option="output_dir").absolute()
    except InputError as exc:
        raise fail(f"bad output_dir: {exc}", EXIT_INPUT) from exc


def run_options(prompt: str = "reasoning", strategy: str = "keyslice", axis: str = "axial", window: Any = None,
                slice_range: Any = None, key_slice: Any = None, n_candidates: int = 5, keep_largest: bool = True):
    """The core's ``RunOptions`` from config values (checked before anything loads, as the CLI checks them)."""
    from medreasoner.cli import check_strategy_options
    from medreasoner.engine import RunOptions
    from medreasoner.errors import InputError

    try:
        return check_strategy_options(RunOptions(
            prompt=str(prompt), strategy=str(strategy), axis=str(axis), window=window_option(window),
            slice_range=slice_range_option(slice_range), key_slice=None if _optional(key_slice) is None else int(key_slice),
            n_candidates=int(n_candidates), keep_largest=bool(keep_largest)).checked())
    except (InputError, TypeError, ValueError) as exc:
        raise fail(f"bad option: {exc}", EXIT_INPUT) from exc


def load_session(options):
    """Models loaded once through ``medreasoner.engine.load_models``, wrapped in a session."""
    from medreasoner.engine import Session, load_models
    from medreasoner.errors import InputError, ModelLoadError

    logger.info("loading CRM %s (%s) and ASM %s on %s", options.crm, options.crm_backend, options.asm, options.device)
    try:
        return Session(load_models(options))
    except ModelLoadError as exc:
        raise fail(f"could not load the models: {exc}", EXIT_MODEL) from exc
    except InputError as exc:
        raise fail(str(exc), EXIT_INPUT) from exc
