"""The session: models loaded once, questions answered in memory, caches kept between questions.

    from medreasoner.engine import ModelOptions, RunOptions, Session, load_models

    session = Session(load_models(ModelOptions(crm="path/to/crm", asm="litemedsam")))
    result = session.ground_volume("ct.nii.gz", "Which organ stores bile?", RunOptions(axis="axial"))
    result.mask  # SimpleITK image on exactly the input grid

Every front end (CLI, MONAI bundle, MONAI Label app, Slicer worker, evaluate, training rewards) is
an adapter over this class. A session holds no per-run state: one session (or several sharing one
``Models``) may serve several threads at once; the models' own locks make calls take turns batch by
batch. Asking a second question about the same volume reuses the decoded volume, its windowed
slices and the ASM image embeddings of slices already encoded (bounded LRU caches).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import RESULT_SCHEMA_VERSION, TINY_WARNING, Status
from medreasoner.engine import strategies as strat
from medreasoner.engine.cache import LRUCache, array_digest, file_key, image_key
from medreasoner.engine.events import NO_EVENTS, Events, Stage
from medreasoner.engine.results import COORDINATES_3D, ImageResult, VolumeResult
from medreasoner.errors import InputError
from medreasoner.imaging.display import AXES
from medreasoner.models.answer import AnswerStatus
from medreasoner.models.loading import Models
from medreasoner.models.prompts import prompt_record

PROMPTS = ("reasoning", "direct")


def check_query(query: Any) -> str:
    if query is not None and not isinstance(query, str):
        raise InputError(f"the query must be text (a question about the image), got {type(query).__name__}")
    if not query or not query.strip():
        raise InputError("the query is empty; type a question about the image")
    return query.strip()


@dataclass
class RunOptions:
    """How one question is run (2D images use ``prompt`` and ``window`` only)."""

    prompt: str = "reasoning"  # reasoning | direct
    window: Any = None  # CT preset name, "center,width", (center, width), or None (automatic)
    strategy: str = "keyslice"  # keyslice | slicewise
    axis: str = "axial"  # axial | coronal | sagittal
    slice_range: Any = None  # "start:stop" (stop exclusive) or None for all
    key_slice: int | None = None  # keyslice: ask the CRM about this display slice only
    key_point: Any = None  # keyslice: (x, y, z) LPS mm; the slice holding it is the key slice (viewers)
    n_candidates: int = 5  # keyslice: candidate slices the CRM reads
    keep_largest: bool = True  # keep the largest 3D connected component

    def checked(self) -> RunOptions:
        """Validate everything that does not need the image; returns self."""
        from medreasoner.imaging.intensity import parse_window

        if self.prompt not in PROMPTS:
            raise InputError(f"unknown prompt {self.prompt!r}; choose one of {', '.join(PROMPTS)}")
        if self.strategy not in strat.STRATEGIES:
            raise InputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(strat.STRATEGIES)}")
        if str(self.axis).strip().lower() not in AXES:
            raise InputError(f"unknown axis {self.axis!r}; choose one of {', '.join(AXES)}")
        self.axis = str(self.axis).strip().lower()
        try:  # request messages and form fields may carry it as a string
            self.n_candidates = int(self.n_candidates)
        except (TypeError, ValueError) as exc:
            raise InputError(f"n_candidates must be a whole number, got {self.n_candidates!r}") from exc
        if isinstance(self.n_candidates, bool) or not 1 <= self.n_candidates <= strat.MAX_CANDIDATES:
            raise InputError(f"n_candidates must be between 1 and {strat.MAX_CANDIDATES}")
        if self.key_slice is not None:
            try:
                self.key_slice = int(self.key_slice)
            except (TypeError, ValueError) as exc:
                raise InputError(f"key slice must be a slice number, got {self.key_slice!r}") from exc
            if self.key_slice < 0:
                raise InputError(f"key slice must be 0 or more, got {self.key_slice}")
        if self.strategy == "slicewise" and (self.key_slice is not None or self.key_point is not None):
            # it would be silently ignored: every slice is asked about
            raise InputError("a key slice only applies to the keyslice strategy (slicewise asks the CRM about "
                             "every slice); drop one of them")
        if self.key_point is not None:
            if self.key_slice is not None:
                raise InputError("give a key slice or a key point, not both")
            try:
                point = [float(v) for v in self.key_point]
            except (TypeError, ValueError) as exc:
                raise InputError(f"key point must be three numbers (LPS mm), got {self.key_point!r}") from exc
            if len(point) != 3 or not all(np.isfinite(point)):
                raise InputError(f"key point must be three finite numbers (LPS mm), got {self.key_point!r}")
            self.key_point = point
        if self.window is not None and self.window != "":
            parse_window(self.window)
        else:
            self.window = None
        strat.slice_bounds(self.slice_range)  # its syntax now; the bounds once the volume is read
        return self

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RunOptions:
        """Options from a dict (request messages); unknown keys are an error."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown run option(s): {', '.join(unknown)}")
        return cls(**values).checked()


class _Run:
    """What one call counts and times (never stored on the session)."""

    def __init__(self, events: Events | None):
        self.events = events or NO_EVENTS
        self.counts = {"crm_calls": 0, "asm_encodes": 0, "asm_decodes": 0, "embedding_cache_hits": 0,
                       "slice_cache_hits": 0, "volume_cache_hits": 0, "propagation_steps": 0}
        self.timings: dict[str, float] = {}

    def add_time(self, name: str, since: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - since


@dataclass
class _Prepared:
    """A read volume and its display stacks, shared by the questions asked about it."""

    key: Hashable
    volume: Any  # medreasoner.io.volumes.Volume
    stacks: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stack(self, axis: str):
        from medreasoner.imaging.display import display_stack

        with self.lock:
            if axis not in self.stacks:
                self.stacks[axis] = display_stack(self.volume, axis)
            return self.stacks[axis]


class _SliceFrames:
    """A volume's slices as RGB uint8 (a Sequence), windowed on demand through the session's cache."""

    def __init__(self, session: Session, prepared: _Prepared, axis: str, low: float, high: float, run: _Run,
                 indices: Sequence[int] | None = None):
        self.session, self.prepared, self.axis, self.low, self.high, self.run = session, prepared, axis, low, high, run
        self.stack = prepared.stack(axis)
        self.indices = list(range(len(self.stack))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        from medreasoner.imaging.windowing import slice_to_rgb

        key = (self.prepared.key, self.axis, self.low, self.high, self.indices[i])
        rgb = self.session._slices.get(key)
        if rgb is None:
            rgb = slice_to_rgb(self.stack.raw(self.indices[i]), self.low, self.high)
            self.session._slices.put(key, rgb)
        else:
            self.run.counts["slice_cache_hits"] += 1
        return rgb

    def sub(self, indices: Sequence[int]) -> _SliceFrames:
        return _SliceFrames(self.session, self.prepared, self.axis, self.low, self.high, self.run,
                            [self.indices[i] for i in indices])


class Session:
    """Models loaded once; 2D images and 3D volumes grounded in memory; nothing written."""

    def __init__(self, models: Models, *, embedding_cache_mb: float = 1024, slice_cache_mb: float = 256,
                 max_volumes: int = 2):
        self.models = models
        mb = 1 << 20
        self._embeddings: LRUCache = LRUCache(int(embedding_cache_mb * mb),
                                              sizeof=lambda e: models.asm.embedding_nbytes(e))
        self._slices: LRUCache = LRUCache(int(slice_cache_mb * mb))
        self._volumes: LRUCache = LRUCache(1 << 62, max_items=max(1, int(max_volumes)), sizeof=lambda _: 0)
        self._prepare_lock = threading.Lock()

    # -- inputs ----------------------------------------------------------------------------------
    def read_image(self, image: Any, window: Any = None):
        return read_image(image, window)

    def _prepare(self, volume: Any, run: _Run) -> _Prepared:
        import SimpleITK as sitk

        from medreasoner.io.volumes import Volume, read_volume, volume_from_image

        if isinstance(volume, (str, Path)):
            if not Path(volume).exists():
                raise InputError(f"volume not found: {volume}")
            key = file_key(volume)
        elif isinstance(volume, Volume):
            key = image_key(volume.image)
        elif isinstance(volume, sitk.Image):
            key = image_key(volume)
        else:
            raise InputError(f"a volume must be a path or a SimpleITK image, got {type(volume).__name__}")
        with self._prepare_lock:
            prepared = self._volumes.get(key)
            if prepared is not None:
                run.counts["volume_cache_hits"] += 1
                return prepared
            if isinstance(volume, (str, Path)):
                vol = read_volume(volume)
            elif isinstance(volume, Volume):
                vol = volume
            else:
                vol = volume_from_image(volume)
            prepared = _Prepared(key, vol)
            self._volumes.put(key, prepared)
            return prepared

    # -- model calls -----------------------------------------------------------------------------
    def _answer(self, frames: list[np.ndarray], queries: list[str], prompt: str, run: _Run):
        t0 = time.perf_counter()
        with self.models.crm_lock:
            answers = self.models.crm.answer_batch(frames, queries, prompt)
        run.add_time("crm", t0)
        run.counts["crm_calls"] += len(frames)
        return answers

    def _segment(self, frames: Sequence[np.ndarray], boxes, points, run: _Run):
        """ASM masks, encoding only the images whose embedding is not cached yet. Embeddings are keyed
        by the pixels the ASM sees, so a volume given as a file and as an in-memory image, or the
        same slice reached by two questions, shares them. The cache is read under the ASM lock: two
        requests racing for the same slices then encode them once, not twice."""
        asm = self.models.asm
        keys = [("rgb", array_digest(f)) for f in frames]
        with self.models.asm_lock:
            embeddings = [self._embeddings.get(k) for k in keys]
            missing = [i for i, e in enumerate(embeddings) if e is None]
            run.counts["embedding_cache_hits"] += len(keys) - len(missing)
            if missing:
                t0 = time.perf_counter()
                new = asm.encode([frames[i] for i in missing])
                run.add_time("asm_encode", t0)
                run.counts["asm_encodes"] += len(missing)
                for i, emb in zip(missing, new):
                    embeddings[i] = emb
                    self._embeddings.put(keys[i], emb)
            t0 = time.perf_counter()
            out = [asm.decode(e, b, p) for e, b, p in zip(embeddings, boxes, points)]
        run.add_time("asm_decode", t0)
        run.counts["asm_decodes"] += len(out)
        return out

    def _ask(self, frames, queries, prompt, run: _Run, stage: Stage, batch: int):
        """CRM on ``frames`` in batches, then the ASM wherever the CRM answered a box."""
        out: list[tuple[Any, Any]] = []
        total = len(frames)
        for s in range(0, total, batch):
            run.events.check_cancelled(str(stage))
            chunk = [frames[i] for i in range(s, min(total, s + batch))]
            answers = self._answer(chunk, list(queries[s:s + batch]), prompt, run)
            todo = [k for k, a in enumerate(answers) if a.answer.box is not None]
            segs = dict(zip(todo, self._segment([chunk[k] for k in todo], [answers[k].answer.box for k in todo],
                                                [answers[k].answer.points for k in todo], run))) if todo else {}
            out.extend((a, segs.get(k)) for k, a in enumerate(answers))
            run.events.progress(stage, len(out), total)
        return out

    def _warnings(self) -> list[str]:
        return [TINY_WARNING] if self.models.is_tiny else []

    # -- 2D --------------------------------------------------------------------------------------
    def ground_image(self, image: Any, query: str, options: RunOptions | None = None,
                     events: Events | None = None) -> ImageResult:
        """Ground one question on one 2D image (path, ``Image2D`` or array)."""
        return self.ground_images([image], [query], options, events)[0]

    def ground_images(self, images: Sequence[Any], queries: Sequence[str], options: RunOptions | None = None,
                      events: Events | None = None) -> list[ImageResult]:
        """Ground each (image, question) pair, batched through the CRM. Inputs are checked first."""
        options = (options or RunOptions()).checked()
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries")
        queries = [check_query(q) for q in queries]
        loaded = [self.read_image(im, options.window) for im in images]
        run = _Run(events)
        frames = [im.rgb for im in loaded]
        asked = self._ask(frames, queries, options.prompt, run, Stage.GROUND,
                          max(1, int(getattr(self.models.crm, "batch_size", 4))))
        crm_desc, asm_desc = self.models.crm.describe(), self.models.asm.describe()
        prompt = prompt_record(self.models.crm, options.prompt)  # what the CRM asked with, and its sha256
        results = []
        for im, q, (a, seg) in zip(loaded, queries, asked):
            h, w = im.rgb.shape[:2]
            warnings = self._warnings() + list(getattr(im, "warnings", []))  # the reader's (NaN pixels, ...)
            if a.answer.repairs:
                warnings.append("answer repaired: " + "; ".join(a.answer.repairs))
            if seg is not None:
                status, message, mask = Status.OK, "", seg.mask
                if a.answer.status is not AnswerStatus.OK:
                    message = f"segmented from the box alone: {a.answer.message}"
            else:
                status, mask = Status.NO_TARGET, np.zeros((h, w), bool)
                message = f"the CRM gave no usable box ({a.answer.status.value}: {a.answer.message})"
            results.append(ImageResult(
                query=q, status=status, answer=a.answer, mask=mask, mask_score=seg.score if seg else None,
                completion=a.text, image_size=(w, h), model_input_size=(a.resize.model_w, a.resize.model_h),
                crm=crm_desc, asm=asm_desc, prompt=prompt["prompt"], prompt_sha256=prompt["prompt_sha256"],
                prompt_source=prompt["prompt_source"], asm_prompt=seg.prompt if seg else None,
                message=message, timings={"crm": a.seconds, **(seg.timings if seg else {})}, warnings=warnings,
                input={"path": im.path, "intensity": im.intensity, "metadata": im.metadata},
                counts=dict(run.counts), rgb=im.rgb,
            ))
        return results

    def segment_image(self, image: Any, box, points=None):
        """The ASM's mask for given prompts (no CRM): a box (+ key points) on a 2D image. Prompts on
        the same image reuse its cached embedding (GRPO scores many completions per image)."""
        rgb = read_image(image).rgb
        run = _Run(None)
        return self._segment([rgb], [tuple(box)], [points], run)[0]

    # -- 3D --------------------------------------------------------------------------------------
    def ground_volume(self, volume: Any, query: str, options: RunOptions | None = None,
                      events: Events | None = None) -> VolumeResult:
        """Ground one question on a 3D volume (a path, a ``SimpleITK.Image`` or a ``Volume``)."""
        from medreasoner.imaging.windowing import check_volume_window, choose_window, intensity_range

        t_start = time.perf_counter()
        options = (options or RunOptions()).checked()
        query = check_query(query)
        run = _Run(events)
        prepared = self._prepare(volume, run)
        vol = prepared.volume
        stack = prepared.stack(options.axis)
        if options.key_point is not None:  # a viewer's slice, as a point: the same slice in our display order
            options = dataclasses.replace(options, key_slice=stack.slice_at(options.key_point), key_point=None)
        n = len(stack)
        lo_i, hi_i = slice_bounds(n, options)
        key_slice = options.key_slice
        win = choose_window(vol, query, options.window)
        window_warnings = []
        if win is not None:
            try:
                check_volume_window(vol, win)  # one grey everywhere: nothing for the CRM to read
            except InputError:
                if options.window is not None:
                    raise  # the user's window: say so
                window_warnings.append(f"the CT window {win.center:g},{win.width:g} chosen from the question shows "
                                       "nothing of this volume (one grey level); 0.5-99.5 percentiles used instead")
                win = None
        low, high = intensity_range(vol, win)
        frames = _SliceFrames(self, prepared, options.axis, low, high, run)
        fractions = strat.foreground_fractions(stack.raw, low, high, range(lo_i, hi_i))
        run.add_time("read_and_window", t_start)
        batch = max(1, int(getattr(self.models.crm, "batch_size", 4)))

        def ask(indices: list[int], stage: Stage) -> list[dict]:
            pairs = self._ask(frames.sub(indices), [query] * len(indices), options.prompt, run, stage, batch)
            return [{"slice": int(i), "answer": a, "mask": seg.mask if seg else None,
                     "asm_score": seg.score if seg else None} for i, (a, seg) in zip(indices, pairs)]

        chosen = None
        if options.strategy == "keyslice":
            cands = [key_slice] if key_slice is not None else strat.candidate_slices(fractions, options.n_candidates)
            asked = ask(cands, Stage.KEY_SLICES) if cands else []
            masks: dict[int, np.ndarray] = {}
            if asked:
                best = max(asked, key=lambda it: strat.key_confidence(it["answer"].confidence, it["asm_score"],
                                                                      it["mask"]))
                if strat.key_confidence(best["answer"].confidence, best["asm_score"], best["mask"]) >= 0:
                    chosen = best["slice"]
                    masks = self._propagate(frames, lo_i, hi_i, chosen, best["mask"], run)
        else:
            asked = ask(strat.body_slices(fractions), Stage.SLICES)
            masks = {it["slice"]: it["mask"] for it in asked if it["mask"] is not None and it["mask"].any()}
        if options.keep_largest and masks:
            t0 = time.perf_counter()
            masks = strat.largest_component(masks)
            run.add_time("largest_component", t0)
        t0 = time.perf_counter()
        mask_image = stack.to_volume_mask(masks)
        run.add_time("assemble", t0)
        status = Status.OK if masks else Status.NO_TARGET
        per_slice = [self._slice_report(it, chosen) for it in asked]
        message = "" if masks else strat.no_target_reason(per_slice)
        warnings = self._warnings() + list(vol.warnings) + window_warnings
        key_report = next((p for p in per_slice if p["slice"] == chosen), None)
        record = {
            "schema_version": RESULT_SCHEMA_VERSION, "kind": "volume",
            "query": query, "status": status, "message": message, "warnings": warnings,
            "reasoning": key_report["reasoning"] if key_report else None,
            "box": key_report["box"] if key_report else None,
            "points": key_report["points"] if key_report else None,
            "key_slice": chosen,
            "key_slice_volume_index": None if chosen is None else stack.index_in_volume(chosen),
            **self._physical(stack, chosen, key_report),
            "strategy": options.strategy, "axis": options.axis, **prompt_record(self.models.crm, options.prompt),
            "window": {"requested": _jsonable(options.window), "low": low, "high": high,
                       "chosen": None if win is None else [win.center, win.width],
                       "policy": "user" if options.window is not None else ("query keywords (CT)" if win else
                                                                            "0.5-99.5 percentiles")},
            "slice_range": [lo_i, hi_i], "num_slices": n, "modality": vol.modality,
            "slices": per_slice, "segmented_slices": sorted(int(k) for k in masks),
            "voxels": int(sum(int(m.sum()) for m in masks.values())),
            "counts": dict(run.counts), "timings_s": {},
            "crm": self.models.crm.describe(), "asm": self.models.asm.describe(),
            "input": {"path": vol.path, "size": list(vol.image.GetSize()), "spacing": list(vol.image.GetSpacing()),
                      "origin": list(vol.image.GetOrigin()), "direction": list(vol.image.GetDirection()),
                      "metadata": vol.metadata},
            "coordinates": COORDINATES_3D,
        }
        t0 = time.perf_counter()
        from medreasoner.imaging.montage import volume_montage

        montage = volume_montage(lambda s: frames[s], masks, per_slice, chosen, query, status, warnings)
        run.add_time("montage", t0)
        run.timings["total"] = time.perf_counter() - t_start
        record["timings_s"] = {k: round(v, 4) for k, v in run.timings.items()}
        return VolumeResult(query=query, status=status, message=message, mask=mask_image, record=record,
                            warnings=warnings, montage=montage)

    def _propagate(self, frames: _SliceFrames, lo: int, hi: int, key: int, key_mask, run: _Run):
        """The key slice's mask carried through [lo, hi): SAM2 video memory or box tracking."""
        t0 = time.perf_counter()
        asm = self.models.asm

        def on_step(count: int) -> None:
            run.counts["propagation_steps"] = count
            run.events.progress(Stage.PROPAGATE, count, hi - lo - 1)

        if asm.video_propagation:
            window = frames.sub(range(lo, hi))

            class _Cancel:
                is_set = staticmethod(run.events.cancelled)

            with self.models.asm_lock:
                local = asm.propagate(window, key - lo, key_mask, cancel=_Cancel(),
                                      progress=lambda c: on_step(c - 1))
            masks = {lo + k: m for k, m in local.items()}
            run.counts["propagation_steps"] = len(masks) - 1
        else:
            def segment(i: int, box) -> np.ndarray:
                return self._segment([frames[i]], [box], [None], run)[0].mask

            masks = strat.track_boxes(segment, lo, hi, key, key_mask,
                                      lambda: run.events.check_cancelled("propagation"), on_step)
        run.add_time("propagation", t0)
        return masks

    @staticmethod
    def _slice_report(item: dict, chosen: int | None) -> dict:
        a = item["answer"]
        return {"slice": item["slice"], "chosen": item["slice"] == chosen, "status": a.answer.status.value,
                "reasoning": a.answer.think, "box": list(a.answer.box) if a.answer.box else None,
                "points": [list(p) for p in a.answer.points] if a.answer.points else None,
                "crm_confidence": a.confidence, "asm_score": item["asm_score"],
                "mask_pixels": int(item["mask"].sum()) if item["mask"] is not None else 0,
                "message": a.answer.message, "completion": a.text}

    @staticmethod
    def _physical(stack, chosen: int | None, report: dict | None) -> dict[str, Any]:
        """The key slice's box corners and key points in LPS millimetres (for ROI/fiducial markups)."""
        if chosen is None or report is None or not report.get("box"):
            return {"box_corners_lps": None, "points_lps": None}
        x1, y1, x2, y2 = report["box"]
        corners = [list(stack.physical_point(chosen, y, x)) for x, y in ((x1, y1), (x2, y2))]
        points = [list(stack.physical_point(chosen, y, x)) for x, y in report.get("points") or []]
        return {"box_corners_lps": corners, "points_lps": points or None}

    # -- both --------------------------------------------------------------------------------------
    def ground(self, source: Any, query: str, options: RunOptions | None = None, events: Events | None = None):
        """Dispatch on the input: volumes (files, DICOM folders, SimpleITK images) or 2D images."""
        import SimpleITK as sitk

        from medreasoner.io.volumes import Volume

        if is_volume_input(source) or isinstance(source, (sitk.Image, Volume)):
            return self.ground_volume(source, query, options, events)
        return self.ground_image(source, query, options, events)

    def cache_info(self) -> dict[str, Any]:
        return {"embeddings": {"items": len(self._embeddings), "bytes": self._embeddings.nbytes,
                               "hits": self._embeddings.hits, "misses": self._embeddings.misses},
                "slices": {"items": len(self._slices), "bytes": self._slices.nbytes},
                "volumes": {"items": len(self._volumes)}}

    def clear_caches(self) -> None:
        for c in (self._embeddings, self._slices, self._volumes):
            c.clear()


def slice_bounds(n_slices: int, options: RunOptions) -> tuple[int, int]:
    """The checked [start, stop) slice range of a stack of ``n_slices`` (and the key slice inside it)."""
    lo, hi = strat.parse_slice_range(options.slice_range, n_slices)
    if options.key_slice is not None and not lo <= options.key_slice < hi:
        raise InputError(f"key slice {options.key_slice} is outside the slice range {lo}:{hi}")
    return lo, hi


def check_volume_options(volume: Any, options: RunOptions) -> None:
    """Refuse options that do not fit this volume (slice range, key slice) before models load."""
    from medreasoner.imaging.display import display_stack

    slice_bounds(len(display_stack(volume, options.checked().axis)), options)


def read_image(image: Any, window: Any = None):
    """A 2D input (path, ``Image2D`` or array) as ``Image2D``; errors are ``InputError``."""
    from medreasoner.imaging.intensity import parse_window
    from medreasoner.io.images import Image2D, image_from_array, load_image

    if isinstance(image, Image2D):
        return image
    win = None if window is None else parse_window(window)
    # blank, all-NaN and tiny images are refused here, as volumes are: a model cannot answer about them
    if isinstance(image, (str, Path)):
        return load_image(image, window=win, check_content=True)
    return image_from_array(image, window=win, check_content=True)


def is_volume_input(path: Any) -> bool:
    from medreasoner.constants import VOLUME_SUFFIXES

    if not isinstance(path, (str, Path)):
        return False
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float)):
        return value
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
