"""How long a kill can leave a file behind while a volume's output set is written.

The naive way (this project's earlier writer) creates the staging folder first and encodes and writes
each file into it by name: a kill at any moment of that leaves named files in ``OUT/.medreasoner/``.
The project's way (``output_sets.commit``) encodes in memory and writes files without names; names
exist only from the staging folder's ``mkdir`` to the end of the swap. Both write the same set (a
real-sized mask on the MNI152 2 mm grid: seg.nii.gz, seg.seg.nrrd, montage.png, result.json) into the
same case folder, alternating, ``--repeats`` times each.

    .venv/bin/python benchmarks/output_commit.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import SimpleITK as sitk

    from medreasoner.engine import output_sets
    from medreasoner.io.files import (
        anonymous_file,
        atomic_write_bytes,
        json_bytes,
        link_file,
        png_bytes,
        write_fd,
    )
    from medreasoner.io.segmentation import segmentation_bytes

    arr = np.zeros((91, 109, 91), np.uint8)
    arr[30:60, 40:70, 30:60] = 1
    mask = sitk.GetImageFromArray(arr)
    mask.SetSpacing((2.0, 2.0, 2.0))
    montage = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    record = {"schema_version": "1", "input": {"path": "/data/t1.nii.gz"}, "status": "ok"}

    def encode() -> dict[str, bytes]:
        return {"seg.nii.gz": segmentation_bytes(mask, ".nii.gz"), "seg.seg.nrrd": segmentation_bytes(mask, ".seg.nrrd"),
                "montage.png": png_bytes(montage), "result.json": json_bytes(record)}

    def naive(case: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        staging = output_sets.staging_dir(case)  # named from here on
        for name, data in encode().items():
            atomic_write_bytes(staging / name, data)
        output_sets.swap_into_place(staging, case)
        t = time.perf_counter() - t0
        return t, t

    def project(case: Path) -> tuple[float, float]:
        t0 = time.perf_counter()
        files = encode()
        fds = {}
        for name, data in files.items():
            fds[name] = anonymous_file(case.parent)
            write_fd(fds[name], data)
        t1 = time.perf_counter()  # named from here on: the same steps as output_sets.commit
        staging = output_sets.staging_dir(case)
        for name, fd in fds.items():
            link_file(fd, staging / name)
        output_sets.swap_into_place(staging, case)
        t2 = time.perf_counter()
        for fd in fds.values():
            os.close(fd)
        return t2 - t0, t2 - t1

    with tempfile.TemporaryDirectory() as d:
        case = Path(d) / "out" / "t1"
        if anonymous_file(Path(d)) is None:
            raise SystemExit("this file system has no O_TMPFILE: the project falls back to the naive way here")
        rows = {"naive (named staging)": [], "project (commit)": []}
        for _ in range(args.repeats):
            rows["naive (named staging)"].append(naive(case))
            rows["project (commit)"].append(project(case))
    print(f"| way | write ms (median) | named window ms (median) | named window ms (max) |  ({args.repeats} each)")
    print("|---|---|---|---|")
    med = {}
    for way, vals in rows.items():
        total = statistics.median(v[0] for v in vals) * 1e3
        win = statistics.median(v[1] for v in vals) * 1e3
        med[way] = win
        print(f"| {way} | {total:.2f} | {win:.3f} | {max(v[1] for v in vals) * 1e3:.3f} |")
    ratio = med["project (commit)"] / med["naive (named staging)"]
    print(f"named window, project / naive: {ratio:.4f} (a kill -9 at a random moment of a write leaves a file "
          f"{1 / ratio:.0f}x less often; the next run removes it)")


if __name__ == "__main__":
    main()
