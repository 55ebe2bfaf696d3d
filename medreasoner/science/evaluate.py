"""`medreasoner evaluate`: score a CRM + ASM on U-MRG-format data, resumably and sharded.

Each rank (RANK / WORLD_SIZE, as set by ``torchrun`` and ``accelerate launch``) takes every
WORLD_SIZE-th sample and appends one JSON line per finished sample to its own shard, so a rerun
skips what is done. Rank 0 waits for every shard's ``.done`` marker, merges them and writes
``summary.json``, ``table.md``, ``overlays.png`` and ``histograms.png``.

Every wait is bounded and cancellable: a WORLD_SIZE without a RANK (a stray variable, not a launcher)
is refused at once, a rank whose shard never appears is given up on after ``ABSENT_RANK_S``, and
the whole wait after ``timeout_s``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import TINY_WARNING
from medreasoner.errors import CancelledError, InputError
from medreasoner.io.files import atomic_write_bytes, json_bytes, png_bytes
from medreasoner.science.metrics import markdown_table, sample_metrics, summarize


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


def record_for(sample, result) -> dict[str, Any]:
    a = result.answer
    metrics = sample_metrics(a.box, a.points, sample.ground_truth, result.mask if result.ok else None,
                             sample.mask)
    return {
        "id": sample.id, "supercategory": sample.supercategory, "category": sample.category,
        "query": sample.query, "status": result.status, "answer_status": a.status.value,
        "box": list(a.box) if a.box else None, "points": [list(p) for p in a.points] if a.points else None,
        "reasoning": a.think, "completion": result.completion, "ground_truth": sample.ground_truth,
        "metrics": metrics, "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
    }


def run_shard(samples, session, out: Path, shard: Shard, options=None, events=None,
              save_masks: bool = True) -> Path:
    """Evaluate this rank's share of ``samples`` through ``session`` (a ``medreasoner.engine.Session``);
    returns the shard file. Resumable: finished samples are skipped on a rerun."""
    from medreasoner.engine.events import NO_EVENTS, Stage

    events = events or NO_EVENTS
    out.mkdir(parents=True, exist_ok=True)
    path = shard.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    done_marker = path.with_suffix(".done")
    done_marker.unlink(missing_ok=True)
    previous = read_jsonl(path)
    _compact(path, previous)  # drop a half-written last line before appending
    finished = {r["id"] for r in previous}
    mine = [s for i, s in enumerate(samples) if i % shard.world == shard.rank]
    todo = [s for s in mine if s.id not in finished]
    kept = len(mine) - len(todo)

    def stopped(why: str) -> CancelledError:
        # what is on disk, exactly: the batch that was running is never written after a cancel
        return CancelledError(f"stopped {why.removeprefix('cancelled ')}: {kept} of {len(mine)} samples are done "
                              f"and kept in {path}; rerun to resume")

    bs = max(1, int(getattr(session.models.crm, "batch_size", 4)))
    try:
        events.progress(Stage.EVALUATE, kept, len(mine))
        with path.open("a") as f:
            for start in range(0, len(todo), bs):
                if events.cancelled():
                    raise CancelledError("between batches")
                batch = todo[start:start + bs]
                results = session.ground_images([s.image for s in batch], [s.query for s in batch], options, events)
                for s, res in zip(batch, results):
                    if save_masks:
                        atomic_write_bytes(out / "masks" / f"{s.id}.png", png_bytes(res.mask.astype(np.uint8) * 255))
                    f.write(json.dumps(record_for(s, res)) + "\n")
                f.flush()
                os.fsync(f.fileno())
                kept += len(batch)
                events.progress(Stage.EVALUATE, kept, len(mine))
    except CancelledError as exc:
        raise stopped(str(exc)) from exc
    done_marker.write_text(str(len(mine)))
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


def write_reports(records: list[dict], samples_by_id: dict, out: Path, title: str, run_info: dict) -> dict:
    summary = summarize(records)
    summary["run"] = run_info
    atomic_write_bytes(out / "predictions.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in records))
    atomic_write_bytes(out / "summary.json", json_bytes(summary))
    atomic_write_bytes(out / "table.md", markdown_table(summary, title).encode())
    _histograms(records, out / "histograms.png")
    tiny = run_info.get("crm", {}).get("tiny_test_model") or run_info.get("asm", {}).get("tiny_test_model")
    _overlay_grid(records, samples_by_id, out, out / "overlays.png", banner=TINY_WARNING if tiny else "")
    return summary


def _histograms(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("iou", "box IoU"), ("pdice", "pDice (reference)"), ("dice", "mask Dice")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (k, label) in zip(axes, keys):
        vals = [r["metrics"][k] for r in records]
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

    from medreasoner.imaging.overlay import draw_overlay

    tiles = []
    for r in records[:n]:
        s = samples_by_id.get(r["id"])
        if s is None:
            continue
        mpath = out / "masks" / f"{r['id']}.png"
        mask = np.asarray(Image.open(mpath)) > 0 if mpath.is_file() else None
        text = (f"IoU {100 * r['metrics']['iou']:.1f}  pDice {100 * r['metrics']['pdice']:.1f}  "
                f"Dice {100 * r['metrics']['dice']:.1f}\n{r.get('reasoning') or r['completion'][:300]}")
        tile = draw_overlay(s.image, mask, r["box"], r["points"], title=f"{r['id']}: {r['query']}", text=text,
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
