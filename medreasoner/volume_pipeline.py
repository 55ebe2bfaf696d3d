"""Reasoning grounding on 3D volumes: slices in radiological display orientation, two strategies.

- ``keyslice`` (default): the CRM reads a few candidate slices spread through the body (or one the
  user names), the most confident answer wins, and the ASM's mask on that slice is carried through
  the volume both ways (SAM2's video memory for SAM2/MedSAM2, box tracking for other ASMs) until
  the object ends. CRM calls per volume do not grow with the number of slices.
- ``slicewise``: CRM + ASM on every non-background slice of a range, batched through both models.

Both keep the largest 3D connected component (optional) and return the mask in exactly the input
geometry. Slices are produced on demand from views of the volume, never copied as a whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreasoner.asm.base import ASM
from medreasoner.crm.base import CRM
from medreasoner.errors import CancelledError, InputError
from medreasoner.pipeline import TINY_WARNING, check_query
from medreasoner.prompts import PromptKind

STRATEGIES = ("keyslice", "slicewise")
ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
BACKGROUND_FRACTION = 0.02  # a slice with less foreground than this is skipped as background


@dataclass
class VolumeResult:
    status: str  # "ok" | "no_target"
    message: str
    mask: Any  # SimpleITK.Image, uint8 0/1, input geometry
    record: dict[str, Any]
    montage: Any = None  # PIL.Image
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class SliceImages:
    """``stack`` slices as windowed RGB uint8 images, made when asked for (a Sequence)."""

    def __init__(self, stack, low: float, high: float, indices: list[int] | None = None):
        from medreasoner.volumes import slice_to_rgb

        self._to_rgb = slice_to_rgb
        self.stack, self.low, self.high = stack, low, high
        self.indices = list(range(len(stack))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._to_rgb(self.stack.raw(self.indices[i]), self.low, self.high)


def parse_slice_range(text: str | tuple[int, int] | None, n: int) -> tuple[int, int]:
    """'a:b' (b exclusive, either side optional) or (a, b) -> checked [a, b) within [0, n)."""
    if text in (None, "", "null"):
        return 0, n
    if isinstance(text, str):
        try:
            a, _, b = text.partition(":")
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else n
        except ValueError as exc:
            raise InputError(f"slice range must look like 'start:stop', got {text!r}") from exc
    else:
        lo, hi = int(text[0]), int(text[1])
    if not (0 <= lo < hi <= n):
        raise InputError(f"slice range {lo}:{hi} is outside the volume's {n} slices (valid: 0 <= start < stop <= {n})")
    return lo, hi


def foreground_fractions(stack, low: float, high: float, indices) -> dict[int, float]:
    """Share of each slice's pixels above the bottom tenth of the display range (body, not air)."""
    thr = low + 0.1 * (high - low)
    out = {}
    for i in indices:
        raw = stack.raw(i)
        out[i] = float(np.count_nonzero(np.nan_to_num(raw, nan=low) > thr)) / raw.size
    return out


def candidate_slices(fractions: dict[int, float], n: int) -> list[int]:
    """n slices evenly spread through the body (the span of non-background slices)."""
    body = [i for i, f in sorted(fractions.items()) if f >= BACKGROUND_FRACTION]
    if not body:
        return []
    lo, hi = body[0], body[-1]
    picks = [round(lo + (hi - lo) * (k + 1) / (n + 1)) for k in range(n)]
    return sorted({min(body, key=lambda b, p=p: abs(b - p)) for p in picks})


def largest_component(masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Keep the largest 26-connected 3D component of a {slice: mask} stack."""
    if not masks:
        return masks
    from scipy import ndimage

    shape = next(iter(masks.values())).shape
    keys = sorted(masks)
    lo, hi = keys[0], keys[-1] + 1
    block = np.zeros((hi - lo, *shape), bool)
    for k, m in masks.items():
        block[k - lo] = m
    labels, count = ndimage.label(block, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return masks
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = labels == int(np.argmax(sizes))
    return {k: keep[k - lo] for k in keys if keep[k - lo].any()}


class VolumeGrounder:
    def __init__(self, crm: CRM, asm: ASM, prompt: PromptKind = "reasoning", batch_size: int = 4):
        self.crm, self.asm, self.prompt, self.batch_size = crm, asm, prompt, max(1, batch_size)

    def run(self, volume, query: str, *, strategy: str = "keyslice", axis: str = "axial", window=None,
            slice_range=None, key_slice: int | None = None, n_candidates: int = 5, keep_largest: bool = True,
            progress: ProgressFn | None = None, cancel=None) -> VolumeResult:
        from medreasoner.volumes import choose_window, display_stack, intensity_range, read_volume

        t_start = time.perf_counter()
        query = check_query(query)
        if strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not 1 <= n_candidates <= 5:
            raise InputError("n_candidates must be between 1 and 5")
        vol = read_volume(volume) if not hasattr(volume, "image") else volume
        stack = display_stack(vol, axis)
        n = len(stack)
        lo_i, hi_i = parse_slice_range(slice_range, n)
        if key_slice is not None and not lo_i <= key_slice < hi_i:
            raise InputError(f"key slice {key_slice} is outside the slice range {lo_i}:{hi_i}")
        win = choose_window(vol, query, window)
        low, high = intensity_range(vol, win)
        images = SliceImages(stack, low, high)
        self._counts = {"crm_calls": 0, "asm_encodes": 0, "propagation_steps": 0}
        self._timings = {"read_and_window": time.perf_counter() - t_start}
        self._cancel, self._progress = cancel, progress
        fractions = foreground_fractions(stack, low, high, range(lo_i, hi_i))
        if strategy == "keyslice":
            masks, per_slice, chosen = self._keyslice(images, fractions, n, key_slice, n_candidates, query)
        else:
            masks, per_slice, chosen = self._slicewise(images, fractions, query)
        if keep_largest and masks:
            t0 = time.perf_counter()
            masks = largest_component(masks)
            self._timings["largest_component"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask_image = stack.to_volume_mask(masks)
        self._timings["assemble"] = time.perf_counter() - t0
        status = "ok" if masks else "no_target"
        message = "" if masks else self._no_target_reason(per_slice)
        warnings = list(getattr(vol, "warnings", []))
        if self.crm.is_tiny or self.asm.is_tiny:
            warnings.insert(0, TINY_WARNING)
        self._timings["total"] = time.perf_counter() - t_start
        record = {
            "query": query, "status": status, "message": message, "warnings": warnings,
            "strategy": strategy, "axis": axis, "prompt": self.prompt,
            "window": {"name_or_value": window if isinstance(window, (str, type(None))) else list(window),
                       "low": low, "high": high, "chosen": None if win is None else [win.center, win.width]},
            "slice_range": [lo_i, hi_i], "num_slices": n, "modality": vol.modality,
            "key_slice": chosen, "key_slice_volume_index": None if chosen is None else stack.index_in_volume(chosen),
            "slices": per_slice, "segmented_slices": sorted(int(k) for k in masks),
            "voxels": int(sum(int(m.sum()) for m in masks.values())),
            "counts": dict(self._counts), "timings_s": {k: round(v, 4) for k, v in self._timings.items()},
            "crm": self.crm.describe(), "asm": self.asm.describe(),
            "input": {"path": vol.path, "size": list(vol.image.GetSize()), "spacing": list(vol.image.GetSpacing()),
                      "origin": list(vol.image.GetOrigin()), "direction": list(vol.image.GetDirection())},
        }
        montage = self._montage(images, masks, per_slice, chosen, query, status, warnings)
        return VolumeResult(status, message, mask_image, record, montage, warnings)

    # -- strategies --------------------------------------------------------------------------------
    def _check_cancel(self, where: str) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise CancelledError(f"cancelled during {where}")

    def _ask(self, images: SliceImages, indices: list[int], query: str, stage: str) -> list[dict]:
        """CRM on the given slices (batched), then the ASM where the CRM answered a box."""
        from tqdm import tqdm

        out = []
        bar = tqdm(total=len(indices), desc=stage, unit="slice", leave=False, disable=self._progress is not None)
        for s in range(0, len(indices), self.batch_size):
            self._check_cancel(stage)
            chunk = indices[s:s + self.batch_size]
            frames = [images[i] for i in chunk]
            t0 = time.perf_counter()
            answers = self.crm.answer_batch(frames, [query] * len(chunk), self.prompt)
            self._timings["crm"] = self._timings.get("crm", 0.0) + time.perf_counter() - t0
            self._counts["crm_calls"] += len(chunk)
            todo = [k for k, a in enumerate(answers) if a.answer.box is not None]
            segs = {}
            if todo:
                t0 = time.perf_counter()
                res = self.asm.segment_batch([frames[k] for k in todo], [answers[k].answer.box for k in todo],
                                             [answers[k].answer.points for k in todo])
                self._timings["asm"] = self._timings.get("asm", 0.0) + time.perf_counter() - t0
                self._counts["asm_encodes"] += len(todo)
                segs = dict(zip(todo, res))
            for k, (i, a) in enumerate(zip(chunk, answers)):
                seg = segs.get(k)
                out.append({"slice": int(i), "answer": a, "mask": seg.mask if seg else None,
                            "asm_score": seg.score if seg else None})
            bar.update(len(chunk))
            if self._progress is not None:
                self._progress(stage, len(out), len(indices))
        bar.close()
        return out

    @staticmethod
    def _report(item: dict) -> dict:
        a = item["answer"]
        return {"slice": item["slice"], "status": a.answer.status.value, "reasoning": a.answer.think,
                "box": list(a.answer.box) if a.answer.box else None,
                "points": [list(p) for p in a.answer.points] if a.answer.points else None,
                "crm_confidence": a.confidence, "asm_score": item["asm_score"],
                "mask_pixels": int(item["mask"].sum()) if item["mask"] is not None else 0,
                "message": a.answer.message, "completion": a.text}

    @staticmethod
    def _confidence(item: dict) -> float:
        """Key-slice choice: CRM sequence probability x the ASM's own mask-quality estimate."""
        if item["mask"] is None or not item["mask"].any():
            return -1.0
        crm = item["answer"].confidence if item["answer"].confidence is not None else 1.0
        return crm * max(float(item["asm_score"] or 0.0), 1e-6)

    def _keyslice(self, images, fractions, n, key_slice, n_candidates, query):
        cands = [key_slice] if key_slice is not None else candidate_slices(fractions, n_candidates)
        if not cands:
            return {}, [], None
        asked = self._ask(images, cands, query, "key slices")
        per_slice = [self._report(it) for it in asked]
        best = max(asked, key=self._confidence)
        if self._confidence(best) < 0:
            return {}, per_slice, None
        key = best["slice"]
        for rep in per_slice:
            rep["chosen"] = rep["slice"] == key
        t0 = time.perf_counter()
        lo, hi = min(fractions), max(fractions) + 1  # propagate inside the slice range only
        window = SliceImages(images.stack, images.low, images.high, list(range(lo, hi)))
        done = [0]

        def on_step(count):
            done[0] = count
            if self._progress is not None:
                self._progress("propagate", count, hi - lo)

        local = self.asm.propagate(window, key - lo, best["mask"], cancel=self._cancel, progress=on_step)
        self._timings["propagation"] = time.perf_counter() - t0
        self._counts["propagation_steps"] = max(0, len(local) - 1)
        return {lo + k: m for k, m in local.items()}, per_slice, key

    def _slicewise(self, images, fractions, query):
        todo = [i for i, f in sorted(fractions.items()) if f >= BACKGROUND_FRACTION]
        asked = self._ask(images, todo, query, "slices")
        masks = {it["slice"]: it["mask"] for it in asked if it["mask"] is not None and it["mask"].any()}
        return masks, [self._report(it) for it in asked], None

    @staticmethod
    def _no_target_reason(per_slice: list[dict]) -> str:
        if not per_slice:
            return "no slice has body content to ask the CRM about (empty or background-only range)"
        kinds = sorted({p["status"] for p in per_slice})
        return (f"the CRM gave no usable box on any of the {len(per_slice)} slices it read "
                f"(answer status: {', '.join(kinds)}); an empty mask was written")

    # -- pictures ----------------------------------------------------------------------------------
    def _montage(self, images, masks, per_slice, chosen, query, status, warnings, size: int = 256):
        from PIL import Image

        from medreasoner.overlay import draw_overlay

        tiles = []
        shown = [p["slice"] for p in per_slice][:5]
        if masks:
            seg = sorted(masks)
            extra = [seg[round(k * (len(seg) - 1) / 3)] for k in range(4)] if len(seg) > 1 else seg
            shown += [s for s in extra if s not in shown]
        info = {p["slice"]: p for p in per_slice}
        banner = TINY_WARNING if TINY_WARNING in warnings else ""
        for s in shown[:9]:
            p = info.get(s, {})
            kind = "key slice (chosen)" if s == chosen else ("asked" if s in info else "propagated")
            tile = draw_overlay(images[s], masks.get(s), p.get("box"), p.get("points"),
                                title=f"slice {s}: {kind}", text=(p.get("reasoning") or "")[:400], banner=banner)
            tiles.append(tile.resize((size * tile.width // tile.height, size)))
        if not tiles:
            return None
        cols = min(3, len(tiles))
        w = max(t.width for t in tiles)
        rows = (len(tiles) + cols - 1) // cols
        grid = Image.new("RGB", (w * cols, size * rows + 24), (0, 0, 0))
        from PIL import ImageDraw

        ImageDraw.Draw(grid).text((6, 4), f"{query}  [{status}]", fill=(255, 255, 255))
        for k, t in enumerate(tiles):
            grid.paste(t, ((k % cols) * w, 24 + (k // cols) * size))
        return grid


def write_volume_outputs(result: VolumeResult, out_dir, stem: str = "seg", inputs=()) -> dict[str, str]:
    """Write ``<stem>.nii.gz``, ``<stem>.seg.nrrd``, ``<stem>.json`` and ``<stem>_montage.png``."""
    from pathlib import Path

    from medreasoner.outputs import atomic_write_bytes, guard_outputs, json_bytes, png_bytes
    from medreasoner.volumes import write_segmentation

    out = Path(out_dir)
    paths = {"mask_nifti": out / f"{stem}.nii.gz", "mask_seg_nrrd": out / f"{stem}.seg.nrrd",
             "result": out / f"{stem}.json", "montage": out / f"{stem}_montage.png"}
    guard_outputs(list(paths.values()), [Path(p) for p in inputs])
    t0 = time.perf_counter()
    name = result.record.get("query", "target")[:60]
    write_segmentation(result.mask, paths["mask_nifti"], name=name, inputs=inputs)
    write_segmentation(result.mask, paths["mask_seg_nrrd"], name=name, inputs=inputs)
    if result.montage is not None:
        atomic_write_bytes(paths["montage"], png_bytes(result.montage))
    else:
        paths.pop("montage")
    result.record.setdefault("timings_s", {})["write"] = round(time.perf_counter() - t0, 4)
    result.record["outputs"] = {k: str(v) for k, v in paths.items()}
    atomic_write_bytes(paths["result"], json_bytes(result.record))
    return {k: str(v) for k, v in paths.items()}
