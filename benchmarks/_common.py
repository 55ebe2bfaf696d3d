"""Helpers shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def tiny_crm(work: str | Path, format_steps: int = 150, seed: int = 0, sam2: bool = False) -> Path:
    """The folder ``medreasoner make-tiny`` writes (``crm/``, and ``tiny_sam2.pt`` with ``sam2``),
    built once per (seed, format steps) under ``work`` and reused afterwards."""
    folder = Path(work) / f"tiny_s{seed}_f{format_steps}"
    need_crm = not (folder / "crm" / "config.json").is_file()
    need_sam2 = sam2 and not (folder / "tiny_sam2.pt").is_file()
    if need_crm or need_sam2:
        cmd = [sys.executable, "-m", "medreasoner", "make-tiny", str(folder), "--format-steps", str(format_steps),
               "--seed", str(seed)] + ([] if sam2 else ["--no-sam2"])
        print("building tiny test models:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def machine() -> str:
    """One line: CPUs, torch threads, load average (other jobs on the box skew timings)."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {platform.processor() or platform.machine()}, cpu_count={os.cpu_count()} (usable {usable}), "
            f"torch {torch.__version__} threads={torch.get_num_threads()}, GPU {gpu}, load average {load}")


class Timed:
    """Wrap a loaded model's method (as an instance attribute) and add up the seconds spent in it."""

    def __init__(self, obj, name: str):
        self.obj, self.name, self.seconds, self.calls = obj, name, 0.0, 0
        inner = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, name, wrapper)

    def restore(self) -> None:
        if self.name in vars(self.obj):
            delattr(self.obj, self.name)
