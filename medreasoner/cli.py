"""``medreasoner`` command line: ground, make-tiny, models.

Exit codes: 0 success; 2 bad input; 3 a model could not be loaded; 4 the CRM found no target for
at least one image (an empty mask and the reason are written); 130 cancelled (nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_INPUT, EXIT_MODEL, EXIT_NO_TARGET, EXIT_CANCELLED = 0, 2, 3, 4, 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from medreasoner.crm.base import DEFAULT_CRM

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
    p.add_argument("--max-new-tokens", type=int, default=1024)
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
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--window", default=None,
                   help="intensity window: a CT preset (abdomen, lung, brain, mediastinum, bone) or 'center,width'")
    g.add_argument("--progress", choices=["bar", "json", "none"], default="bar",
                   help="progress display; 'json' prints one JSON line per step on stderr")
    _add_model_args(g)

    v = sub.add_parser("segment-volume", help="segment what a question refers to in a 3D volume")
    v.add_argument("--volume", required=True, help="NIfTI, NRRD, MHA/MHD file or a DICOM series folder")
    v.add_argument("--query", required=True)
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--strategy", default="keyslice", help="keyslice (default) or slicewise")
    v.add_argument("--axis", default="axial", help="slice axis: axial, coronal or sagittal")
    v.add_argument("--window", default=None,
                   help="CT window preset (abdomen, lung, brain, mediastinum, bone) or 'center,width'")
    v.add_argument("--slices", default=None, help="slice range 'start:stop' (stop exclusive)")
    v.add_argument("--key-slice", type=int, default=None, help="keyslice: ask the CRM about this slice only")
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
    b.add_argument("--volumes", help="3D: CSV with columns volume,labelmap (NIfTI paths)")
    b.add_argument("--labels", help="3D: JSON {label: {query, supercategory, category}}")
    b.add_argument("--axis", type=int, default=2, help="3D: slice axis in RAS (0 sagittal, 1 coronal, 2 axial)")
    b.add_argument("--min-area", type=int, default=20, help="3D: least label pixels for a slice to count")
    b.add_argument("--every", type=int, default=1, help="3D: keep every n-th qualifying slice")

    t = sub.add_parser("make-tiny", help="write tiny offline test models (Qwen2.5-VL CRM + SAM2 ASM)")
    t.add_argument("out", help="folder for crm/ and tiny_sam2.pt")
    t.add_argument("--format-steps", type=int, default=150,
                   help="teacher-forced steps so the tiny CRM answers in format (0: purely random)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-sam2", action="store_true", help="skip the SAM2 checkpoint")

    sub.add_parser("models", help="list the registered CRM backends and ASMs")
    return parser


def _parse_window(text: str | None):
    from medreasoner.intensity import parse_window

    return None if not text else parse_window(text)


def _output_paths(images: list[Path], out: Path) -> list[dict[str, Path]]:
    seen: dict[str, int] = {}
    paths = []
    for p in images:
        stem = p.name.split(".")[0] or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        if n:
            stem = f"{stem}_{n}"
        paths.append({k: out / f"{stem}_{k}.{ext}" for k, ext in
                      (("mask", "png"), ("result", "json"), ("overlay", "png"))})
    return paths


def _json_progress(stage: str, done: int, total: int) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total}), file=sys.stderr, flush=True)


def _cancel_on_signals() -> threading.Event:
    """SIGTERM/SIGINT set the returned flag; jobs stop between batches and write nothing partial."""
    cancel = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: cancel.set())
    return cancel


def _progress(kind: str, total: int):
    if kind == "json":
        return _json_progress, None
    if kind == "bar":
        from tqdm import tqdm

        bar = tqdm(total=total, desc="grounding", unit="img")

        def report(stage, done, n):
            bar.n = done
            bar.refresh()
        return report, bar
    return None, None


def _build_pipeline(args, device: str | None = None):
    from medreasoner.asm import load_asm
    from medreasoner.crm import GenerationConfig, load_crm
    from medreasoner.pipeline import GroundingPipeline

    device = device or args.device
    crm_kwargs = {"device": device, "batch_size": args.batch_size,
                  "trust_remote_code": args.trust_remote_code,
                  "generation": GenerationConfig(max_new_tokens=args.max_new_tokens)}
    if args.image_size:
        crm_kwargs["image_size"] = args.image_size
    if args.crm_backend == "openai":
        crm_kwargs["base_url"] = args.base_url
    crm = load_crm(args.crm, backend=args.crm_backend, **crm_kwargs)
    asm = load_asm(args.asm, checkpoint=args.asm_checkpoint, device=device, batch_size=args.asm_batch_size)
    return GroundingPipeline(crm, asm, prompt=args.prompt, batch_size=args.batch_size)


def cmd_ground(args) -> int:
    from medreasoner.images import load_image
    from medreasoner.outputs import guard_outputs, write_all
    from medreasoner.pipeline import check_query
    from medreasoner.runner import outputs_2d

    query = check_query(args.query)
    window = _parse_window(args.window)
    images = [load_image(p, window=window) for p in args.image]  # all inputs checked before models load
    in_paths = [Path(p) for p in args.image]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        from medreasoner.errors import InputError

        raise InputError(f"--out {out} exists and is not a folder")
    targets = _output_paths(in_paths, out)
    guard_outputs([p for t in targets for p in t.values()], in_paths)

    pipe = _build_pipeline(args)

    cancel = _cancel_on_signals()
    report, bar = _progress(args.progress, len(images))
    try:
        results = pipe.run([im.rgb for im in images], [query] * len(images), progress=report, cancel=cancel)
    finally:
        if bar is not None:
            bar.close()

    files: dict[Path, bytes] = {}
    summary = []
    for im, res, paths in zip(images, results, targets):
        files.update(outputs_2d(im, res, query, paths))
        summary.append({"input": im.path, "status": res.status, **{k: str(v) for k, v in paths.items()}})
    write_all(files)

    for res, s in zip(results, summary):
        for w in res.warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        line = f"{s['input']}: {s['status']}"
        if not res.ok:
            line += f" - {res.message}"
        print(line, file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return EXIT_OK if all(r.ok for r in results) else EXIT_NO_TARGET


def cmd_segment_volume(args) -> int:
    from medreasoner.pipeline import check_query
    from medreasoner.volume_pipeline import VolumeGrounder, write_volume_outputs
    from medreasoner.volumes import read_volume

    query = check_query(args.query)
    volume = read_volume(args.volume)  # input problems surface before the models load
    pipe = _build_pipeline(args)
    cancel = _cancel_on_signals()
    # the grounder draws its own tqdm bars per stage; only JSON lines need a reporter here
    report = _json_progress if args.progress == "json" else None
    grounder = VolumeGrounder(pipe.crm, pipe.asm, args.prompt, args.batch_size)
    res = grounder.run(volume, query, strategy=args.strategy, axis=args.axis, window=args.window,
                       slice_range=args.slices, key_slice=args.key_slice, keep_largest=not args.all_components,
                       progress=report, cancel=cancel)
    outputs = write_volume_outputs(res, args.out, stem="seg", inputs=[args.volume])
    for w in res.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"{args.volume}: {res.status}" + (f" - {res.message}" if res.message else ""), file=sys.stderr)
    print(json.dumps({"status": res.status, **outputs}, indent=2))
    return EXIT_OK if res.ok else EXIT_NO_TARGET


def cmd_evaluate(args) -> int:
    import os

    from medreasoner.data import load_samples
    from medreasoner.evaluate import Shard, merge, run_shard, write_reports

    shard = Shard.from_env()
    device = args.device
    if device == "auto" and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():  # one GPU per process under torchrun / accelerate
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    out = Path(args.out)
    samples = load_samples(args.data, split=args.split, limit=args.limit)
    pipe = _build_pipeline(args, device)
    cancel = _cancel_on_signals()
    report, bar = _progress(args.progress, 0)

    def on_progress(done, total):
        if bar is not None:
            bar.total = total
            bar.set_description(f"evaluate rank {shard.rank}/{shard.world}")
        if report is not None:
            report("evaluate", done, total)

    try:
        run_shard(samples, pipe, out, shard, progress=on_progress, cancel=cancel)
    finally:
        if bar is not None:
            bar.close()
    if shard.rank != 0:
        return EXIT_OK
    records = merge(out, shard.world, timeout_s=args.merge_timeout)
    run_info = {"data": args.data, "split": args.split, "prompt": args.prompt, "crm": pipe.crm.describe(),
                "asm": pipe.asm.describe(), "world_size": shard.world, "samples": len(records)}
    title = f"{Path(args.crm).name} + {pipe.asm.name} on {Path(args.data).name}/{args.split} ({args.prompt} prompt)"
    summary = write_reports(records, {s.id: s for s in samples}, out, title, run_info)
    print((out / "table.md").read_text())
    if pipe.crm.is_tiny or pipe.asm.is_tiny:
        print("WARNING: TINY TEST MODEL in this run: the numbers are meaningless.", file=sys.stderr)
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'overlays.png'}, {out / 'histograms.png'}",
          file=sys.stderr)
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
        samples = samples_from_volumes(pairs, labels, axis=args.axis, min_area=args.min_area, every=args.every)
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
    from medreasoner.tiny import build_tiny_crm, build_tiny_sam2

    out = Path(args.out)
    crm = build_tiny_crm(out / "crm", format_steps=args.format_steps, seed=args.seed)
    print(f"tiny CRM (TINY TEST MODEL, meaningless answers): {crm}")
    if not args.no_sam2:
        sam = build_tiny_sam2(out / "tiny_sam2.pt", seed=args.seed)
        print(f"tiny SAM2 checkpoint (random weights, use with --asm medsam2 --asm-checkpoint): {sam}")
    return EXIT_OK


def cmd_models(_args) -> int:
    from medreasoner.asm import asm_names  # noqa: F401 - imports register the ASMs
    from medreasoner.crm import openai_compat, qwen_vl  # noqa: F401
    from medreasoner.registry import ASMS, CRMS

    print(json.dumps({"crm_backends": CRMS.describe(), "asms": ASMS.describe()}, indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from medreasoner.errors import CancelledError, InputError, ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    handler = {"ground": cmd_ground, "segment-volume": cmd_segment_volume, "evaluate": cmd_evaluate, "build-dataset": cmd_build_dataset,
               "make-tiny": cmd_make_tiny,
               "models": cmd_models}[args.command]
    try:
        return handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (ModelLoadError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_MODEL
    except CancelledError as exc:
        print(f"cancelled: {exc}; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
