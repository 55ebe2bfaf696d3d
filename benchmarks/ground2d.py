"""2D grounding throughput: per-stage times and batched vs one-by-one on 16 real slices.

    python benchmarks/ground2d.py [--crm DIR] [--asm litemedsam|medsam2] [--asm-checkpoint F] [--n 16]

Without --crm, a tiny format-trained Qwen2.5-VL is built offline (its generation is unrealistically
cheap, so the CRM column mostly shows fixed per-call overhead). Images: pydicom's CT and MR slices
with flips, so every call sees different pixels.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def real_slices(n: int) -> list[np.ndarray]:
    from pydicom.data import get_testdata_file

    from medreasoner.io.images import load_image

    base = [load_image(get_testdata_file(f)).rgb for f in ("CT_small.dcm", "MR_small.dcm")]
    out = []
    for i in range(n):
        im = base[i % 2]
        im = np.rot90(im, k=(i // 2) % 4)
        out.append(np.ascontiguousarray(im[:, ::-1] if (i // 8) % 2 else im))
    return out


def run(pipe, images, query, batch: int, asm_batch: int | None = None):
    pipe.batch_size = batch
    pipe.crm.batch_size = batch
    pipe.asm.batch_size = asm_batch or batch
    t_crm = 0.0
    answer_batch = pipe.crm.answer_batch

    def timed(*a, **k):
        nonlocal t_crm
        t0 = time.perf_counter()
        r = answer_batch(*a, **k)
        t_crm += time.perf_counter() - t0
        return r

    pipe.crm.answer_batch = timed
    try:
        t0 = time.perf_counter()
        res = pipe.run(images, [query] * len(images))
        wall = time.perf_counter() - t0
    finally:
        del pipe.crm.answer_batch
    enc = sum(r.timings.get("asm_encode", 0) for r in res)
    dec = sum(r.timings.get("asm_decode", 0) for r in res)
    return {"wall": wall, "crm": t_crm, "enc": enc, "dec": dec, "ok": sum(r.ok for r in res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--crm", default=None)
    ap.add_argument("--asm", default="litemedsam")
    ap.add_argument("--asm-checkpoint", default=None)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=120)
    args = ap.parse_args()

    import torch

    from medreasoner.models.asm import load_asm
    from medreasoner.models.crm import load_crm
    from medreasoner.pipeline import GroundingPipeline
    from medreasoner.models.tiny import build_tiny_crm

    tmp = tempfile.TemporaryDirectory()
    crm_path = args.crm or str(build_tiny_crm(os.path.join(tmp.name, "crm"), format_steps=150))
    crm = load_crm(crm_path, device=args.device)
    crm.generation.max_new_tokens = args.max_new_tokens
    asm = load_asm(args.asm, checkpoint=args.asm_checkpoint, device=args.device)
    pipe = GroundingPipeline(crm, asm)
    images = real_slices(args.n)
    query = "Which structure would explain this patient's symptoms?"
    run(pipe, images[:2], query, 2)  # warm-up: first calls pay for lazy initialisation

    naive = run(pipe, images, query, 1)
    batched = run(pipe, images, query, args.batch)
    mixed = run(pipe, images, query, args.batch, asm_batch=1)
    print(f"device={crm.device} torch threads={torch.get_num_threads()} crm={crm_path} "
          f"(tiny={crm.is_tiny}) asm={asm.name} images={args.n}")
    hdr = f"{'mode':<26}{'wall s':>9}{'img/s':>8}{'CRM s':>9}{'ASM enc s':>11}{'ASM dec s':>11}{'masks':>7}"
    print(hdr)
    print("-" * len(hdr))
    rows = (("one-by-one (naive)", naive), (f"batched (batch={args.batch})", batched),
            (f"CRM batch {args.batch}, ASM 1", mixed))
    for name, r in rows:
        print(f"{name:<26}{r['wall']:>9.2f}{args.n / r['wall']:>8.2f}{r['crm']:>9.2f}{r['enc']:>11.2f}"
              f"{r['dec']:>11.2f}{r['ok']:>7}")
    print(f"speed-up batched / naive: wall x{naive['wall'] / batched['wall']:.2f}, CRM x"
          f"{naive['crm'] / batched['crm']:.2f}, ASM encode x{naive['enc'] / max(batched['enc'], 1e-9):.2f}; "
          f"CRM-batched + ASM one-by-one: wall x{naive['wall'] / mixed['wall']:.2f}")


if __name__ == "__main__":
    main()
