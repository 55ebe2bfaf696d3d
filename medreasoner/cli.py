"""``medreasoner`` command line: ground, make-tiny, models.

Outputs: OUT/<input name>/ per input: mask.png, overlay.png, result.json (2D) or seg.nii.gz,
seg.seg.nrrd, montage.png, result.json (3D).

Exit codes: 0 success; 2 bad input; 3 a model could not be loaded; 4 the CRM found no target for
at least one input (an empty mask and the reason are written); 130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from medreasoner.constants import (  # noqa: F401 - re-exported for scripts and tests
    DEFAULT_CRM,
    DEFAULT_MAX_NEW_TOKENS,
    EXIT_CANCELLED,
    EXIT_INPUT,
    EXIT_MODEL,
    EXIT_NO_TARGET,
    EXIT_OK,
)
from medreasoner.engine.events import Events


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crm", default=DEFAULT_CRM, help=f"CRM folder or hub id (default {DEFAULT_CRM})")
    p.add_argument("--crm-backend", default="transformers",
                   help="CRM backend: transformers (local/hub checkpoint) or openai (a chat endpoint)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="with --crm-backend openai: the OpenAI-compatible endpoint (vLLM, SGLang, hosted)")
    p.add_argument("--asm", default="litemedsam", help="ASM name: litemedsam, medsam2, sam2 (default litemedsam)")
    p.add_argument("--asm-checkpoint", default=None, help="ASM weights: a file, or hub 'repo:file'")
    p.add_argument("--prompt", choices=["reasoning", "direct"], default="reasoning")
    p.add_argument("--image-size", type=int, default=None,
                   help="square side the CRM sees (default: the checkpoint's, 840 for MedReasoner)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=4, help="images per CRM batch")
    p.add_argument("--asm-batch-size", type=int, default=None,
                   help="images per ASM encoder batch (default: 8 on GPU, 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with the checkpoint to run (off by default)")


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
    v.add_argument("--candidates", type=int, default=5, help="keyslice: how many candidate slices the CRM reads (1-5)")
    v.add_argument("--all-components", action="store_true", help="keep every 3D component, not only the largest")
    v.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    _add_model_args(v)

    e = sub.add_parser("evaluate", help="score a CRM + ASM on U-MRG-format data (resumable, shardable)")
    e.add_argument("--data", required=True, help="U-MRG data: HF datasets folder, parquet file/folder, or plain folder")
    e.add_argument("--split", default="test")
    e.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    e.add_argument("--limit", type=int, default=None, help="only the first N samples")
    e.add_argument("--merge-timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks' shards")
    e.add_argument("--progress", choices=["bar", "json", "none"], default="bar")
    _add_model_args(e)

    b = sub.add_parser("build-dataset", help="write a U-MRG-format parquet from your own labelled 2D or 3D data")
    b.add_argument("--out", required=True, help="parquet file to write")
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
    b.add_argument("--min-area", type=int, default=20, help="3D: least label pixels for a slice to count")
    b.add_argument("--every", type=int, default=1, help="3D: keep every n-th qualifying slice")
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
    w.add_argument("--plugins", default=None,
                   help="comma-separated modules or .py files that register CRM backends or ASMs")
    _add_model_args(w)
    return parser


def _events(kind: str):
    """SIGTERM/SIGINT set the cancel flag (jobs stop between batches, nothing partial is written);
    progress goes to tqdm bars, JSON lines on stderr, or nowhere."""
    from medreasoner.engine.events import CallbackEvents, CancelToken, JsonLinesEvents

    cancel = CancelToken()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: cancel.set())
    if kind == "json":
        return JsonLinesEvents(sys.stderr, cancel)
    if kind == "bar":
        return TqdmEvents(cancel)
    return CallbackEvents(cancel=cancel)


class TqdmEvents(Events):
    """One tqdm bar per stage, on stderr; the only place in the package that draws bars."""

    def __init__(self, cancel):
        self.cancel, self._bars = cancel, {}

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

    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def model_options(args, device: str | None = None):
    from medreasoner.models.loading import ModelOptions

    return ModelOptions(crm=args.crm, crm_backend=args.crm_backend, base_url=args.base_url, asm=args.asm,
                        asm_checkpoint=args.asm_checkpoint, device=device or args.device,
                        image_size=args.image_size, batch_size=args.batch_size,
                        asm_batch_size=args.asm_batch_size, max_new_tokens=args.max_new_tokens,
                        trust_remote_code=args.trust_remote_code).checked()


def _out_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        from medreasoner.errors import InputError

        raise InputError(f"--out {out} exists and is not a folder")
    return out


def _run_and_report(cases, args, options) -> int:
    """Load the models (inputs were checked already), run every case, print a summary."""
    from medreasoner.engine import Session, exit_code, load_models, run_cases

    out = _out_folder(args.out)
    mopts = model_options(args)
    events = _events(args.progress)
    session = Session(load_models(mopts))
    try:
        summaries = run_cases(session, cases, out, options, events)
    finally:
        events.close()
    for s in summaries:
        for w in s.warnings:
            _say(args, w, "warning")
        _say(args, f"{s.input}: {s.status}" + (f" - {s.message}" if s.message else ""))
    print(json.dumps([s.to_dict() for s in summaries], indent=2))
    return exit_code(summaries)


def cmd_ground(args) -> int:
    from medreasoner.engine import Case, RunOptions, check_query
    from medreasoner.engine.session import read_image

    query = check_query(args.query)
    options = RunOptions(prompt=args.prompt, window=args.window).checked()
    model_options(args)  # bad model options fail before any image is read
    images = [read_image(p, options.window) for p in args.image]  # inputs checked before models load
    return _run_and_report([Case(im, query) for im in images], args, options)


def cmd_segment_volume(args) -> int:
    from medreasoner.engine import Case, RunOptions, check_query
    from medreasoner.engine.session import check_volume_options
    from medreasoner.io.volumes import read_volume

    query = check_query(args.query)
    options = RunOptions(prompt=args.prompt, window=args.window, strategy=args.strategy, axis=args.axis,
                         slice_range=args.slices, key_slice=args.key_slice, n_candidates=args.candidates,
                         keep_largest=not args.all_components).checked()
    model_options(args)
    volume = read_volume(args.volume)  # input problems surface before the models load
    check_volume_options(volume, options)
    return _run_and_report([Case(volume, query)], args, options)


def cmd_evaluate(args) -> int:
    import os

    from medreasoner.data import load_samples
    from medreasoner.engine import RunOptions, Session, load_models
    from medreasoner.science.evaluate import Shard, merge, run_shard, write_reports

    shard = Shard.from_env()
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # one GPU per process under torchrun / accelerate
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    out = Path(args.out)
    options = RunOptions(prompt=args.prompt).checked()
    mopts = model_options(args, device)
    samples = load_samples(args.data, split=args.split, limit=args.limit)
    session = Session(load_models(mopts), embedding_cache_mb=0)  # every sample is a new image
    events = _events(args.progress)
    try:
        run_shard(samples, session, out, shard, options, events)
    finally:
        events.close()
    if shard.rank != 0:
        return EXIT_OK
    crm, asm = session.models.crm, session.models.asm
    records = merge(out, shard.world, timeout_s=args.merge_timeout)
    run_info = {"data": args.data, "split": args.split, "prompt": args.prompt, "crm": crm.describe(),
                "asm": asm.describe(), "world_size": shard.world, "samples": len(records)}
    title = f"{Path(args.crm).name} + {asm.name} on {Path(args.data).name}/{args.split} ({args.prompt} prompt)"
    summary = write_reports(records, {s.id: s for s in samples}, out, title, run_info)
    print((out / "table.md").read_text())
    if session.models.is_tiny:
        _say(args, "TINY TEST MODEL in this run: the numbers are meaningless.", "warning")
    _say(args, f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'overlays.png'}, {out / 'histograms.png'}")
    return EXIT_OK if summary["overall"]["n"] else EXIT_INPUT


def cmd_build_dataset(args) -> int:
    import csv

    from medreasoner.data import samples_from_2d, samples_from_volumes, write_parquet
    from medreasoner.errors import InputError

    if args.volumes:
        if not args.labels:
            raise InputError("--volumes needs --labels (a JSON file mapping label -> query)")
        try:
            with open(args.volumes, newline="") as f:
                pairs = [(r["volume"], r["labelmap"]) for r in csv.DictReader(f)]
            labels = {int(k): v for k, v in json.loads(Path(args.labels).read_text()).items()}
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"cannot read --volumes/--labels: {exc}") from exc
        events = _events(args.progress)
        try:
            samples = samples_from_volumes(pairs, labels, axis=args.axis, min_area=args.min_area, every=args.every,
                                           window=args.window, events=events)
        finally:
            events.close()
        inputs = [p for pair in pairs for p in pair]
    elif args.images and args.masks and args.queries:
        samples = samples_from_2d(args.images, args.masks, args.queries)
        inputs = [args.queries]
    else:
        raise InputError("give --images, --masks and --queries (2D) or --volumes and --labels (3D)")
    path = write_parquet(samples, args.out, inputs=inputs)
    print(f"wrote {len(samples)} samples to {path}")
    return EXIT_OK


def cmd_make_tiny(args) -> int:
    from medreasoner.models.tiny import build_tiny_crm, build_tiny_sam2

    out = Path(args.out)
    crm = build_tiny_crm(out / "crm", format_steps=args.format_steps, seed=args.seed)
    print(f"tiny CRM (TINY TEST MODEL, meaningless answers): {crm}")
    if not args.no_sam2:
        sam = build_tiny_sam2(out / "tiny_sam2.pt", seed=args.seed)
        print(f"tiny SAM2 checkpoint (random weights, use with --asm medsam2 --asm-checkpoint): {sam}")
    return EXIT_OK


def cmd_worker(args) -> int:
    from medreasoner.engine.worker import run_worker

    return run_worker(args, model_options)  # errors become "fatal" protocol lines there, not stderr text


def cmd_models(_args) -> int:
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


def main(argv: list[str] | None = None) -> int:
    from medreasoner.errors import CancelledError, InputError, ModelLoadError

    args = build_parser().parse_args(argv)
    _setup_output(args)
    handler = {"ground": cmd_ground, "segment-volume": cmd_segment_volume, "evaluate": cmd_evaluate,
               "build-dataset": cmd_build_dataset, "make-tiny": cmd_make_tiny, "models": cmd_models,
               "worker": cmd_worker}[args.command]
    json_mode = getattr(args, "progress", "bar") == "json"

    def fail(code: int, kind: str, message: str) -> int:
        if json_mode:
            _json_line({"event": "error", "kind": kind, "exit_code": code, "message": message})
        else:
            print(f"{'cancelled' if kind == 'cancelled' else 'error'}: {message}", file=sys.stderr)
        return code

    try:
        return handler(args)
    except InputError as exc:
        return fail(EXIT_INPUT, "input", str(exc))
    except ModelLoadError as exc:
        return fail(EXIT_MODEL, "model", str(exc.args[0] if exc.args else exc))
    except CancelledError as exc:
        return fail(EXIT_CANCELLED, "cancelled", f"{exc}; files of unfinished cases were not written")


if __name__ == "__main__":
    sys.exit(main())
