"""2D grounding throughput: per-stage times and batched vs one-by-one on real slices.

    python benchmarks/ground2d.py [--quick] [--crm DIR] [--asm litemedsam|medsam2] [--asm-checkpoint F]
                                  [--n 16] [--batch 8] [--work DIR]

Models are loaded once through ``medreasoner.engine.load_models``; every mode then grounds the same
images through ``Session.ground_images`` with a fresh session whose embedding cache is off, so each
mode encodes every image itself. Modes (same run, same models): one-by-one (CRM batch 1, ASM batch 1:
the naive loop), batched (CRM and ASM batches of ``--batch``), and CRM batched with the ASM one by one.

Without --crm, a tiny format-trained Qwen2.5-VL is built offline with ``medreasoner make-tiny``
(cached under ``--work``; its generation is unrealistically cheap, so the CRM column mostly shows
fixed per-call overhead). Images: pydicom's CT and MR slices with rotations and flips, so every call
sees different pixels. ``--quick``: 4 images, batch 4 (a minute or two on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timed, machine, tiny_crm  # noqa: E402

QUERY = "Which structure would explain this patient's symptoms?"


def real_slices(n: int) -> list[np.ndarray]:
    from pydicom.data import get_testdata_file

    from medreasoner.io.images import load_image

    base = [load_image(get_testdata_file(f)).rgb for f in ("CT_small.dcm", "MR_small.dcm")]
    out = []
    for i in range(n):
        im = np.rot90(base[i % 2], k=(i // 2) % 4)
        out.append(np.ascontiguousarray(im[:, ::-1] if (i // 8) % 2 else im))
    return out


def run(models, images, query: str, batch: int, asm_batch: int | None = None) -> dict:
    from medreasoner.engine import RunOptions, Session

    models.crm.batch_size = batch
    models.asm.batch_size = asm_batch or batch
    session = Session(models, embedding_cache_mb=0)  # every mode encodes every image itself
    timers = [Timed(models.crm, "answer_batch"), Timed(models.asm, "encode"), Timed(models.asm, "decode")]
    try:
        t0 = time.perf_counter()
        res = session.ground_images(images, [query] * len(images), RunOptions())
        wall = time.perf_counter() - t0
    finally:
        for t in timers:
            t.restore()
    crm, enc, dec = (t.seconds for t in timers)
    return {"wall": wall, "crm": crm, "enc": enc, "dec": dec, "ok": sum(r.ok for r in res),
            "encodes": max(r.counts.get("asm_encodes", 0) for r in res) if res else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crm", default=None, help="CRM folder (default: the tiny CRM built with make-tiny)")
    ap.add_argument("--asm", default="litemedsam")
    ap.add_argument("--asm-checkpoint", default=None)
    ap.add_argument("--n", type=int, default=None, help="images (default 16, --quick 4)")
    ap.add_argument("--batch", type=int, default=None, help="CRM/ASM batch of the batched modes (default 8, --quick 4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=120, help="the tiny CRM's answers take ~70")
    ap.add_argument("--work", default="/tmp/medreasoner_bench", help="folder for the cached tiny CRM")
    ap.add_argument("--quick", action="store_true", help="4 images, batch 4")
    args = ap.parse_args()
    n = args.n or (4 if args.quick else 16)
    batch = args.batch or (4 if args.quick else 8)
    max_new = args.max_new_tokens

    from medreasoner.engine import ModelOptions, load_models

    crm_path = args.crm or str(tiny_crm(args.work) / "crm")
    models = load_models(ModelOptions(crm=crm_path, asm=args.asm, asm_checkpoint=args.asm_checkpoint,
                                      device=args.device, batch_size=batch, max_new_tokens=max_new))
    images = real_slices(n)
    run(models, images[:2], QUERY, 2)  # warm-up: first calls pay for lazy initialisation

    naive = run(models, images, QUERY, 1)
    batched = run(models, images, QUERY, batch)
    mixed = run(models, images, QUERY, batch, asm_batch=1)
    load = ", ".join(f"{k} {v:.1f} s" for k, v in models.load_seconds.items())
    print("\n" + machine())
    print(f"device={getattr(models.crm, 'device', '?')} crm={crm_path} (tiny={models.crm.is_tiny}) asm={models.asm.name} images={n} "
          f"max_new_tokens={max_new}; models loaded once ({load})")
    hdr = (f"{'mode':<26}{'wall s':>9}{'img/s':>8}{'CRM s':>9}{'ASM enc s':>11}{'ASM dec s':>11}"
           f"{'encodes':>9}{'masks':>7}")
    print(hdr)
    print("-" * len(hdr))
    rows = (("one-by-one (naive)", naive), (f"batched (batch={batch})", batched),
            (f"CRM batch {batch}, ASM 1", mixed))
    for name, r in rows:
        print(f"{name:<26}{r['wall']:>9.2f}{n / r['wall']:>8.2f}{r['crm']:>9.2f}{r['enc']:>11.2f}"
              f"{r['dec']:>11.2f}{r['encodes']:>9}{r['ok']:>7}")
    print(f"speed-up batched / naive: wall x{naive['wall'] / batched['wall']:.2f}, CRM x"
          f"{naive['crm'] / max(batched['crm'], 1e-9):.2f}, ASM encode x{naive['enc'] / max(batched['enc'], 1e-9):.2f}; "
          f"CRM-batched + ASM one-by-one: wall x{naive['wall'] / mixed['wall']:.2f}")
    if models.crm.is_tiny:
        print("TINY TEST CRM: boxes are meaningless; 'masks' counts answers with a usable box.")


if __name__ == "__main__":
    main()
