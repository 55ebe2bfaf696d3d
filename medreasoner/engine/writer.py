"""Writing results, separate from running them: one naming policy and one layout for every front end.

Layout (CLI and MONAI bundle alike): ``OUT/<stem>/`` per case, where ``<stem>`` is the input's
file name without its image suffix, made unique within the run (``a``, ``a_2``, ...):

- 2D image: ``mask.png`` (0/255), ``overlay.png``, ``result.json``
- 3D volume: ``seg.nii.gz`` (uint8 labelmap on the input grid), ``seg.seg.nrrd`` (3D Slicer
  segmentation named after the question), ``montage.png``, ``result.json``

``result.json`` is the result record (see ``medreasoner/schemas/result.schema.json``) plus the
paths written, under ``outputs``.

A case folder is one unit (:mod:`medreasoner.engine.output_sets`): its files are encoded in memory,
written without names, and swapped into place complete, so an interruption at any moment leaves
the complete old set or the complete new set. A folder is replaced only when this
tool wrote it for the same input (``result.json`` says which), or when asked (``overwrite``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import IMAGE_SUFFIXES, TINY_WARNING, VOLUME_SUFFIXES
from medreasoner.engine import output_sets
from medreasoner.engine.results import ImageResult, VolumeResult
from medreasoner.io.files import guard_outputs, json_bytes, png_bytes

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
    """Unique case folder names: ``a``, ``a_2``, ``a_3``... never one taken earlier in this run, and, when
    ``root`` is given, never a folder that holds another input's results or that another live run is
    writing (claims are lock files in the work area, released by ``release()`` or at process exit)."""

    def __init__(self, taken: Iterable[str] = (), root: str | Path | None = None):
        self._taken = {t.lower() for t in taken}
        self.root = Path(root) if root is not None else None
        self._claims: list[Path] = []
        if self.root is not None:
            output_sets.recover(self.root)

    def take(self, source: Any) -> str:
        base = case_stem(source)
        stem, k = base, 1
        while stem.lower() in self._taken or not self._claim(stem, source):
            k += 1
            stem = f"{base}_{k}"
        self._taken.add(stem.lower())
        return stem

    def _claim(self, stem: str, source: Any) -> bool:
        if self.root is None:
            return True
        path = getattr(source, "path", source)
        owner = output_sets.owner(self.root / stem)
        if owner not in (None, output_sets.NOT_OURS) and not output_sets.same_input(owner, path):
            return False  # our results for another input: never replaced by a name collision
        lock = output_sets.claim(self.root, stem, path)
        if lock is None:
            return False
        self._claims.append(lock)
        return True

    def release(self) -> None:
        for lock in self._claims:
            output_sets.release(lock)
        self._claims.clear()


def write_result(result: ImageResult | VolumeResult, case_dir: str | Path,
                 inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> dict[str, str]:
    """Write one result's files as one unit into ``case_dir``; returns {kind: path}.

    Never over an input, never over a folder this tool did not write for this input (unless ``overwrite``).
    Every file is encoded before the first byte reaches the output folder."""
    out = Path(case_dir)
    ins = [Path(p) for p in inputs if p]
    source = next(iter(ins), None)
    output_sets.check_replaceable(out, source, ins, overwrite)
    if isinstance(result, VolumeResult):
        files, outputs = _volume_files(result, ins, final=out)
    else:
        files, outputs = _image_files(result, ins, final=out)
    output_sets.commit(out, files)
    return outputs


def _image_files(result: ImageResult, inputs: list[Path], final: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """The case folder's files ({name: bytes}) and where they will be (the record names them)."""
    from medreasoner.imaging.overlay import draw_overlay

    guard_outputs([final / name for name in IMAGE_FILES.values()], inputs)
    record = result.to_record()
    record["outputs"] = {k: str(final / name) for k, name in IMAGE_FILES.items()}
    banner = TINY_WARNING if TINY_WARNING in result.warnings else ""
    title = f"Q: {result.query}  [{result.status}]" + (f" - {result.message}" if result.message else "")
    rgb = result.rgb if result.rgb is not None else np.zeros((*result.mask.shape, 3), np.uint8)
    overlay = draw_overlay(rgb, result.mask, result.answer.box, result.answer.points, title=title,
                           text=result.answer.think or result.completion, banner=banner)
    files = {IMAGE_FILES["mask"]: png_bytes(result.mask.astype(np.uint8) * 255),
             IMAGE_FILES["overlay"]: png_bytes(overlay), IMAGE_FILES["result"]: json_bytes(record)}
    return files, record["outputs"]


def _volume_files(result: VolumeResult, inputs: list[Path], final: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    from medreasoner.io.segmentation import segmentation_bytes

    names = dict(VOLUME_FILES)
    if result.montage is None:
        names.pop("montage")
    guard_outputs([final / name for name in names.values()], inputs)
    t0 = time.perf_counter()
    label = result.query[:60]
    repairs = ((result.record.get("input") or {}).get("metadata") or {}).get("repairs") or []
    known = not any("orientation unknown" in r for r in repairs)  # never claim one the input did not have
    files = {names["mask_nifti"]: segmentation_bytes(result.mask, ".nii.gz", name=label, orientation_known=known),
             names["mask_seg_nrrd"]: segmentation_bytes(result.mask, ".seg.nrrd", name=label)}
    if result.montage is not None:
        files[names["montage"]] = png_bytes(result.montage)
    record = result.to_record()
    record.setdefault("timings_s", {})["write"] = round(time.perf_counter() - t0, 4)
    record["outputs"] = {k: str(final / name) for k, name in names.items()}
    files[names["result"]] = json_bytes(record)
    return files, record["outputs"]
