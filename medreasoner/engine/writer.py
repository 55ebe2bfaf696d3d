"""Writing results, separate from running them: one naming policy and one layout for every front end.

Layout (CLI and MONAI bundle alike): ``OUT/<stem>/`` per case, where ``<stem>`` is the input's
file name without its image suffix, made unique within the run (``a``, ``a_2``, ...):

- 2D image: ``mask.png`` (0/255), ``overlay.png``, ``result.json``
- 3D volume: ``seg.nii.gz`` (uint8 labelmap on the input grid), ``seg.seg.nrrd`` (3D Slicer
  segmentation named after the question), ``montage.png``, ``result.json``

``result.json`` is the result record (see ``medreasoner/schemas/result.schema.json``) plus the
paths written, under ``outputs``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import IMAGE_SUFFIXES, TINY_WARNING, VOLUME_SUFFIXES
from medreasoner.engine.results import ImageResult, VolumeResult
from medreasoner.io.files import atomic_write_bytes, guard_outputs, json_bytes, png_bytes

IMAGE_FILES = {"mask": "mask.png", "overlay": "overlay.png", "result": "result.json"}
VOLUME_FILES = {"mask_nifti": "seg.nii.gz", "mask_seg_nrrd": "seg.seg.nrrd", "montage": "montage.png",
                "result": "result.json"}


def case_stem(source: Any) -> str:
    """The input's file name without its image suffix, made safe as a folder name."""
    path = getattr(source, "path", source)
    if path is None or not isinstance(path, (str, Path)):
        return "case"
    name = Path(str(path).rstrip("/\\")).name
    for suffix in sorted(VOLUME_SUFFIXES + IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^\w.-]+", "_", name).strip("._")
    return name or "case"


class StemAllocator:
    """Unique case folder names within one run: ``a``, ``a_2``, ``a_3``... never one taken before."""

    def __init__(self, taken: Iterable[str] = ()):
        self._taken = {t.lower() for t in taken}

    def take(self, source: Any) -> str:
        base = case_stem(source)
        stem, k = base, 1
        while stem.lower() in self._taken:
            k += 1
            stem = f"{base}_{k}"
        self._taken.add(stem.lower())
        return stem


def write_result(result: ImageResult | VolumeResult, case_dir: str | Path,
                 inputs: Iterable[str | Path | None] = ()) -> dict[str, str]:
    """Write one result's files into ``case_dir``; returns {kind: path}. Never over an input."""
    out = Path(case_dir)
    ins = [Path(p) for p in inputs if p]
    if isinstance(result, VolumeResult):
        return _write_volume(result, out, ins)
    return _write_image(result, out, ins)


def _write_image(result: ImageResult, out: Path, inputs: list[Path]) -> dict[str, str]:
    from medreasoner.imaging.overlay import draw_overlay

    paths = {k: out / name for k, name in IMAGE_FILES.items()}
    guard_outputs(list(paths.values()), inputs)
    record = result.to_record()
    record["outputs"] = {k: str(v) for k, v in paths.items()}
    banner = TINY_WARNING if TINY_WARNING in result.warnings else ""
    title = f"Q: {result.query}  [{result.status}]" + (f" - {result.message}" if result.message else "")
    rgb = result.rgb if result.rgb is not None else np.zeros((*result.mask.shape, 3), np.uint8)
    overlay = draw_overlay(rgb, result.mask, result.answer.box, result.answer.points, title=title,
                           text=result.answer.think or result.completion, banner=banner)
    files = {paths["mask"]: png_bytes(result.mask.astype(np.uint8) * 255), paths["overlay"]: png_bytes(overlay),
             paths["result"]: json_bytes(record)}  # the record last: it names the other files
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return record["outputs"]


def _write_volume(result: VolumeResult, out: Path, inputs: list[Path]) -> dict[str, str]:
    from medreasoner.io.segmentation import write_segmentation

    paths = {k: out / name for k, name in VOLUME_FILES.items()}
    if result.montage is None:
        paths.pop("montage")
    guard_outputs(list(paths.values()), inputs)
    t0 = time.perf_counter()
    name = result.query[:60]
    write_segmentation(result.mask, paths["mask_nifti"], name=name, inputs=inputs)
    write_segmentation(result.mask, paths["mask_seg_nrrd"], name=name, inputs=inputs)
    if result.montage is not None:
        atomic_write_bytes(paths["montage"], png_bytes(result.montage))
    record = result.to_record()
    record.setdefault("timings_s", {})["write"] = round(time.perf_counter() - t0, 4)
    record["outputs"] = {k: str(v) for k, v in paths.items()}
    atomic_write_bytes(paths["result"], json_bytes(record))
    return record["outputs"]
