"""The MONAI bundle end to end: one real ``python -m monai.bundle run`` over a small dataset folder.

    python benchmarks/bundle.py [--cases 2] [--size 64] [--slices 16] [--max-new-tokens 160]

Runs the bundle exactly as a user does (a subprocess, ``configs/inference.json`` +
``configs/batch_inference.json``, ``--device cpu``) with the tiny format-trained CRM
(``medreasoner make-tiny``, cached under ``--work``) and the real LiteMedSAM weights, on
``--cases`` CT-like phantom volumes (different volumes, so no case reuses another's caches).
Prints the process wall time, the model load time the bundle logs, and per case the grounding and
writing time, CRM calls, ASM encodes/decodes and propagation steps from ``result.json``.
The tiny CRM only learned the answer format: the numbers measure the plumbing and the model calls,
not answer quality; a 7B CRM on CPU spends minutes per CRM call instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, tiny_crm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "monai_bundle" / "configs"
QUERY = "Which organ would explain the patient's jaundice?"


def phantom(path: Path, size: int, slices: int, shift: int) -> Path:
    """int16 CT-like volume: air, a body ellipse, a bright ellipsoid moved by ``shift`` voxels."""
    import nibabel as nib

    i, j, k = np.mgrid[0:size, 0:size, 0:slices].astype(np.float32)
    c = size / 2
    vol = np.full((size, size, slices), -1000, np.int16)
    vol[((i - c) / (0.42 * size)) ** 2 + ((j - c) / (0.38 * size)) ** 2 <= 1] = 20
    vol[((i - c - shift) / (0.16 * size)) ** 2 + ((j - c + 3) / (0.12 * size)) ** 2
        + ((k - slices / 2) / (0.3 * slices)) ** 2 <= 1] = 250
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/mr_bench", help="cache for the tiny CRM and the data")
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--slices", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    args = p.parse_args(argv)

    work = Path(args.work)
    crm = tiny_crm(work) / "crm"
    data = work / f"bundle_{args.size}x{args.size}x{args.slices}"
    data.mkdir(parents=True, exist_ok=True)
    names = [phantom(data / f"ct{n}.nii.gz", args.size, args.slices, 2 * n).name for n in range(args.cases)]
    with open(data / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "query"], *[[n, QUERY] for n in names]])
    out = work / "bundle_out"
    config = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'batch_inference.json'}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config,
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--dataset_dir", str(data), "--output_dir", str(out), "--crm", str(crm), "--asm", "litemedsam",
           "--max_new_tokens", str(args.max_new_tokens), "--device", "cpu"]
    print(machine(), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 4):
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    loaded = re.search(r"models loaded in ([\d.]+) s \(([^)]*)\)", proc.stderr)
    engine = re.search(r"Engine run complete\. Time taken: ([\d:.]+)", proc.stderr)
    print(f"bundle run: {args.cases} volume(s) {args.size}x{args.size}x{args.slices}, keyslice (5 candidates), "
          f"max_new_tokens {args.max_new_tokens}, exit code {proc.returncode}")
    print(f"process wall {wall:.1f} s; models loaded in {loaded.group(1) if loaded else '?'} s "
          f"({loaded.group(2) if loaded else '?'}); evaluator run (load + cases) {engine.group(1) if engine else '?'}")
    print("| case | status | ground s | in CRM s | in ASM encode s | write s | CRM calls | ASM encodes | ASM decodes "
          "| propagation steps |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        record = json.loads((out / name.split(".")[0] / "result.json").read_text())
        t, c = record["timings_s"], record["counts"]
        print(f"| {name} | {record['status']} | {t.get('total', 0):.1f} | {t.get('crm', 0):.1f} "
              f"| {t.get('asm_encode', 0):.1f} | {t.get('write', 0):.2f} | {c['crm_calls']} "
              f"| {c['asm_encodes']} | {c['asm_decodes']} | {c['propagation_steps']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
