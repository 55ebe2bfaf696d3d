"""Export a trained CRM into a copy of the MONAI bundle.

    python training/export_bundle.py CHECKPOINT --bundle monai_bundle --out DIR [--run-name NAME]

CHECKPOINT is a trainer output folder (``final/`` or ``checkpoint-N/`` of training/sft.py or
training/grpo.py) holding a full model or a LoRA adapter. An adapter is merged into the base model
named in its ``adapter_config.json`` (``--base`` overrides that path). The bundle folder is copied to
DIR, the CRM is written to ``DIR/models/crm/`` (safetensors + processor; the bundle's ``crm`` default
picks that folder), ``configs/metadata.json`` gets a patch version bump and a changelog entry naming
the run. Everything is built in a temporary folder next to DIR and renamed into place at the end, so
DIR is either the complete bundle or absent. The exported bundle runs unchanged with:

    python -m monai.bundle run --config_file DIR/configs/inference.json \\
        --meta_file DIR/configs/metadata.json --image IMAGE --query "QUESTION" --output_dir OUT
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from medreasoner.constants import CRM_SIDECAR as SIDECAR

EXPORT_INFO = "medreasoner_export.json"  # provenance of the exported CRM, next to its weights
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Not copied from the source bundle: its CRM (replaced), its default output folder, caches.
SKIP_TOP = {"eval"}
SKIP_ANYWHERE = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


class ExportError(Exception):
    """A problem with the inputs; reported as one line and exit status 2."""


def bump_patch(version: str) -> str:
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(.*)", version.strip())
    if not m:
        raise ExportError(f"metadata version {version!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch, _ = m.groups()
    return f"{major}.{minor}.{int(patch) + 1}"


def _write_text_atomic(path: Path, text: str) -> None:
    from medreasoner.io.files import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(g), None) for g in WEIGHT_GLOBS)


def inspect_checkpoint(ckpt: Path, base_override: str | None = None) -> dict[str, Any]:
    """What CHECKPOINT holds: {"adapter": bool, "base": base model or None}; raises ExportError."""
    if not ckpt.is_dir():
        raise ExportError(f"checkpoint folder not found: {ckpt}")
    adapter_cfg = ckpt / "adapter_config.json"
    if adapter_cfg.is_file():
        base = base_override or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ExportError(f"{adapter_cfg} names no base model; pass --base")
        bp = Path(base).expanduser()
        if not bp.exists() and (str(base).startswith((".", "/", "~")) or str(base).count("/") != 1):
            raise ExportError(f"base model of the adapter not found: {base} (pass --base FOLDER)")
        return {"adapter": True, "base": str(bp.resolve()) if bp.exists() else str(base)}
    if (ckpt / "config.json").is_file():
        if not _has_weights(ckpt):
            hint = " (a DeepSpeed ZeRO-3 checkpoint without gathered weights? run its zero_to_fp32.py first)" \
                if any(ckpt.glob("global_step*")) else ""
            raise ExportError(f"{ckpt} has config.json but no model weights{hint}")
        return {"adapter": False, "base": None}
    hint = f"; pass {ckpt / 'final'} or one of its checkpoint-N folders" if (ckpt / "final").is_dir() else ""
    raise ExportError(f"{ckpt} holds neither a LoRA adapter (adapter_config.json) nor a model (config.json){hint}")


def check_destination(bundle: Path, out: Path) -> None:
    for name in ("configs/inference.json", "configs/metadata.json"):
        if not (bundle / name).is_file():
            raise ExportError(f"{bundle} is not a MONAI bundle: {name} is missing")
    b, o = bundle.resolve(), out.resolve()
    if o == b:
        raise ExportError(f"--out must differ from --bundle ({bundle})")
    if b in o.parents:
        raise ExportError(f"--out {out} lies inside the bundle {bundle}")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose a new folder")


def default_run_name(ckpt: Path) -> str:
    """``runs/sft/final`` -> ``sft``; ``runs/sft/checkpoint-200`` -> ``sft/checkpoint-200``."""
    ckpt = ckpt.resolve()
    if ckpt.name == "final":
        return ckpt.parent.name
    if ckpt.name.startswith("checkpoint-"):
        return f"{ckpt.parent.name}/{ckpt.name}"
    return ckpt.name


def _run_info(ckpt: Path) -> dict[str, Any]:
    """run.json of the training run (written by training/sft.py), if it is next to the checkpoint."""
    f = ckpt.resolve().parent / "run.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return {}


def _ignore(root: Path):
    def ignore(folder: str, names: list[str]) -> set[str]:
        here = Path(folder).resolve()
        skip = {n for n in names if n in SKIP_ANYWHERE}
        if here == root:
            skip |= {n for n in names if n in SKIP_TOP}
        if here == root / "models":
            skip |= {n for n in names if n == "crm"}
        return skip

    return ignore


def write_crm(ckpt: Path, info: dict[str, Any], dest: Path, dtype: str = "auto") -> None:
    """Load (and merge) the CRM, then write it as safetensors + processor to ``dest``.

    ``dtype`` "auto" keeps the stored dtype (a LoRA adapter is merged in the base's dtype); a full
    fine-tune kept in fp32 can be written as bfloat16 to halve the bundle.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if info["adapter"]:
        from peft import PeftModel

        print(f"loading base model {info['base']} and merging the LoRA adapter from {ckpt}", file=sys.stderr)
        base = AutoModelForImageTextToText.from_pretrained(info["base"], dtype=torch_dtype, trust_remote_code=False)
        model = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
    else:
        print(f"loading model {ckpt}", file=sys.stderr)
        model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch_dtype, trust_remote_code=False)
    # the trainer saves the processor with every checkpoint; fall back to the base model's
    has_processor = any((ckpt / f).is_file() for f in PROCESSOR_FILES)
    processor = AutoProcessor.from_pretrained(str(ckpt) if has_processor or not info["adapter"] else info["base"],
                                              trust_remote_code=False)
    dest.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # training may have turned it off (gradient checkpointing)
    model.save_pretrained(str(dest), max_shard_size="5GB")  # safetensors (the only format in transformers 5)
    processor.save_pretrained(str(dest))
    for src in (ckpt, Path(info["base"]) if info["base"] else None):
        if src is not None and (src / SIDECAR).is_file():
            shutil.copy2(src / SIDECAR, dest / SIDECAR)
            break


def update_metadata(meta_file: Path, run_name: str, ckpt: Path, info: dict[str, Any], date: str) -> str:
    meta = json.loads(meta_file.read_text())
    old = str(meta.get("version", "0.0.0"))
    new = bump_patch(old)
    how = f"LoRA adapter merged into {info['base']}" if info["adapter"] else "full model"
    entry = f"CRM replaced by training run '{run_name}' ({how}) from checkpoint {ckpt.resolve()}, exported {date}"
    meta["version"] = new
    meta["changelog"] = {new: entry, **(meta.get("changelog") or {})}  # newest first, as in the model zoo
    _write_text_atomic(meta_file, json.dumps(meta, indent=4) + "\n")
    return new


def export(ckpt: Path, bundle: Path, out: Path, run_name: str | None = None, base: str | None = None,
           dtype: str = "auto") -> Path:
    info = inspect_checkpoint(ckpt, base)
    check_destination(bundle, out)
    run_name = run_name or default_run_name(ckpt)
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tree = staging / "bundle"
        shutil.copytree(bundle, tree, ignore=_ignore(bundle.resolve()))
        crm = tree / "models" / "crm"
        write_crm(ckpt, info, crm, dtype)
        version = update_metadata(tree / "configs" / "metadata.json", run_name, ckpt, info, date)
        export_info = {"run_name": run_name, "checkpoint": str(ckpt.resolve()), "adapter_merged": info["adapter"],
                       "base_model": info["base"], "dtype": dtype, "bundle_version": version, "exported": date,
                       "source_bundle": str(bundle.resolve()), "training_run": _run_info(ckpt).get("config")}
        _write_text_atomic(crm / EXPORT_INFO, json.dumps(export_info, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tree, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Put a trained CRM (full model or LoRA adapter) into a copy of the "
                                            "MONAI bundle, with a bumped version and a changelog entry.")
    p.add_argument("checkpoint", help="trainer output: final/ or checkpoint-N/ (full model or LoRA adapter)")
    p.add_argument("--bundle", default="monai_bundle", help="the bundle folder to copy (default: monai_bundle)")
    p.add_argument("--out", required=True, help="new bundle folder (must not exist, or be empty)")
    p.add_argument("--run-name", help="name of the run in the changelog (default: from the checkpoint path)")
    p.add_argument("--base", help="base model for a LoRA adapter (default: the one in adapter_config.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the written weights (default: as stored)")
    args = p.parse_args(argv)
    try:
        out = export(Path(args.checkpoint).expanduser(), Path(args.bundle).expanduser(),
                     Path(args.out).expanduser(), run_name=args.run_name, base=args.base, dtype=args.dtype)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    out = out.resolve()
    config, meta_file = (shlex.quote(str(out / "configs" / f)) for f in ("inference.json", "metadata.json"))
    print(f"bundle written: {out} (version {meta['version']})")
    print("run it with:")
    print(f"python -m monai.bundle run --config_file {config} --meta_file {meta_file} "
          "--image IMAGE --query 'QUESTION' --output_dir OUTPUT_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
