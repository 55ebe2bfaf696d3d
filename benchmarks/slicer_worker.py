"""Local mode of the Slicer module: one long-lived worker vs a process per click, on the same volume.

Runs the module's library (MedReasonerLib) against Slicer's real MRML scene (slicer-core, in
.venv-slicer) and the real worker (.venv, tiny test CRM + LiteMedSAM on CPU). Three questions about
one volume: with the kept worker the models load once and questions 2 and 3 reuse the session's
caches; the naive way starts a fresh worker for every question.

    make slicer-env setup
    .venv-slicer/bin/python benchmarks/slicer_worker.py [--volume V] [--slices 40:56]

Target: models loaded once; questions 2 and 3 each take at most a third of question 1's time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "MedReasonerSlicer"), str(ROOT / "tools")]
PY = str(ROOT / ".venv" / "bin" / "python")
QUESTIONS = ["Which part of the brain would explain this patient's difficulty producing speech?",
             "Where is the lesion that explains the weakness of the left arm?",
             "Which structure would explain the loss of vision in the right eye?"]
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def prepare(volume: str | None) -> tuple[str, str]:
    crm = ROOT / "demo_out" / "models" / "crm"
    if not (crm / "config.json").exists():  # built by make-tiny (as make demo does)
        subprocess.run([PY, "-m", "medreasoner", "make-tiny", str(crm.parent), "--no-sam2"], check=True)
    if volume is None:
        volume = str(ROOT / "demo_out" / "mni152_t1_2mm.nii.gz")
        subprocess.run([PY, "-m", "medreasoner.demo", "--write-mni", volume], check=True, capture_output=True)
    return volume, str(crm)


def ask(logic, node, question: str, settings) -> dict:
    t0 = time.perf_counter()
    pid_before = logic.worker.proc.pid if logic.worker is not None and logic.worker.alive else None
    outcome = logic.start(node, question, settings).wait(3600)
    wall = time.perf_counter() - t0
    item = outcome.segments[0]
    counts = item.record.get("counts", {})
    started = pid_before is None or logic.worker.proc.pid != pid_before
    return {"wall": wall, "loads": int(started), "encodes": counts.get("asm_encodes", 0),
            "hits": counts.get("embedding_cache_hits", 0), "status": item.status}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volume", default=None, help="a volume file (default: MNI152 T1 2 mm from nilearn)")
    p.add_argument("--slices", default="40:56", help="display slice range considered (bounds the CPU time)")
    args = p.parse_args()
    import slicer
    import slicer_headless
    from MedReasonerLib.logic import MedReasonerLogic
    from MedReasonerLib.parameters import RunSettings

    volume, crm = prepare(args.volume)
    slicer_headless.init()
    node = slicer.util.loadVolume(volume)
    settings = RunSettings(crm=crm, asm="litemedsam", device="cpu", slice_range=args.slices,
                           extra_worker_args="--max-new-tokens 160")
    rows = []
    kept = MedReasonerLogic(worker_python=PY, worker_env=ENV)
    try:
        for k, q in enumerate(QUESTIONS):
            rows.append(("kept worker", k + 1, ask(kept, node, q, settings)))
    finally:
        kept.shutdown()
    for k, q in enumerate(QUESTIONS):  # the naive way: a process (and a model load) per click
        fresh = MedReasonerLogic(worker_python=PY, worker_env=ENV)
        try:
            rows.append(("process per click", k + 1, ask(fresh, node, q, settings)))
        finally:
            fresh.shutdown()
    print(f"volume {Path(volume).name}, slices {args.slices}, tiny CRM + LiteMedSAM, CPU")
    print("| mode | Q | wall s | model loads | ASM encodes | embedding cache hits | status |")
    print("|---|---|---|---|---|---|---|")
    for mode, k, r in rows:
        print(f"| {mode} | {k} | {r['wall']:.1f} | {r['loads']} | {r['encodes']} | {r['hits']} | {r['status']} |")
    kept_rows = [r for m, _, r in rows if m == "kept worker"]
    naive_rows = [r for m, _, r in rows if m != "kept worker"]
    q1 = kept_rows[0]["wall"]
    ratios = [r["wall"] / q1 for r in kept_rows[1:]]
    total_kept, total_naive = sum(r["wall"] for r in kept_rows), sum(r["wall"] for r in naive_rows)
    print(f"kept worker: model loads {sum(r['loads'] for r in kept_rows)} (naive {sum(r['loads'] for r in naive_rows)});"
          f" Q2/Q1 = {ratios[0]:.2f}, Q3/Q1 = {ratios[1]:.2f} (target <= 0.33: "
          f"{'met' if max(ratios) <= 1 / 3 else 'MISSED'}); three questions {total_kept:.1f} s vs "
          f"{total_naive:.1f} s a process per click = {total_kept / total_naive:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
