"""Learning check: does SFT + GRPO on MedReasoner's soft reward really improve grounding?

    python benchmarks/toy_grounding.py [--quick] [--out DIR] [--sft-steps N] [--grpo-steps N] ...

A synthetic grounding task small enough for CPU, on 112x112 images (the tiny CRM's input size, so
model pixels == image pixels). Default task (``--task single``): one bright rectangle on a dark noise
background, its edges on the 14-pixel patch grid (box coordinates 0, 14, ..., 112; sides of 2-3
cells), with CoordConv-style coordinate channels (red = x ramp, green = y ramp, the same in every
image; blue = the scan), because the random tiny vision tower has only relative 2D rotary positions
and without them its tokens carry no absolute position (``--no-coord`` turns them off). The older
``--task shapes``: 2-3 non-overlapping shapes on grey noise, the question naming one by a property
(brightest / darkest / largest). Ground truth from the target mask with ``keypoints.ground_truth_from_mask``.

Stages, on a random-weight tiny Qwen2.5-VL (``build_tiny_crm(format_steps=0)``, re-initialised wider
here: ``--hidden`` 128 text width, ``--vision-hidden`` 64; the 64/32-wide default barely localises):
untrained -> SFT warm-up (``training/sft.py``, full fine-tuning, deliberately short so that it
leaves room) -> GRPO on the soft reward (``training/grpo.py``, full fine-tuning, from the SFT
model). After each stage the same held-out split (never trained on; checked disjoint) is answered
greedily through ``medreasoner.models.crm.load_crm(...).answer_batch`` and scored with
``rewards.score(..., "soft")`` and the box IoU. Targets: GRPO raises the held-out reward over SFT,
and the box IoU by >= 0.05.

Outputs go to ``--out`` (default ``/tmp/medreasoner_toy_grounding``, outside the repository):
data, run folders, ``sft_loss.png``, ``grpo_reward.png`` and ``results.json``.
The full run is sized for well under 20 minutes on 2 CPU cores; ``--quick`` is a ~3-minute smoke version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 112  # medreasoner.models.tiny.TINY_IMAGE_SIZE (checked in main)
KINDS = {  # kind -> grey level range; the brightness order is fixed by kind, sizes are random
    "disc": (215, 250),
    "bar": (140, 170),
    "square": (85, 110),
}
QUESTIONS = {
    "brightest": ["Which structure is the brightest?", "Where is the brightest object?",
                  "Locate the most hyperintense structure."],
    "darkest": ["Where is the darkest object?", "Which structure is the least bright?",
                "Locate the faintest structure."],
    "largest": ["Which is the largest object?", "Where is the biggest structure?",
                "Locate the structure covering the most area."],
}


# --- synthetic data -------------------------------------------------------------------------------
def _shape_mask(kind: str, rng: random.Random) -> np.ndarray:
    """A shape's mask in its own tight frame."""
    if kind == "disc":
        r = rng.randint(6, 16)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        return (xx ** 2 + yy ** 2) <= r * r + r // 2
    if kind == "square":
        s = rng.randint(10, 30)
        return np.ones((s, s), bool)
    long, short = rng.randint(18, 44), rng.randint(6, 11)  # bar, horizontal or vertical
    return np.ones((short, long) if rng.random() < 0.5 else (long, short), bool)


def make_sample(idx: int, rng: random.Random, split: str):
    """One Sample: noise background, 2-3 shapes, a question about one of them; None if unplaceable."""
    from medreasoner.data import Sample
    from medreasoner.science.keypoints import ground_truth_from_mask

    kinds = rng.sample(list(KINDS), rng.choice([2, 3]))
    np_rng = np.random.default_rng(rng.randrange(1 << 30))
    img = np_rng.integers(0, 60, (SIZE, SIZE), dtype=np.int16)
    occupied = np.zeros((SIZE, SIZE), bool)
    masks: dict[str, np.ndarray] = {}
    for kind in kinds:
        for _ in range(50):
            m = _shape_mask(kind, rng)
            h, w = m.shape
            y, x = rng.randint(2, SIZE - h - 2), rng.randint(2, SIZE - w - 2)
            full = np.zeros((SIZE, SIZE), bool)
            full[y:y + h, x:x + w] = m
            if not (occupied[max(0, y - 4):y + h + 4, max(0, x - 4):x + w + 4]).any():
                occupied |= full
                masks[kind] = full
                break
        else:
            return None
    for kind, m in masks.items():
        lo, hi = KINDS[kind]
        img[m] = rng.randint(lo, hi) + np_rng.integers(-8, 9, int(m.sum()))
    areas = {k: int(m.sum()) for k, m in masks.items()}
    ranked = sorted(areas.values(), reverse=True)
    props = ["brightest", "darkest"]
    if ranked[0] >= 1.3 * ranked[1]:  # "largest" only when it is clearly defined
        props.append("largest")
    prop = rng.choice(props)
    if prop == "brightest":
        target = max(masks, key=lambda k: KINDS[k][0])
    elif prop == "darkest":
        target = min(masks, key=lambda k: KINDS[k][0])
    else:
        target = max(areas, key=areas.get)
    rgb = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    mask = masks[target]
    return Sample(id=f"{split}-{idx:04d}", image=rgb, mask=mask, query=rng.choice(QUESTIONS[prop]),
                  ground_truth=ground_truth_from_mask(mask), supercategory="toy", category=f"{prop}:{target}",
                  data_source="toy_grounding")


SINGLE_QUESTIONS = ["Where is the bright object?", "Locate the bright structure.",
                    "Which region is the bright finding?", "Find the hyperintense region."]


def make_single_sample(idx: int, rng: random.Random, split: str, grid: int, cells: tuple[int, int] = (2, 3),
                       coord: bool = True):
    """One bright rectangle on a dark noise background, its edges on a ``grid``-pixel lattice.

    With ``grid`` = 14 (the vision patch) every patch is all shape or all background and every box
    coordinate is one of 9 values (0, 14, ..., 112). ``coord``: the red and green channels carry the
    pixel's x and y (CoordConv-style coordinate channels, the same ramp in every image) and the blue
    channel the scan. The tiny random vision tower has only relative (2D rotary) positions, so without
    them a token's content says nothing about where it is; with them the model must still find the
    shape in the blue channel and read its edges' coordinates.
    """
    from medreasoner.data import Sample
    from medreasoner.science.keypoints import ground_truth_from_mask

    n = SIZE // grid
    np_rng = np.random.default_rng(rng.randrange(1 << 30))
    img = np_rng.integers(0, 50, (SIZE, SIZE), dtype=np.int16)
    w, h = rng.randint(*cells), rng.randint(*cells)
    x, y = rng.randint(0, n - w), rng.randint(0, n - h)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y * grid:(y + h) * grid, x * grid:(x + w) * grid] = True
    img[mask] = rng.randint(200, 240) + np_rng.integers(-8, 9, int(mask.sum()))
    scan = np.clip(img, 0, 255).astype(np.uint8)
    if coord:
        ramp = np.round(np.arange(SIZE) * 255 / (SIZE - 1)).astype(np.uint8)
        rgb = np.stack([np.broadcast_to(ramp[None, :], scan.shape), np.broadcast_to(ramp[:, None], scan.shape),
                        scan], axis=2)
    else:
        rgb = np.repeat(scan[..., None], 3, axis=2)
    return Sample(id=f"{split}-{idx:04d}", image=np.ascontiguousarray(rgb), mask=mask,
                  query=rng.choice(SINGLE_QUESTIONS), ground_truth=ground_truth_from_mask(mask),
                  supercategory="toy", category=f"single:{w}x{h}", data_source="toy_grounding")


def make_split(n: int, seed: int, split: str, task: str = "single", grid: int = 14, cells=(2, 3),
               coord: bool = True) -> list:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        s = (make_single_sample(len(out), rng, split, grid, cells, coord) if task == "single"
             else make_sample(len(out), rng, split))
        if s is not None:
            out.append(s)
    return out


# --- model ----------------------------------------------------------------------------------------
def widen_tiny_crm(path: Path, a: argparse.Namespace) -> Path:
    """Re-initialise ``build_tiny_crm``'s checkpoint with a wider/deeper random Qwen2.5-VL (same
    tokenizer, processor and sidecar): the 64-wide default has too little capacity to localise."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = json.loads((path / "config.json").read_text())
    t, v = d["text_config"], d["vision_config"]
    t.pop("layer_types", None)
    heads = max(2, a.hidden // 32)
    rot = a.hidden // heads // 2  # mrope sections (t, h, w) sum to head_dim / 2
    t.update(hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=a.layers,
             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    t["rope_parameters"]["mrope_section"] = [rot - 2 * (3 * rot // 8), 3 * rot // 8, 3 * rot // 8]
    v.update(hidden_size=a.vision_hidden, intermediate_size=2 * a.vision_hidden, depth=a.vision_depth,
             num_heads=max(2, a.vision_hidden // 32), out_hidden_size=a.hidden,
             fullatt_block_indexes=list(range(a.vision_depth)))
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    config = Qwen2_5_VLConfig(text_config=t, vision_config=v, **{k: d[k] for k in keys})
    torch.manual_seed(a.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = t["eos_token_id"]
    model.generation_config.pad_token_id = t["pad_token_id"]
    model.eval().save_pretrained(path)
    return path


# --- evaluation -----------------------------------------------------------------------------------
def evaluate(model_dir: str, samples: list, max_new_tokens: int, prompt: str, batch: int = 16) -> dict:
    from medreasoner.imaging.geometry import box_iou
    from medreasoner.models.crm import load_crm
    from medreasoner.science.rewards import score

    t0 = time.perf_counter()
    crm = load_crm(model_dir, device="cpu")
    crm.generation.max_new_tokens = max_new_tokens
    crm.generation.do_sample = False
    crm.batch_size = batch
    answers = crm.answer_batch([s.image for s in samples], [s.query for s in samples], prompt=prompt)
    rewards, ious, valid = [], [], []
    for s, a in zip(samples, answers):
        sc = score(a.text, s.ground_truth, "soft")  # 112 px images: model pixels == image pixels
        rewards.append(sc["total"])
        valid.append(sc["format_answer"] == 1.0)
        box = a.answer.box
        ious.append(float(box_iou(box, s.ground_truth["bbox_2d"])) if box is not None else 0.0)
    return {"reward": float(np.mean(rewards)), "iou": float(np.mean(ious)), "valid": float(np.mean(valid)),
            "eval_seconds": time.perf_counter() - t0, "example": answers[0].text}


# --- training stages ------------------------------------------------------------------------------
def _common_args(a: argparse.Namespace) -> dict:
    return {"use_peft": "false", "bf16": "false", "gradient_checkpointing": "false", "report_to": "none",
            "prompt": a.prompt, "image_size": 112, "seed": a.seed, "logging_steps": 1, "save_total_limit": 1}


def _run(main, values: dict) -> None:
    """The entry point's ``main`` with TRL-style ``--field value`` arguments."""
    argv = [str(x) for k, v in values.items() for x in (f"--{k}", v)]
    rc = main(argv)
    if rc:
        raise SystemExit(f"training failed (exit {rc})")


def run_sft(a, data: Path, base: str, out: Path) -> Path:
    from training import sft

    _run(sft.main, {**_common_args(a), "model_name_or_path": base, "data": data, "split": "train",
                    "output_dir": out, "learning_rate": a.sft_lr, "max_steps": a.sft_steps,
                    "per_device_train_batch_size": a.sft_batch, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
                    "save_steps": a.sft_steps, "num_train_epochs": 1000})
    return out / "final"


def run_grpo(a, data: Path, base: Path, out: Path) -> Path:
    from training import grpo

    _run(grpo.main, {**_common_args(a), "model_name_or_path": base, "data": data, "split": "train",
                     "output_dir": out, "reward": "soft", "num_generations": a.num_generations,
                     "per_device_train_batch_size": a.grpo_batch, "learning_rate": a.grpo_lr, "beta": a.beta,
                     "temperature": a.temperature, "max_completion_length": a.max_completion_length,
                     "max_steps": a.grpo_steps, "save_steps": a.grpo_steps, "num_train_epochs": 1000,
                     "lr_scheduler_type": "constant"})
    return out / "final"


def _load_state(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(rows: list[dict], keys: list[str], path: Path, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys:
        pts = [(h["step"], h[k]) for h in rows if k in h and "step" in h]
        if not pts:
            continue
        xs, ys = zip(*pts)
        line, = ax.plot(xs, ys, alpha=0.35 if len(ys) > 10 else 1.0, label=k)
        if len(ys) > 10:  # moving average over ~10% of the run
            w = max(2, len(ys) // 10)
            ma = np.convolve(ys, np.ones(w) / w, mode="valid")
            ax.plot(xs[w - 1:], ma, color=line.get_color(), label=f"{k} (avg {w})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~3-minute smoke version (fewer samples and steps)")
    ap.add_argument("--out", default="/tmp/medreasoner_toy_grounding", help="output folder (replaced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--prompt", default="direct", choices=["direct", "reasoning"])
    ap.add_argument("--task", default="single", choices=["single", "shapes"],
                    help="single: one bright rectangle on a grid; shapes: 2-3 shapes, named by a property")
    ap.add_argument("--grid", type=int, default=14, help="single task: box edges on this pixel lattice")
    ap.add_argument("--cells", type=int, nargs=2, default=[2, 3], metavar=("MIN", "MAX"),
                    help="single task: rectangle sides, in grid cells")
    ap.add_argument("--no-coord", dest="coord", action="store_false",
                    help="single task: grey images, no x/y coordinate channels")
    ap.add_argument("--hidden", type=int, default=128, help="tiny CRM text width (build_tiny_crm's is 64)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--sft-batch", type=int, default=8)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--grpo-steps", type=int, default=None)
    ap.add_argument("--grpo-batch", type=int, default=32, help="completions per step (prompts x generations)")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--max-completion-length", type=int, default=None)
    ap.add_argument("--from-sft", default=None, metavar="DIR",
                    help="reuse this SFT model (a previous run's sft/final) instead of training one: for GRPO tuning")
    a = ap.parse_args(argv)
    quick = {"n_train": 48, "n_test": 16, "sft_steps": 60, "grpo_steps": 8}
    full = {"n_train": 512, "n_test": 128, "sft_steps": 150, "grpo_steps": 300}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    from medreasoner.data import write_parquet
    from medreasoner.models.tiny import TINY_IMAGE_SIZE, build_tiny_crm
    from training.common import MedReasonerArguments, target_text

    assert TINY_IMAGE_SIZE == SIZE
    torch.manual_seed(a.seed)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    train = make_split(a.n_train, a.seed, "train", a.task, a.grid, tuple(a.cells), a.coord)
    test = make_split(a.n_test, a.seed + 1000, "test", a.task, a.grid, tuple(a.cells), a.coord)
    seen = {s.image.tobytes() for s in train}
    assert not any(s.image.tobytes() in seen for s in test), "a held-out image is in the training split"
    train_pq = write_parquet(train, out / "data" / "train.parquet")
    write_parquet(test, out / "data" / "test.parquet")
    cfg = MedReasonerArguments(prompt=a.prompt)
    answer_tokens = max(len(target_text(s.ground_truth, cfg)) for s in train + test)  # chars >= tokens
    if a.max_completion_length is None:
        a.max_completion_length = min(answer_tokens + 8, 128)
    eval_tokens = a.max_completion_length
    print(f"data: {len(train)} train / {len(test)} held-out samples in {out / 'data'}; "
          f"longest target {answer_tokens} chars; max_completion_length {a.max_completion_length}", flush=True)

    base = build_tiny_crm(out / "tiny_crm", format_steps=0, seed=a.seed)
    if a.hidden != 64 or a.layers != 2 or a.vision_hidden != 32 or a.vision_depth != 2:
        widen_tiny_crm(base, a)
    n_params = sum(v.numel() for v in _load_state(base).values())
    print(f"tiny CRM: hidden {a.hidden} x {a.layers} layers, vision {a.vision_hidden} x {a.vision_depth}, "
          f"{n_params:,} parameters", flush=True)
    stages: dict[str, dict] = {}
    t0 = time.perf_counter()
    stages["untrained"] = {**evaluate(str(base), test, eval_tokens, a.prompt), "train_seconds": 0.0}
    stages["untrained"]["wall_seconds"] = time.perf_counter() - t0
    print(f"untrained: {stages['untrained']}", flush=True)

    t0 = time.perf_counter()
    if a.from_sft:  # same seed and sizes -> same data; the SFT log is copied for the plot
        shutil.copytree(Path(a.from_sft).parent, out / "sft")
        sft_final = out / "sft" / "final"
    else:
        sft_final = run_sft(a, train_pq, str(base), out / "sft")
    t_train = time.perf_counter() - t0
    stages["sft"] = {**evaluate(str(sft_final), test, eval_tokens, a.prompt), "train_seconds": t_train}
    stages["sft"]["wall_seconds"] = time.perf_counter() - t0
    print(f"sft: {stages['sft']}", flush=True)

    t0 = time.perf_counter()
    grpo_final = run_grpo(a, train_pq, sft_final, out / "grpo")
    t_train = time.perf_counter() - t0
    stages["grpo"] = {**evaluate(str(grpo_final), test, eval_tokens, a.prompt), "train_seconds": t_train}
    stages["grpo"]["wall_seconds"] = time.perf_counter() - t0
    print(f"grpo: {stages['grpo']}", flush=True)

    sft_log, grpo_log = _log(out / "sft" / "train_log.jsonl"), _log(out / "grpo" / "train_log.jsonl")
    plot_curve(sft_log, ["loss"], out / "sft_loss.png", "SFT warm-up: training loss", "loss (completion tokens)")
    rkeys = ["reward"] + sorted({k for h in grpo_log for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    plot_curve(grpo_log, rkeys, out / "grpo_reward.png", "GRPO (soft reward): mean reward per step", "reward")

    d_reward = stages["grpo"]["reward"] - stages["sft"]["reward"]
    d_iou = stages["grpo"]["iou"] - stages["sft"]["iou"]
    total = time.perf_counter() - t_start
    curve = [h["reward"] for h in grpo_log if "reward" in h]
    k = max(1, len(curve) // 5)
    hp = {k2: v for k2, v in vars(a).items()}
    results = {
        "hyperparameters": hp, "stages": stages,
        "deltas_grpo_minus_sft": {"reward": d_reward, "iou": d_iou},
        "targets": {"reward_up": d_reward > 0, "iou_up_0.05": d_iou >= 0.05},
        "grpo_train_reward_first_last": [float(np.mean(curve[:k])), float(np.mean(curve[-k:]))] if curve else None,
        "sft_loss_first_last": [sft_log[0].get("loss"), next((h["loss"] for h in reversed(sft_log) if "loss" in h),
                                                             None)],
        "total_seconds": total, "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    print()
    print(f"toy grounding learning check ({'quick' if a.quick else 'full'}): {len(train)} train / "
          f"{len(test)} held-out, prompt={a.prompt}, torch threads={torch.get_num_threads()}")
    print(f"task={a.task} grid={a.grid} cells={a.cells} coord={a.coord}; model hidden {a.hidden}x{a.layers}, "
          f"vision {a.vision_hidden}x{a.vision_depth}; SFT {a.sft_steps} steps lr {a.sft_lr} batch {a.sft_batch}; "
          f"GRPO {a.grpo_steps} steps lr {a.grpo_lr} batch {a.grpo_batch} gens {a.num_generations} "
          f"T {a.temperature} beta {a.beta}")
    hdr = f"{'stage':<11}{'soft reward':>13}{'box IoU':>10}{'valid fmt':>11}{'train s':>9}{'wall s':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in stages.items():
        print(f"{name:<11}{r['reward']:>13.4f}{r['iou']:>10.4f}{r['valid']:>11.3f}{r['train_seconds']:>9.1f}"
              f"{r['wall_seconds']:>9.1f}")
    print(f"GRPO - SFT: reward {d_reward:+.4f} (target > 0: {'MET' if d_reward > 0 else 'MISSED'}), "
          f"IoU {d_iou:+.4f} (target >= +0.05: {'MET' if d_iou >= 0.05 else 'MISSED'}, "
          f"{d_iou - 0.05:+.4f} vs target)")
    if results["grpo_train_reward_first_last"]:
        f, last = results["grpo_train_reward_first_last"]
        print(f"GRPO training reward: first {k} steps {f:.4f} -> last {k} steps {last:.4f}")
    print(f"curves: {out / 'sft_loss.png'}, {out / 'grpo_reward.png'}; numbers: {out / 'results.json'}")
    print(f"total time {total:.1f} s ({total / 60:.1f} min)")
    if not math.isfinite(d_reward):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
