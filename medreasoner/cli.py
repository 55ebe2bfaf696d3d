"""``medreasoner`` command line: ground, make-tiny, models.

Outputs: OUT/<input name>/ per input: mask.png, overlay.png, result.json (2D) or seg.nii.gz,
seg.seg.nrrd, montage.png, result.json (3D).

Exit codes: 0 success; 2 bad input; 3 a model could not be loaded; 4 the CRM found no target for
at least one input (an empty mask and the reason are written); 130 cancelled.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medreasoner.constants import (  # noqa: F401 - re-exported for scripts and tests
    DEFAULT_CRM,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_OPENAI_BASE_URL,
    EXIT_CANCELLED,
    EXIT_INPUT,
    EXIT_MODEL,
    EXIT_NO_TARGET,
    EXIT_OK,
)
from medreasoner.engine.events import CancelToken, Events, Stage
from medreasoner.errors import CancelledError, InputError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crm", default=DEFAULT_CRM, help=f"CRM folder or hub id (default {DEFAULT_CRM})")
    p.add_argument("--crm-backend", default="transformers",
                   help="CRM backend: transformers (local/hub checkpoint) or openai (a chat endpoint)")
    p.add_argument("--base-url", default=None,
                   help="with --crm-backend openai: the OpenAI-compatible endpoint (vLLM, SGLang, hosted; "
                        f"default {DEFAULT_OPENAI_BASE_URL})")
    p.add_argument("--asm", default="litemedsam", help="ASM name: litemedsam, medsam2, sam2 (default litemedsam)")
    p.add_argument("--asm-checkpoint", default=None, help="ASM weights: a file, or hub 'repo:file'")
    p.add_argument("--prompt", choices=["reasoning", "direct"], default="reasoning")
    p.add_argument("--prompt-file", default=None,
                   help="prompt template file (UTF-8, {question} where the question goes) replacing the "
                        "checkpoint's sidecar template and --prompt; README 'Prompt templates'")
    p.add_argument("--image-size", type=int, default=None,
                   help="square side the CRM sees (default: the checkpoint's, 840 for MedReasoner)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=4, help="images per CRM batch")
    p.add_argument("--asm-batch-size", type=int, default=None,
                   help="images per ASM encoder batch (default: 8 on GPU, 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with the checkpoint to run (off by default)")
    p.add_argument("--plugins", default=None,
                   help="comma-separated modules or .py files that register CRM backends or ASMs")


_OVERWRITE_HELP = ("replace a case folder this tool did not write (README 'Overwrite policy'); results of "
                   "another input are never replaced")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medreasoner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("ground", help="segment what an implicit question refers to in 2D image(s)")
    g.add_argument("--image", action="append", required=True,
                   help="2D image (PNG/JPEG/TIFF/BMP, DICOM, .npy); repeat for several")
    g.add_argument("--query", required=True, help="the clinical question")
    g.add_argument("--out", required=True, help="output folder (one OUT/<image name>/ per image)")
    g.add_argument("--window", default=None,
                   help="intensity window: a CT preset (abdomen, lung, brain, mediastinum, bone) or 'center,width'")
    g.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress display; 'json' prints one JSON line per step on stderr")
    g.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_model_args(g)

    v = sub.add_parser("segment-volume", help="segment what a question refers to in a 3D volume")
    v.add_argument("--volume", required=True, help="NIfTI, NRRD, MHA/MHD file or a DICOM series folder")
    v.add_argument("--query", required=True)
    v.add_argument("--out", required=True, help="output folder (results go to OUT/<volume name>/)")
    v.add_argument("--strategy", default="keyslice", help="keyslice (default) or slicewise")
    v.add_argument("--axis", default="axial", help="slice axis: axial, coronal or sagittal")
    v.add_argument("--window", default=None,
                   help="CT window preset (abdomen, lung, brain, mediastinum, bone) or 'center,width'")
    v.add_argument("--slices", default=None, help="slice range 'start:stop' (stop exclusive)")
    v.add_argument("--key-slice", type=int, default=None, help="keyslice: ask the CRM about this slice only")
    v.add_argument("--candidates", type=int, default=None,
                   help="keyslice: how many candidate slices the CRM reads (1-5, default 5)")
    v.add_argument("--all-components", action="store_true", help="keep every 3D component, not only the largest")
    v.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    v.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_model_args(v)

    e = sub.add_parser("evaluate", help="score a CRM + ASM on U-MRG-format data (resumable, shardable)")
    e.add_argument("--data", required=True, help="U-MRG data: HF datasets folder, parquet file/folder, or plain folder")
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    e.add_argument("--limit", type=int, default=None, help="only the first N samples")
    e.add_argument("--merge-timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks' shards (a rank whose shard never appears "
                        "is given up on after 10 minutes)")
    e.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    e.add_argument("--protocol", choices=["robust", "reference"], default="robust",
                   help="robust (default): this project's answer parser and its repairs; reference: the public "
                        "reference evaluation's strict rules, and by default its settings (--asm medsam2 at "
                        "--asm-image-size 1024, --asm-precision fp32, --max-new-tokens 2048; each overridable)")
    e.add_argument("--asm-image-size", type=int, default=None,
                   help="medsam2/sam2: the ASM's input size (default: 1024 with --protocol reference, else its own)")
    e.add_argument("--asm-precision", choices=["fp32", "auto"], default=None,
                   help="medsam2/sam2: fp32, or auto = bf16 autocast on CUDA (default: fp32 with --protocol "
                        "reference, else auto)")
    _add_model_args(e)
    # --asm and --max-new-tokens default to what --protocol picks (cmd_evaluate resolves them): these marked
    # defaults tell "not given" from "given the default value"
    e.set_defaults(**{name: type("ProtocolDefault", (type(value),), {"protocol_default": True})(value)
                      for name, value in (("asm", "litemedsam"), ("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))})

    b = sub.add_parser("build-dataset", help="write a U-MRG-format parquet from your own labelled 2D or 3D data")
    b.add_argument("--out", required=True, help="parquet file to write")
    b.add_argument("--overwrite", action="store_true",
                   help="replace --out even if this tool did not write it (a parquet it wrote is replaced anyway)")
    b.add_argument("--images", help="2D: folder of images")
    b.add_argument("--masks", help="2D: folder of masks (same stem as the image)")
    b.add_argument("--queries", help="2D: queries .jsonl/.json ({image, query, [mask, id, supercategory, category]})")
    b.add_argument("--volumes", help="3D: CSV with columns volume,labelmap (NIfTI/NRRD/MHA paths or DICOM folders)")
    b.add_argument("--labels", help="3D: JSON {label: {query, supercategory, category}}")
    b.add_argument("--axis", default="axial",
                   help="3D: slice axis, as inference shows it: axial (default), coronal or sagittal")
    b.add_argument("--window", default=None,
                   help="3D: CT window preset (abdomen, lung, brain, mediastinum, bone) or 'center,width' for "
                        "every label (default: what inference picks from each label's query)")
    b.add_argument("--min-area", type=int, default=None, help="3D: least label pixels for a slice to count (20)")
    b.add_argument("--every", type=int, default=None, help="3D: keep every n-th qualifying slice (1)")
    b.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="3D: progress display; 'json' prints one JSON line per volume on stderr")

    t = sub.add_parser("make-tiny", help="write tiny offline test models (Qwen2.5-VL CRM + SAM2 ASM)")
    t.add_argument("out", help="folder for crm/ and tiny_sam2.pt")
    t.add_argument("--format-steps", type=int, default=150,
                   help="teacher-forced steps so the tiny CRM answers in format (0: purely random)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-sam2", action="store_true", help="skip the SAM2 checkpoint")

    sub.add_parser("models", help="list the registered CRM backends and ASMs")

    w = sub.add_parser("worker", help="load the models once and serve JSON-line requests on stdin/stdout "
                                      "(the 3D Slicer module drives this; see README 'Worker protocol')")
    _add_model_args(w)
    return parser


# ------------------------------------------------------------------------------------ argv and paths

# Values that start with '-' but are no option: a CT window centre below zero ("-600,1500"), a slice
# range ("-3:2"), a number argparse does not take for one ("-0.5e3"), a file or question that opens
# with a dash ("-scan.png", "-is there free air?"). argparse reads them as options ("expected one
# argument"). Every option of this CLI is long except -h/-v, so a single-dash token that is not one
# of those (or any token with a space in it) can only be a value.


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(long options of ``parser`` that take exactly one value, its short options)."""
    actions = parser._actions  # noqa: SLF001 - argparse keeps no public list
    one_value = {o for a in actions if a.option_strings and a.nargs is None for o in a.option_strings
                 if o.startswith("--")}
    return one_value, {o for a in actions for o in a.option_strings if not o.startswith("--")}


def _is_dash_value(token: str, shorts: set[str]) -> bool:
    return token.startswith("-") and ((not token.startswith("--") and token not in shorts) or " " in token)


def join_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--window -600,1500`` -> ``--window=-600,1500`` for every one-value option (an unambiguous
    prefix too, as argparse allows), so the README's own examples parse; anything else is unchanged
    (a missing value, ``--out --crm x``, still fails as before)."""
    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)  # noqa: SLF001
    (options, shorts), out, i = _options(parser), [], 0
    while i < len(argv):
        token = argv[i]
        if subparsers is not None and token in subparsers.choices:
            options, shorts = _options(subparsers.choices[token])
        option = token if token in options else None
        if option is None and token.startswith("--") and "=" not in token:
            matches = [o for o in options if o.startswith(token)]
            option = matches[0] if len(matches) == 1 else None
        if option is not None and i + 1 < len(argv) and _is_dash_value(argv[i + 1], shorts):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


# What the tool adds below an output folder, at most: a case name (an input file name, up to 255),
# the work area and staging name (~60) and the longest file name (~20). Checked up front: found
# after the models loaded and the case ran otherwise.
OUTPUT_PATH_RESERVE = 340


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """The output folder ``path``, refused (``InputError``, exit 2) when it cannot be created or written:
    a file in its place or as a parent, a name longer than the file system allows, a folder this user
    cannot write. Checked before any input is read or model loads; creates nothing (the write test is
    a folder made and removed at once in the nearest existing parent, since ``os.access`` is wrong for
    root, ACLs and read-only mounts). Returns the path with ``~`` expanded."""
    text = os.fspath(path)
    if not str(text).strip():
        raise InputError(f"{option} is empty; give a folder")
    out = Path(text).expanduser()
    target = out.absolute()
    if len(os.fsencode(target)) + OUTPUT_PATH_RESERVE >= 4096:
        raise InputError(f"cannot create {option} {_short(text)}: the path is {len(os.fsencode(target))} bytes "
                         f"long; with the up to {OUTPUT_PATH_RESERVE} the results add (case folder, work area, file "
                         "names) it passes the 4095 the system allows")
    parent, missing = target, []
    while not os.path.lexists(parent):
        missing.append(parent.name)
        parent = parent.parent
    if not os.path.isdir(parent):
        if os.path.islink(parent):
            raise InputError(f"cannot create {option} {_short(text)}: {parent} is a broken link")
        if parent == target:
            raise InputError(f"{option} {_short(text)} is a file, not a folder; give a folder")
        raise InputError(f"cannot create {option} {_short(text)}: {parent} is a file, not a folder")
    limit = _name_max(parent)
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise InputError(f"cannot create {option} {_short(text)}: the name {_short(name, 40)} is "
                             f"{len(os.fsencode(name))} bytes long, the file system allows {limit}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medreasoner-write-test-", dir=parent))
    except OSError as exc:
        where = "" if parent == target else f": {parent} is not writable"
        raise InputError(f"cannot write {option} {_short(text)}{where} ({exc.strerror or exc})") from exc
    return out


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """A file to write (``build-dataset --out x.parquet``): its folder as for :func:`check_output_dir`,
    a name the file system takes, and not a folder."""
    text = os.fspath(path)
    out = Path(text).expanduser()
    if not str(text).strip():
        raise InputError(f"{option} is empty; give the path of the file to write")
    check_output_dir(out.absolute().parent, option=f"the folder of {option}")
    limit = _name_max(out.absolute().parent) if os.path.isdir(out.absolute().parent) else 255
    if len(os.fsencode(out.name)) > limit:
        raise InputError(f"cannot create {option} {_short(text)}: the name {_short(out.name, 40)} is "
                         f"{len(os.fsencode(out.name))} bytes long, the file system allows {limit}")
    if os.path.isdir(out):  # os.path.isdir, not Path.is_dir: the latter raises on a too-long name
        raise InputError(f"{option} {_short(text)} is a folder; give the path of the file to write")
    return out


def _short(text: str, n: int = 120) -> str:
    """Paths in messages: a 300-character name would make the one-line message unreadable."""
    return text if len(text) <= n else f"{text[:n // 2]}...{text[-n // 4:]}"


# ---------------------------------------------------------------------------------------- signals


class Interrupts:
    """SIGINT/SIGTERM for one command (README: exit 130; finished cases kept, unfinished ones write nothing).

    Outside ``between_batches()`` (checking options, reading inputs, loading models, writing reports)
    a signal raises ``KeyboardInterrupt`` at once: model loading has no point to stop at, and a
    Ctrl-C that waits minutes for a 7B load is one users answer with kill -9. Inside it, the first
    signal only sets ``cancel``: the core stops at the next batch boundary and the batch that was
    running when it came is dropped (``_StopAtBoundary``); a second signal stops at once.
    """

    def __init__(self) -> None:
        self.cancel = CancelToken()
        self.signal_name: str | None = None
        self.phase = "checking the options"
        self.kept: Callable[[], str] = lambda: "nothing was written"
        self._cooperative = False
        self._previous: dict[int, Any] = {}

    def install(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers found (``main`` also runs inside tests and the demo)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._cooperative and not self.cancel.is_set():
            self.cancel.set()  # no output here: writing to stderr inside a handler can re-enter the stream
            return
        raise KeyboardInterrupt(self.signal_name)

    @contextmanager
    def between_batches(self, phase: str) -> Iterator[CancelToken]:
        """While batches run, signals stop at the next batch boundary; a signal whose batch had
        already been the last still ends the command with 130."""
        self.phase, self._cooperative = phase, True
        try:
            yield self.cancel
        finally:
            self._cooperative = False
        if self.cancel.is_set():
            raise CancelledError(f"cancelled during {phase}")

    def message(self) -> str:
        """The line for a stop at once (a signal outside batches, or a second one)."""
        sig = self.signal_name or "SIGINT"
        again = " a second" if self.cancel.is_set() else ""
        return f"stopped at once by{again} {sig} while {self.phase}; {self.kept()}"


class _StopAtBoundary(Events):
    """The display events plus cancelling: after a signal, the next progress report raises
    ``CancelledError``. The core reports progress when a batch is done and before its results are
    written, so the batch that was running when the signal came is dropped, not written (the core's
    own checks come only before each batch: a signal during the last batch would be missed)."""

    def __init__(self, display: Events, cancel: CancelToken):
        self.display, self.cancel = display, cancel
        self.cases_done = 0

    def progress(self, stage: Stage, done: int, total: int) -> None:
        self.display.progress(stage, done, total)
        if str(stage) == Stage.CASES.value:
            self.cases_done = done  # reported after a case's files are written: those are kept
        self.check_cancelled(str(stage))

    def log(self, message: str, level: str = "info") -> None:
        self.display.log(message, level)

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def close(self) -> None:
        self.display.close()


def _events(kind: str, cancel: CancelToken) -> _StopAtBoundary:
    """Progress to tqdm bars, JSON lines on stderr, or nowhere; ``cancel`` is the command's
    :class:`Interrupts` flag."""
    from medreasoner.engine.events import JsonLinesEvents

    display: Events = JsonLinesEvents(sys.stderr) if kind == "json" else TqdmEvents() if kind == "bar" else Events()
    return _StopAtBoundary(display, cancel)


class TqdmEvents(Events):
    """One tqdm bar per stage, on stderr; the only place in the package that draws bars."""

    def __init__(self) -> None:
        self._bars: dict[str, Any] = {}

    def progress(self, stage, done: int, total: int) -> None:
        from tqdm import tqdm

        key = str(stage)
        bar = self._bars.get(key)
        if bar is None or done < bar.n:
            if bar is not None:
                bar.close()
            bar = self._bars[key] = tqdm(total=total, desc=key.replace("_", " "), unit="step", leave=False)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def log(self, message: str, level: str = "info") -> None:
        logging.getLogger("medreasoner").log(logging.getLevelName(level.upper()), message)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


# ---------------------------------------------------------------------------------------- options


def model_options(args, device: str | None = None):
    """Checked ``ModelOptions`` from the model arguments; also what the worker checks with. The
    device must exist here (a bundle config may name one it is only parsed without)."""
    from medreasoner.models.loading import ModelOptions, check_device_present

    base_url = getattr(args, "base_url", None)
    if base_url is not None and args.crm_backend == "transformers":
        raise InputError("--base-url only applies to a served CRM (--crm-backend openai); the transformers backend "
                         "runs the model here")
    options = ModelOptions(crm=args.crm, crm_backend=args.crm_backend,
                           base_url=DEFAULT_OPENAI_BASE_URL if base_url is None else base_url, asm=args.asm,
                           asm_checkpoint=args.asm_checkpoint, device=device or args.device,
                           image_size=args.image_size, batch_size=args.batch_size,
                           asm_batch_size=args.asm_batch_size, max_new_tokens=args.max_new_tokens,
                           trust_remote_code=args.trust_remote_code,
                           prompt_file=getattr(args, "prompt_file", None)).checked()
    check_device_present(options.device)
    return options


def check_strategy_options(options, *, candidates_given: bool = False):
    """Refuse volume options the chosen strategy would silently ignore (the CLI and the bundle)."""
    if candidates_given and options.strategy == "slicewise":
        raise InputError("--candidates only applies to --strategy keyslice; drop one of them")
    if candidates_given and options.key_slice is not None:
        raise InputError("--candidates has no effect with --key-slice (the CRM reads that slice only); drop one")
    return options


@dataclass
class Checked:
    """What :func:`preflight` checked, for the command to use."""

    interrupts: Interrupts
    out: Path | None = None
    query: str | None = None
    model_options: Any = None  # medreasoner.models.loading.ModelOptions
    run_options: Any = None  # medreasoner.engine.RunOptions
    shard: Any = None  # medreasoner.science.evaluate.Shard


_FOLDER_OUT = ("ground", "segment-volume", "evaluate")


def preflight(args, interrupts: Interrupts) -> Checked:
    """One validation step for every command, before any input is read or model loads: the output
    path, the question, run and model options, plugins, the distributed environment. Anything wrong
    is an ``InputError`` (exit 2) costing milliseconds, never a model load. (The worker checks its
    own, answering with protocol lines.)"""
    from medreasoner.engine import RunOptions, check_query

    checked = Checked(interrupts)
    command = args.command
    if command in _FOLDER_OUT:
        checked.out = check_output_dir(args.out)
    elif command == "make-tiny":
        checked.out = check_output_dir(args.out, option="the output folder")
    elif command == "build-dataset":
        checked.out = check_output_file(args.out)
        from medreasoner.data.parquet import check_replaceable_file

        check_replaceable_file(checked.out, args.overwrite)
        if args.volumes and not args.labels:
            raise InputError("--volumes needs --labels (a JSON file mapping label -> query)")
        if not args.volumes and not (args.images and args.masks and args.queries):
            raise InputError("give --images, --masks and --queries (2D) or --volumes and --labels (3D)")
        if not args.volumes:
            given = [f"--{n.replace('_', '-')}" for n in ("min_area", "every") if getattr(args, n) is not None]
            if given:  # silently ignored otherwise
                raise InputError(f"{' and '.join(given)} only apply to 3D data (--volumes); drop them for 2D")
        args.min_area = 20 if args.min_area is None else args.min_area
        args.every = 1 if args.every is None else args.every
    if command in ("ground", "segment-volume"):
        checked.query = check_query(args.query)
    if command == "ground":
        checked.run_options = RunOptions(prompt=args.prompt, window=args.window).checked()
    elif command == "segment-volume":
        checked.run_options = check_strategy_options(RunOptions(
            prompt=args.prompt, window=args.window, strategy=args.strategy, axis=args.axis,
            slice_range=args.slices, key_slice=args.key_slice,
            n_candidates=5 if args.candidates is None else args.candidates,
            keep_largest=not args.all_components).checked(), candidates_given=args.candidates is not None)
    elif command == "evaluate":
        from medreasoner.science.evaluate import Shard

        checked.shard = Shard.from_env()
        if Path(args.data).is_dir():  # its masks/ would be overwritten by ours
            from medreasoner.engine.output_sets import check_output_root

            check_output_root(checked.out, [Path(args.data)])
        if not args.merge_timeout > 0:
            raise InputError(f"--merge-timeout must be more than 0 seconds, got {args.merge_timeout}")
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be at least 1, got {args.limit}")
        checked.run_options = RunOptions(prompt=args.prompt).checked()
    if command in ("ground", "segment-volume", "evaluate"):
        from medreasoner.models.registry import load_plugins

        load_plugins(args.plugins)  # before the options check: a plugin may register the backend named
        checked.model_options = model_options(args, _rank_device(args.device) if command == "evaluate" else None)
    return checked


def _rank_device(device: str) -> str:
    """Under torchrun / accelerate each process takes the GPU of its LOCAL_RANK (``--device auto``)."""
    text = os.environ.get("LOCAL_RANK", "").strip()
    if device != "auto" or not text:
        return device
    if not text.isdigit():
        raise InputError(f"LOCAL_RANK={text!r} is not a GPU number (torchrun sets it; unset it to run as one process)")
    import torch

    return f"cuda:{int(text)}" if torch.cuda.is_available() else device


# --------------------------------------------------------------------------------------- commands


def _run_and_report(cases, args, checked: Checked) -> int:
    """Load the models (inputs and options were checked already), run every case, print a summary."""
    from medreasoner.engine import Session, exit_code, load_models, run_cases
    from medreasoner.engine.batch import check_case_dirs

    interrupts, out = checked.interrupts, checked.out
    check_case_dirs(cases, out, args.overwrite)  # a folder it may not replace: refused before the models load
    interrupts.phase = "loading the models"
    session = Session(load_models(checked.model_options))
    events = _events(args.progress, interrupts.cancel)
    interrupts.kept = lambda: f"{events.cases_done} of {len(cases)} case(s) had finished and are kept in {out}"
    try:
        with interrupts.between_batches("the run"):
            summaries = run_cases(session, cases, out, checked.run_options, events, overwrite=args.overwrite)
    except CancelledError as exc:
        sig = interrupts.signal_name or "a cancel"
        raise CancelledError(f"{sig} {str(exc).removeprefix('cancelled ')}: {events.cases_done} of {len(cases)} "
                             f"case(s) had finished and are kept in {out}; unfinished cases wrote nothing") from exc
    finally:
        events.close()
    interrupts.phase = "reporting"
    for s in summaries:
        for w in s.warnings:
            _say(args, w, "warning")
        _say(args, f"{s.input}: {s.status}" + (f" - {s.message}" if s.message else ""))
    print(json.dumps([s.to_dict() for s in summaries], indent=2))
    return exit_code(summaries)


def cmd_ground(args, checked: Checked) -> int:
    from medreasoner.engine import Case
    from medreasoner.engine.session import read_image

    checked.interrupts.phase = "reading the images"
    images = [read_image(p, checked.run_options.window) for p in args.image]  # inputs checked before models load
    return _run_and_report([Case(im, checked.query) for im in images], args, checked)


def cmd_segment_volume(args, checked: Checked) -> int:
    from medreasoner.engine import Case
    from medreasoner.engine.session import check_volume_options
    from medreasoner.io.volumes import read_volume

    checked.interrupts.phase = "reading the volume"
    volume = read_volume(args.volume)  # input problems surface before the models load
    check_volume_options(volume, checked.run_options)
    return _run_and_report([Case(volume, checked.query)], args, checked)


def cmd_evaluate(args, checked: Checked) -> int:
    import dataclasses

    from medreasoner.data import load_samples
    from medreasoner.engine import Session, load_models
    from medreasoner.errors import ModelLoadError
    from medreasoner.science import evaluate as ev
    from medreasoner.science.evaluate import merge, run_shard, write_reports

    interrupts, shard, out = checked.interrupts, checked.shard, checked.out

    def given(value):  # None when the protocol chooses (the value is the marked parser default)
        return None if getattr(value, "protocol_default", False) else value

    settings = ev.protocol_settings(args.protocol, asm=given(args.asm), asm_image_size=args.asm_image_size,
                                    asm_precision=args.asm_precision, max_new_tokens=given(args.max_new_tokens))
    options = dataclasses.replace(checked.model_options, asm=str(settings["asm"]),
                                  max_new_tokens=int(settings["max_new_tokens"])).checked()
    ev.check_resume(out, shard, settings["protocol"])
    _say(args, ev.describe_settings(settings))
    for difference in settings.get("differs_from_reference", []):
        _say(args, f"this run differs from the reference evaluation: {difference}", "warning")
    interrupts.phase = "reading the samples"
    samples = load_samples(args.data, split=args.split, limit=args.limit)
    interrupts.phase = "loading the models"
    asm = None
    if ev.needs_protocol_asm(settings):
        try:
            asm = ev.build_protocol_asm(settings, checkpoint=args.asm_checkpoint, device=options.device,
                                        batch_size=options.asm_batch_size, config_dir=out / "asm_config")
        except (OSError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise ModelLoadError(f"could not load the ASM {settings['asm']!r}: {exc}") from exc
    session = Session(load_models(options, asm=asm), embedding_cache_mb=0)  # every sample is a new image
    events = _events(args.progress, interrupts.cancel)
    interrupts.kept = lambda: f"finished samples are kept in {shard.path(out)}; rerun the same command to resume"
    try:
        with interrupts.between_batches("the evaluation"):
            run_shard(samples, session, out, shard, checked.run_options, events, protocol=settings["protocol"])
            if shard.rank != 0:
                return EXIT_OK
            records = merge(out, shard.world, timeout_s=args.merge_timeout, events=events)
    except CancelledError as exc:
        sig = interrupts.signal_name or "a cancel"
        if "rerun" in str(exc):  # run_shard and merge say what they kept
            raise CancelledError(f"{sig}: {exc}") from exc
        raise CancelledError(f"{sig} {str(exc).removeprefix('cancelled ')}: every sample is kept in "
                             f"{shard.path(out)}; rerun the same command to write the reports") from exc
    finally:
        events.close()
    interrupts.phase, interrupts.kept = "writing the reports", lambda: "rerun the same command to write them"
    crm, asm = session.models.crm, session.models.asm
    run_info = {"data": args.data, "split": args.split, "prompt": args.prompt, "protocol": settings["protocol"],
                "crm": crm.describe(), "asm": asm.describe(), "world_size": shard.world, "samples": len(records)}
    title = (f"{Path(args.crm).name} + {asm.name} on {Path(args.data).name}/{args.split} ({args.prompt} prompt, "
             f"{settings['protocol']} protocol)")
    summary = write_reports(records, {s.id: s for s in samples}, out, title, run_info,
                            protocol=settings["protocol"], protocol_settings=settings)
    print((out / "table.md").read_text())
    if session.models.is_tiny:
        _say(args, "TINY TEST MODEL in this run: the numbers are meaningless.", "warning")
    _say(args, f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'overlays.png'}, {out / 'histograms.png'}")
    return EXIT_OK if summary["overall"]["n"] else EXIT_INPUT


def cmd_build_dataset(args, checked: Checked) -> int:
    import csv

    from medreasoner.data import samples_from_2d, samples_from_volumes, write_parquet

    interrupts = checked.interrupts
    interrupts.phase = "reading the samples"
    if args.volumes:
        try:
            with open(args.volumes, newline="") as f:
                pairs = [(r["volume"], r["labelmap"]) for r in csv.DictReader(f)]
            labels = {int(k): v for k, v in json.loads(Path(args.labels).read_text()).items()}
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"cannot read --volumes/--labels: {exc}") from exc
        events = _events(args.progress, interrupts.cancel)
        try:
            with interrupts.between_batches("reading the volumes"):
                samples = samples_from_volumes(pairs, labels, axis=args.axis, min_area=args.min_area,
                                               every=args.every, window=args.window, events=events)
        except CancelledError as exc:
            raise CancelledError(f"{interrupts.signal_name or 'a cancel'} "
                                 f"{str(exc).removeprefix('cancelled ')}: nothing was written") from exc
        finally:
            events.close()
        inputs = [p for pair in pairs for p in pair]
    else:
        samples = samples_from_2d(args.images, args.masks, args.queries)
        inputs = [args.queries]
    interrupts.phase = "writing the parquet file"  # written to a temporary name and renamed: all or nothing
    path = write_parquet(samples, checked.out, inputs=inputs)
    print(f"wrote {len(samples)} samples to {path}")
    return EXIT_OK


def cmd_make_tiny(args, checked: Checked) -> int:
    from medreasoner.models.tiny import build_tiny_crm, build_tiny_sam2

    out = Path(args.out)
    checked.interrupts.phase, checked.interrupts.kept = "building the tiny models", lambda: f"{out} may be incomplete"
    crm = build_tiny_crm(out / "crm", format_steps=args.format_steps, seed=args.seed)
    print(f"tiny CRM (TINY TEST MODEL, meaningless answers): {crm}")
    if not args.no_sam2:
        sam = build_tiny_sam2(out / "tiny_sam2.pt", seed=args.seed)
        print(f"tiny SAM2 checkpoint (random weights, use with --asm medsam2 --asm-checkpoint): {sam}")
    return EXIT_OK


def cmd_worker(args, checked: Checked) -> int:
    from medreasoner.engine.worker import run_worker

    checked.interrupts.phase = "starting the worker"
    return run_worker(args, model_options)  # errors become "fatal" protocol lines there, not stderr text


def cmd_models(_args, _checked: Checked) -> int:
    from medreasoner.models.asm import asm_names
    from medreasoner.models.crm import openai_compat, qwen_vl  # noqa: F401 - importing registers them
    from medreasoner.models.registry import ASMS, CRMS

    asm_names()  # importing the ASM modules registers them

    print(json.dumps({"crm_backends": CRMS.describe(), "asms": ASMS.describe()}, indent=2))
    return EXIT_OK


class _JsonLogHandler(logging.Handler):
    """Log records as JSON lines (the events protocol), so ``--progress json`` stderr is all JSON."""

    def emit(self, record: logging.LogRecord) -> None:
        _json_line({"event": "log", "level": record.levelname.lower(), "message": record.getMessage(),
                    "logger": record.name})


def _json_line(obj: dict) -> None:
    from medreasoner.engine.events import EVENTS_PROTOCOL_VERSION

    sys.stderr.write(json.dumps({"v": EVENTS_PROTOCOL_VERSION, **obj}, ensure_ascii=False) + "\n")
    sys.stderr.flush()


def _setup_output(args) -> None:
    """Logging and third-party bars for the chosen progress display: with ``json`` every stderr line
    is a JSON object; with ``json`` and ``none`` no library draws a progress bar."""
    import os

    progress = getattr(args, "progress", "bar")
    level = logging.INFO if args.verbose else logging.WARNING
    if progress in ("json", "none"):
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers/hub bars (weights loading)
    if progress == "json":
        import warnings

        root = logging.getLogger()
        root.handlers[:] = [_JsonLogHandler()]
        root.setLevel(level)
        logging.captureWarnings(True)
        warnings.simplefilter("default")
    else:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _say(args, message: str, level: str = "info") -> None:
    """A line for the person at the terminal (or a log event in JSON mode) on stderr."""
    if getattr(args, "progress", "bar") == "json":
        _json_line({"event": "log", "level": level, "message": message})
    else:
        print(message if level == "info" else f"{level.upper()}: {message}", file=sys.stderr)


def _one_line(message: str) -> str:
    """Error lines are one line (a GUI or a driver reads them; library messages span pages)."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "unknown error"


# Options naming files or folders: "~/x" means the home folder in every one of them, quoted or not
# (a shell expands an unquoted ~ only at the start of a word, so "--image=~/a.png" arrives as typed).
PATH_OPTIONS = ("image", "volume", "data", "out", "crm", "asm_checkpoint", "prompt_file", "images", "masks",
                "queries", "volumes", "labels")


def _expand_user_paths(args) -> None:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v
                                 for v in value])


def main(argv: list[str] | None = None) -> int:
    from medreasoner.errors import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(join_dash_values(list(sys.argv[1:] if argv is None else argv), parser))
    _expand_user_paths(args)
    _setup_output(args)
    handler = {"ground": cmd_ground, "segment-volume": cmd_segment_volume, "evaluate": cmd_evaluate,
               "build-dataset": cmd_build_dataset, "make-tiny": cmd_make_tiny, "models": cmd_models,
               "worker": cmd_worker}[args.command]
    json_mode = getattr(args, "progress", "bar") == "json"

    def fail(code: int, kind: str, message: str) -> int:
        message = _one_line(message)
        if json_mode:
            _json_line({"event": "error", "kind": kind, "exit_code": code, "message": message})
        else:
            print(f"{'cancelled' if kind == 'cancelled' else 'error'}: {message}", file=sys.stderr)
        return code

    interrupts = Interrupts().install()  # from the start: a signal while checking or loading is honoured too
    try:
        checked = Checked(interrupts) if args.command == "worker" else preflight(args, interrupts)
        return handler(args, checked)
    except InputError as exc:
        return fail(EXIT_INPUT, "input", str(exc))
    except ModelLoadError as exc:
        return fail(EXIT_MODEL, "model", str(exc.args[0] if exc.args else exc))
    except CancelledError as exc:
        return fail(EXIT_CANCELLED, "cancelled", str(exc))
    except KeyboardInterrupt:
        return fail(EXIT_CANCELLED, "cancelled", interrupts.message())
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        name = str(exc.filename or "")
        shown = name if len(name) <= 80 else f"{name[:60]}...{name[-15:]}"
        return fail(EXIT_INPUT, "input", f"a path is too long for this file system ({len(name)} characters): {shown}")
    finally:
        interrupts.restore()


if __name__ == "__main__":
    sys.exit(main())
