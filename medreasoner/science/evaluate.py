"""`medreasoner evaluate`: score a CRM + ASM on U-MRG-format data, resumably and sharded.

Each rank (RANK / WORLD_SIZE, as set by ``torchrun`` and ``accelerate launch``) takes every
WORLD_SIZE-th sample and appends one JSON line per finished sample to its own shard, so a rerun
skips what is done. Rank 0 waits for every shard's ``.done`` marker, merges them and writes
``summary.json``, ``table.md``, ``overlays.png`` and ``histograms.png``.

Every wait is bounded and cancellable: a WORLD_SIZE without a RANK (a stray variable, not a launcher)
is refused at once, a rank whose shard never appears is given up on after ``ABSENT_RANK_S``, and
the whole wait after ``timeout_s``.

Two scoring protocols (``PROTOCOLS``). ``robust`` (the default): this project's answer parser with its
safe repairs, and the ASM prompted with the repaired box and points. ``reference``: the public
reference evaluation (PRIS-CV/MedReasoner eval/eval.py, eval/utils.py, eval/statistic.py) as it ran:
its strict extraction with no repairs, failures scored 0 and counted its way, categories nested under
super-categories, the ASM prompted with the raw answer (MedSAM2 at 1024 pixels in fp32, box + both
points, labels [1, 1], the best-scoring of the multimask outputs) and up to 2048 new tokens.

Each sample's record in ``predictions.jsonl`` holds the raw completion, both parses (the robust one's
repairs, the strict one's failure reason) and the metrics under both protocols, so
:func:`rebuild_table` recomputes either table without the models. The mask is made once, with the
prompt of the protocol being run; the other protocol's mask Dice is known when its prompt is the same
(the same mask), or when it has no prompt (0); otherwise it is ``None`` ("not computed") and its
table says how many are missing. Box IoU and pDice are always known for both.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import DEFAULT_ASM, DEFAULT_MAX_NEW_TOKENS, TINY_WARNING
from medreasoner.errors import CancelledError, InputError
from medreasoner.io.files import atomic_write_bytes, json_bytes, png_bytes
from medreasoner.science.metrics import (
    markdown_table,
    reference_mask_dice,
    reference_sample_metrics,
    sample_metrics,
    summarize,
    summarize_reference,
)

PROTOCOLS = ("robust", "reference")
# How the reference evaluation ran (eval/statistic.py loads MedSAM2 through sam2_hiera_t512.yaml, a
# symlink to a config with image_size 1024, without autocast; eval/eval.py generates up to 2048 tokens).
REFERENCE_DEFAULTS = {"asm": "medsam2", "asm_image_size": 1024, "asm_precision": "fp32", "max_new_tokens": 2048}
ROBUST_DEFAULTS = {"asm": DEFAULT_ASM, "asm_image_size": None, "asm_precision": None,
                   "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
SAM2_ASMS = ("medsam2", "sam2")  # the ASMs whose image size and precision a protocol can set
ASM_PRECISIONS = ("fp32", "auto")  # auto: the ASM's own (bf16 autocast on CUDA, fp32 on CPU)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """This process's rank from RANK / WORLD_SIZE (torchrun, accelerate launch), checked: a
        WORLD_SIZE above 1 without a RANK is a stray variable, and rank 0 would wait hours for
        shards no process writes."""
        env = os.environ if env is None else env

        def number(name: str) -> int | None:
            text = str(env.get(name, "")).strip()
            if not text:
                return None
            try:
                return int(text)
            except ValueError:
                raise InputError(f"{name}={text!r} is not a whole number; torchrun and accelerate set it, unset it "
                                 "to evaluate in one process") from None

        world, rank = number("WORLD_SIZE"), number("RANK")
        world = 1 if world is None else world
        if world < 1:
            raise InputError(f"WORLD_SIZE={world} must be at least 1; unset it to evaluate in one process")
        if world > 1 and rank is None:
            raise InputError(f"WORLD_SIZE={world} is set but RANK is not, so no other process would write its shard "
                             f"and this one would wait for it: unset WORLD_SIZE to evaluate in one process, or start "
                             f"the ranks with torchrun --nproc_per_node {world} -m medreasoner evaluate ...")
        rank = 0 if rank is None else rank
        if not 0 <= rank < world:
            raise InputError(f"RANK={rank} must be between 0 and WORLD_SIZE-1 = {world - 1}")
        return cls(rank, world)

    def path(self, out: Path) -> Path:
        return out / "shards" / f"predictions.rank{self.rank:03d}-of-{self.world:03d}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Complete records only: a line cut short by a crash is dropped (and rewritten on resume)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            records.append(rec)
    return records


def _compact(path: Path, records: list[dict]) -> None:
    atomic_write_bytes(path, b"".join(json.dumps(r).encode() + b"\n" for r in records))


def _robust_parse_dict(a) -> dict[str, Any]:
    return {"status": a.status.value, "box": list(a.box) if a.box else None,
            "points": [list(p) for p in a.points] if a.points else None, "repairs": list(a.repairs),
            "message": a.message}


def strict_answer(text: str, resize, think: bool = True):
    """The reference's reading of a completion (``parse_answer_reference``), in original image pixels.

    The reference never rescales (U-MRG images are 840x840 and its Qwen processor keeps 840), so with an
    identity ``resize`` the raw values are kept exactly (booleans included); otherwise plain numbers
    are scaled like the robust answer, and odd shapes are kept as given (noted)."""
    from medreasoner.models.answer import parse_answer_reference

    ans = parse_answer_reference(text, (resize.model_w, resize.model_h), think=think)
    if (resize.orig_w, resize.orig_h) == (resize.model_w, resize.model_h) or not ans.ok:
        return ans
    prompt = ans.asm_prompt()
    if prompt is None:
        ans.notes.append("key points of an odd shape are kept in model pixels (not rescaled)")
        ans.box = list(resize.box_to_orig(tuple(float(v) for v in ans.box)))
    else:
        ans.box = list(resize.box_to_orig(prompt[0]))
        ans.points = [list(resize.point_to_orig(p)) for p in prompt[1]]
    ans.notes.append(f"rescaled from the {resize.model_w}x{resize.model_h} pixels the CRM saw")
    return ans


def _same_prompt(robust_answer, prompt) -> bool:
    """Would the ASM get the same prompt (box + both points) under both protocols?"""
    if prompt is None or robust_answer.box is None or not robust_answer.points:
        return False
    return (tuple(float(v) for v in robust_answer.box) == tuple(prompt[0])
            and [tuple(float(v) for v in p) for p in robust_answer.points] == [tuple(p) for p in prompt[1]])


def _unknown_mask_metrics(metrics: dict) -> dict:
    metrics.update(dice=None, mask_iou=None, inter=None, union=None)
    return metrics


def _base_record(sample, protocol: str, completion: str, robust, strict) -> dict[str, Any]:
    return {"id": sample.id, "supercategory": sample.supercategory, "category": sample.category,
            "query": sample.query, "protocol": protocol, "completion": completion,
            "ground_truth": sample.ground_truth,
            "parse": {"robust": _robust_parse_dict(robust), "reference": strict.to_dict()}}


def record_for(sample, result, think: bool = True) -> dict[str, Any]:
    """The record of one sample run under the robust protocol (``result``: an ``ImageResult``)."""
    from medreasoner.imaging.resize import ResizeMap

    a = result.answer
    metrics = sample_metrics(a.box, a.points, sample.ground_truth, result.mask if result.ok else None,
                             sample.mask)
    metrics["dice_source"] = "asm" if result.ok else "no box: not segmented (0)"
    (w, h), (mw, mh) = result.image_size, result.model_input_size
    strict = strict_answer(result.completion, ResizeMap(w, h, mw, mh), think)
    ref = reference_sample_metrics(strict, sample.ground_truth)
    prompt = strict.asm_prompt() if ref["failure"] is None else None
    if sample.mask is None:
        ref["dice_source"] = "no ground-truth mask"
    elif ref["failure"] is not None or prompt is None:
        ref["dice"], ref["dice_source"] = 0.0, "failure or points its SAM2 call rejects: not segmented (0)"
    elif result.ok and _same_prompt(a, prompt):
        ref["dice"], ref["dice_source"] = reference_mask_dice(result.mask, sample.mask), "same prompt as the robust mask"
    else:
        ref["dice_source"] = "not computed: the raw prompt differs from the repaired one"
    return {
        **_base_record(sample, "robust", result.completion, a, strict),
        "status": result.status, "answer_status": a.status.value,
        "box": list(a.box) if a.box else None, "points": [list(p) for p in a.points] if a.points else None,
        "reasoning": a.think, "mask_prompt": {"protocol": "robust", "prompt": result.asm_prompt},
        "metrics": metrics, "metrics_by_protocol": {"robust": metrics, "reference": ref},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }


_ASM_ERRORS = (ValueError, RuntimeError, IndexError, TypeError)


def reference_batch(session, batch, options) -> list[tuple[dict, np.ndarray]]:
    """Run ``batch`` (samples) under the reference protocol: the CRM once per sample, the strict parse,
    then the ASM on the raw box + both points when the reference would segment. Returns
    (record, mask) pairs; the mask is all False where nothing was segmented."""
    import time

    from medreasoner.engine import check_query

    models = session.models
    frames = [session.read_image(s.image, options.window).rgb for s in batch]
    queries = [check_query(s.query) for s in batch]
    with models.crm_lock:
        answers = models.crm.answer_batch(frames, queries, options.prompt)
    out = []
    for s, rgb, a in zip(batch, frames, answers):
        strict = strict_answer(a.text, a.resize, options.prompt == "reasoning")
        ref = reference_sample_metrics(strict, s.ground_truth)
        prompt = strict.asm_prompt() if ref["failure"] is None else None
        seg, asm_error, t0 = None, None, time.perf_counter()
        if ref["failure"] is not None:
            asm_error = "a failure: not segmented (Dice 0, as the reference)"
        elif prompt is None:
            asm_error = "the reference's SAM2 call raises on key points of this shape (Dice 0, as the reference)"
        else:
            try:
                seg = session.segment_image(rgb, prompt[0], prompt[1])
            except _ASM_ERRORS as exc:
                if "out of memory" in str(exc).lower():
                    raise
                asm_error = (f"{models.asm.name} refused the raw prompt ({exc}); Dice 0 (the reference's MedSAM2 "
                             "segments any prompt: use --asm medsam2 for its behaviour)")
        h, w = rgb.shape[:2]
        mask = seg.mask if seg is not None else np.zeros((h, w), bool)
        if s.mask is None:
            ref["dice_source"] = "no ground-truth mask"
        else:
            ref["dice"] = reference_mask_dice(mask, s.mask)
            ref["dice_source"] = "asm" if seg is not None else "not segmented (0)"
        rob = a.answer
        same = seg is not None and _same_prompt(rob, prompt)
        robust = sample_metrics(rob.box, rob.points, s.ground_truth, mask if same else None, s.mask)
        if same:
            robust["dice_source"] = "same prompt as the reference mask"
        elif rob.box is None:
            robust["dice_source"] = "no box: not segmented (0)"
        else:
            _unknown_mask_metrics(robust)["dice_source"] = "not computed: the repaired prompt differs from the raw one"
        timings = {"crm": a.seconds, **(seg.timings if seg else {}), "asm": time.perf_counter() - t0}
        record = {
            **_base_record(s, "reference", a.text, rob, strict),
            "status": "ok" if seg is not None else "no_target", "answer_status": rob.status.value,
            "box": list(prompt[0]) if seg is not None else None,
            "points": [list(p) for p in prompt[1]] if seg is not None else None,
            "reasoning": rob.think,
            "mask_prompt": {"protocol": "reference", "prompt": seg.prompt if seg else None,
                            "labels": [1, 1] if seg else None, "asm_error": asm_error},
            "metrics": ref, "metrics_by_protocol": {"robust": robust, "reference": ref},
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
        }
        out.append((record, mask))
    return out


def check_resume(out: Path, shard: Shard, protocol: str) -> None:
    """Refuse to resume a shard written under another protocol (before any model loads)."""
    path = shard.path(Path(out))
    _check_resume_protocol(read_jsonl(path), protocol, path)


def _check_resume_protocol(previous: list[dict], protocol: str, path: Path) -> None:
    other = {r.get("protocol", "robust") for r in previous} - {protocol}
    if other:
        raise InputError(f"{path} holds samples evaluated under --protocol {sorted(other)[0]}; resume with that "
                         f"protocol, or write the {protocol} run to another --out folder")


def resume_run_key(session, options, protocol: str) -> str:
    """What a finished record must have been made with to be reused: the weights (fingerprints, not
    paths: a moved folder is the same model), dtype, generation and image size, the prompt text, the
    run options and the protocol. Not the device or batch size."""
    from dataclasses import asdict

    from medreasoner.models.prompts import prompt_record

    crm = dict(session.models.crm.describe())
    asm = dict(session.models.asm.describe())
    crm.pop("device", None)
    for d, path_key in ((crm, "model"), (asm, "checkpoint")):
        if d.get("fingerprint"):
            d.pop(path_key, None)
    opts = asdict(options)
    key = {"crm": crm, "asm": asm, "prompt": prompt_record(session.models.crm, options.prompt),
           "options": {k: opts[k] for k in ("prompt", "window", "keep_largest") if k in opts}, "protocol": protocol}
    return "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def sample_key(sample) -> str:
    """The sample's content: image pixels, question, ground-truth box/points and mask."""
    h = hashlib.sha256()
    for arr in (sample.image, sample.mask):
        if arr is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    h.update(json.dumps([sample.query, sample.ground_truth], sort_keys=True, default=str).encode())
    return "sha256:" + h.hexdigest()


def run_shard(samples, session, out: Path, shard: Shard, options=None, events=None,
              save_masks: bool = True, protocol: str = "robust") -> Path:
    """Evaluate this rank's share of ``samples`` through ``session`` (a ``medreasoner.engine.Session``)
    under ``protocol``; returns the shard file. Resumable: finished samples are skipped on a rerun
    (under the same protocol)."""
    from medreasoner.engine import RunOptions
    from medreasoner.engine.events import NO_EVENTS, Stage

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    events = events or NO_EVENTS
    options = (options or RunOptions()).checked()
    out.mkdir(parents=True, exist_ok=True)
    path = shard.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    done_marker = path.with_suffix(".done")
    done_marker.unlink(missing_ok=True)
    previous = read_jsonl(path)
    _check_resume_protocol(previous, protocol, path)
    mine = [s for i, s in enumerate(samples) if i % shard.world == shard.rank]
    run_key = resume_run_key(session, options, protocol)
    keys = {s.id: {"run": run_key, "sample": sample_key(s)} for s in mine}
    reusable = [r for r in previous if r.get("resume_key") is not None and r.get("resume_key") == keys.get(r["id"])]
    stale = len(previous) - len(reusable)
    _compact(path, reusable)  # drops a half-written last line, and work from other data, models or prompts
    if stale:
        events.log(f"{stale} earlier record(s) in {path} came from other data, models, prompt or settings "
                   "(or an older version): they are evaluated again", level="warning")
    finished = {r["id"] for r in reusable}
    todo = [s for s in mine if s.id not in finished]
    kept = len(mine) - len(todo)

    def stopped(why: str) -> CancelledError:
        # what is on disk, exactly: the batch that was running is never written after a cancel
        return CancelledError(f"stopped {why.removeprefix('cancelled ')}: {kept} of {len(mine)} samples are done "
                              f"and kept in {path}; rerun to resume")

    bs = max(1, int(getattr(session.models.crm, "batch_size", 4)))
    think = options.prompt == "reasoning"
    try:
        events.progress(Stage.EVALUATE, kept, len(mine))
        with path.open("a") as f:
            for start in range(0, len(todo), bs):
                if events.cancelled():
                    raise CancelledError("between batches")
                batch = todo[start:start + bs]
                if protocol == "reference":
                    done = reference_batch(session, batch, options)
                else:
                    results = session.ground_images([s.image for s in batch], [s.query for s in batch], options,
                                                    events)
                    done = [(record_for(s, res, think), res.mask) for s, res in zip(batch, results)]
                for s, (record, mask) in zip(batch, done):
                    record["resume_key"] = keys[s.id]
                    if save_masks:
                        atomic_write_bytes(out / "masks" / f"{s.id}.png", png_bytes(mask.astype(np.uint8) * 255))
                    f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
                kept += len(batch)
                events.progress(Stage.EVALUATE, kept, len(mine))
    except CancelledError as exc:
        raise stopped(str(exc)) from exc
    atomic_write_bytes(done_marker, str(len(mine)).encode())  # other ranks read it: never half a file
    return path


# A rank whose shard file has not appeared after this long was never started (a stray RANK/WORLD_SIZE,
# a launcher that lost a process): rank 0 has by then loaded its models and evaluated its own share.
ABSENT_RANK_S = 600.0
WAIT_LOG_S = 60.0  # how often a waiting rank 0 says so


def merge(out: Path, world: int, timeout_s: float = 3600.0, poll_s: float = 1.0, *, events=None,
          absent_s: float = ABSENT_RANK_S) -> list[dict]:
    """Rank 0: wait for all shards to finish, then return their records (unique ids, stable order).

    The wait is bounded (``timeout_s``; ``absent_s`` for a shard that never appears: ``InputError``),
    logged (``events.log`` every minute) and cancellable (``events.cancelled()``: ``CancelledError``)."""
    from medreasoner.engine.events import NO_EVENTS

    events = events or NO_EVENTS
    start = time.monotonic()
    shards = [Shard(r, world).path(out) for r in range(world)]
    last_log = -WAIT_LOG_S
    while True:
        missing = [r for r, p in enumerate(shards) if not p.with_suffix(".done").is_file()]
        if not missing:
            break
        waited = time.monotonic() - start
        if events.cancelled():
            raise CancelledError(f"stopped while rank 0 waited for rank(s) {missing}: this rank's samples are kept in "
                                 f"{shards[0]}; rerun to resume")
        absent = [r for r in missing if not shards[r].is_file()]
        if absent and waited > min(absent_s, timeout_s):
            raise InputError(f"rank(s) {absent} never started: no shard in {out / 'shards'} after {waited:.0f} s "
                             f"(were all {world} processes launched, e.g. torchrun --nproc_per_node {world}?); "
                             "rerun to resume")
        if waited > timeout_s:
            raise InputError(f"rank(s) {missing} did not finish their shards within --merge-timeout {timeout_s:.0f} s; "
                             "rerun to resume")
        if waited - last_log >= WAIT_LOG_S:
            last_log = waited
            events.log(f"rank 0 is waiting for the shards of rank(s) {missing} ({waited:.0f} s of at most "
                       f"{timeout_s:.0f} s)", "info")
        time.sleep(poll_s)
    seen, records = set(), []
    for p in shards:
        for r in read_jsonl(p):
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    return records


def _metrics_for(record: dict, protocol: str) -> dict:
    by = record.get("metrics_by_protocol")
    if by and protocol in by:
        return by[protocol]
    # a record written before protocols existed: robust metrics; the reference's box/point metrics are
    # recomputed from its completion (its mask Dice is unknown)
    if protocol == "robust":
        return record["metrics"]
    from medreasoner.imaging.resize import ResizeMap

    big = 1 << 30
    ref = reference_sample_metrics(strict_answer(record.get("completion") or "", ResizeMap(big, big, big, big)),
                                   record["ground_truth"])
    ref["dice_source"] = "not recorded"
    return ref


def rebuild_table(predictions: Path | str | list[dict], protocol: str = "robust") -> dict[str, Any]:
    """Either protocol's summary from ``predictions.jsonl`` (a path or its records) alone: no model runs.
    ``write_reports`` writes exactly this (plus run information)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    records = read_jsonl(Path(predictions)) if isinstance(predictions, (str, Path)) else list(predictions)
    rows = []
    for r in records:
        row = {"metrics": _metrics_for(r, protocol)}
        for key in ("supercategory", "category"):  # a missing name is "unknown" in both tables
            if key in r:
                row[key] = r[key]
        rows.append(row)
    summary = summarize_reference(rows) if protocol == "reference" else summarize(rows)
    return {"protocol": protocol, **summary}


def write_reports(records: list[dict], samples_by_id: dict, out: Path, title: str, run_info: dict,
                  protocol: str = "robust", protocol_settings: dict | None = None) -> dict:
    summary = rebuild_table(records, protocol)
    summary["protocol_settings"] = protocol_settings or {"protocol": protocol}
    other = next(p for p in PROTOCOLS if p != protocol)
    summary["other_protocol"] = {"protocol": other, "overall": rebuild_table(records, other)["overall"],
                                 "note": "from the same predictions; mask Dice only where the prompt was the same"}
    summary["run"] = run_info
    atomic_write_bytes(out / "predictions.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in records))
    atomic_write_bytes(out / "summary.json", json_bytes(summary))
    atomic_write_bytes(out / "table.md", markdown_table(summary, title).encode())
    _histograms(records, out / "histograms.png")
    tiny = run_info.get("crm", {}).get("tiny_test_model") or run_info.get("asm", {}).get("tiny_test_model")
    _overlay_grid(records, samples_by_id, out, out / "overlays.png", banner=TINY_WARNING if tiny else "")
    return summary


# -- protocol settings and the reference's ASM ----------------------------------------------------------


def protocol_settings(protocol: str, *, asm: str | None = None, asm_image_size: int | None = None,
                      asm_precision: str | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
    """What a run uses: each value given (not None) wins, else the protocol's default. Returns the
    settings, ``chosen_by`` (user / protocol default) and, for ``reference``, how the run differs from
    the reference evaluation. ``asm_image_size`` / ``asm_precision`` only apply to SAM2-based ASMs."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    defaults = REFERENCE_DEFAULTS if protocol == "reference" else ROBUST_DEFAULTS
    given = {"asm": asm, "asm_image_size": asm_image_size, "asm_precision": asm_precision,
             "max_new_tokens": max_new_tokens}
    settings: dict[str, Any] = {"protocol": protocol}
    chosen_by = {}
    for key, value in given.items():
        settings[key] = defaults[key] if value is None else value
        chosen_by[key] = "protocol default" if value is None else "user"
    name = str(settings["asm"]).lower()
    if name not in SAM2_ASMS:
        for key in ("asm_image_size", "asm_precision"):
            if given[key] is not None:
                raise InputError(f"--{key.replace('_', '-')} applies to the SAM2-based ASMs ({', '.join(SAM2_ASMS)}), "
                                 f"not {settings['asm']}")
            settings[key], chosen_by[key] = None, f"not applicable to {settings['asm']}"
    size = settings["asm_image_size"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 64 or size % 32):
        raise InputError(f"--asm-image-size must be a multiple of 32 of at least 64 pixels, got {size!r}")
    if settings["asm_precision"] is not None and settings["asm_precision"] not in ASM_PRECISIONS:
        raise InputError(f"--asm-precision must be one of {', '.join(ASM_PRECISIONS)}, got {settings['asm_precision']!r}")
    settings["chosen_by"] = chosen_by
    settings["asm_prompts"] = ("raw answer box + both points, labels [1, 1], best of the multimask outputs"
                               if protocol == "reference" else "repaired box + both points (box alone without them)")
    if protocol == "reference":
        ref = REFERENCE_DEFAULTS
        keys = ("asm_image_size", "asm_precision") if name == ref["asm"] else ("asm",)
        settings["differs_from_reference"] = [
            f"{key.replace('_', ' ')} {settings[key]} (the reference: {ref[key]})" for key in keys
            if str(settings[key]).lower() != str(ref[key]).lower()]
        if name != ref["asm"]:
            settings["differs_from_reference"][0] += f" at {ref['asm_image_size']} px in {ref['asm_precision']}"
        if int(settings["max_new_tokens"]) != ref["max_new_tokens"]:
            settings["differs_from_reference"].append(
                f"max new tokens {settings['max_new_tokens']} (the reference: {ref['max_new_tokens']})")
    return settings


def describe_settings(settings: dict[str, Any]) -> str:
    """One line naming every setting and where it came from (printed by ``evaluate``)."""
    parts = [f"{key.replace('_', ' ')} {settings[key] if settings[key] is not None else 'n/a'} ({how})"
             for key, how in settings["chosen_by"].items()]
    return f"protocol {settings['protocol']}: " + ", ".join(parts)


def needs_protocol_asm(settings: dict[str, Any]) -> bool:
    """True when the ASM must be built here (a SAM2-based ASM at a set size/precision, or with raw
    prompts for the reference protocol) rather than by the registry's default."""
    return str(settings["asm"]).lower() in SAM2_ASMS and (
        settings["protocol"] == "reference" or settings["asm_image_size"] is not None
        or settings["asm_precision"] not in (None, "auto"))


def build_protocol_asm(settings: dict[str, Any], *, checkpoint: str | None = None, device: str | None = "auto",
                       batch_size: int | None = None, config_dir: Path | None = None, random_init: bool = False):
    """A SAM2-based ASM (``medsam2`` or SAM 2.1 ``sam2`` tiny) at ``settings['asm_image_size']`` pixels
    (None: its own config) and ``settings['asm_precision']``; under the reference protocol it takes the
    raw prompts (inverted, zero-area or outside boxes are segmented, not refused). The config written
    for it is kept in ``config_dir`` (default: a temporary folder) so a run records what it used."""
    import tempfile

    from omegaconf import OmegaConf

    from medreasoner.models.asm import sam2_asm

    name = str(settings["asm"]).lower()
    if name == "medsam2":
        base = sam2_asm.medsam2_config_path()
        ckpt = None if random_init else sam2_asm.resolve_checkpoint(checkpoint, sam2_asm.MEDSAM2_REPO,
                                                                    sam2_asm.MEDSAM2_FILE)
    elif name == "sam2":
        rel, repo, fname = sam2_asm.SAM2_VARIANTS["tiny"]
        base = sam2_asm.packaged_sam2_config(rel)
        ckpt = None if random_init else sam2_asm.resolve_checkpoint(checkpoint, repo, fname)
    else:
        raise InputError(f"a protocol ASM is one of {', '.join(SAM2_ASMS)}, not {settings['asm']}")
    cfg = OmegaConf.load(str(base))
    size = settings.get("asm_image_size")
    if size is not None:
        cfg.model.image_size = int(size)
    folder = Path(config_dir) if config_dir is not None else Path(tempfile.mkdtemp(prefix="medreasoner-asm-"))
    path = folder / f"{name}_{int(cfg.model.image_size)}.yaml"
    atomic_write_bytes(path, OmegaConf.to_yaml(cfg).encode())
    return sam2_asm.SAM2ASM(name, path, ckpt, device, batch_size, precision=settings.get("asm_precision") or "auto",
                            raw_prompts=settings["protocol"] == "reference")


def _histograms(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("iou", "box IoU"), ("pdice", "pDice (reference)"), ("dice", "mask Dice")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (k, label) in zip(axes, keys):
        vals = [r["metrics"][k] for r in records if r["metrics"].get(k) is not None]
        ax.hist(vals, bins=20, range=(0, max(1.0, max(vals, default=1.0))), color="#4477aa")
        ax.set_title(f"{label}: mean {100 * np.mean(vals) if vals else 0:.1f}")
        ax.set_xlabel(k)
    axes[0].set_ylabel("samples")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _overlay_grid(records: list[dict], samples_by_id: dict, out: Path, path: Path, n: int = 8,
                  banner: str = "") -> None:
    """Up to n samples side by side: the prediction in colour over the image, the GT in white."""
    from PIL import Image

    from medreasoner.imaging.geometry import order_box
    from medreasoner.imaging.overlay import draw_overlay

    tiles = []
    for r in records[:n]:
        s = samples_by_id.get(r["id"])
        if s is None:
            continue
        mpath = out / "masks" / f"{r['id']}.png"
        mask = np.asarray(Image.open(mpath)) > 0 if mpath.is_file() else None
        m = r["metrics"]
        dice = "n/a" if m.get("dice") is None else f"{100 * m['dice']:.1f}"
        text = (f"IoU {100 * m['iou']:.1f}  pDice {100 * m['pdice']:.1f}  Dice {dice}\n"
                f"{r.get('reasoning') or r['completion'][:300]}")
        box = order_box(r["box"])[0] if r.get("box") else None  # raw (reference) boxes may be inverted
        tile = draw_overlay(s.image, mask, box, r["points"], title=f"{r['id']}: {r['query']}", text=text,
                            banner=banner, gt_mask=s.mask, gt_box=s.ground_truth["bbox_2d"])
        tiles.append(tile.resize((tile.width * 360 // tile.height, 360)))
    if not tiles:
        return
    cols = 2
    rows = (len(tiles) + cols - 1) // cols
    w = max(t.width for t in tiles)
    grid = Image.new("RGB", (w * cols, 360 * rows), (0, 0, 0))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * 360))
    atomic_write_bytes(path, png_bytes(grid))
