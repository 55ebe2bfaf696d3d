"""What the GRPO and SFT entry points share: one YAML config per run, and the U-MRG dataset rows."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medreasoner.constants import CRM_SIDECAR, DEFAULT_CRM, DEFAULT_CRM_IMAGE_SIZE

log = logging.getLogger("medreasoner.training")


@dataclass
class TrainConfig:
    # model and data
    model: str = DEFAULT_CRM  # any Qwen2.5-VL-family folder or hub id
    data: str = ""  # U-MRG: datasets folder, parquet file/folder or plain folder (medreasoner.data)
    split: str = "train"
    limit: int | None = None
    output_dir: str = "runs/grpo"
    prompt: str = "reasoning"  # reasoning | direct
    image_size: int | None = None  # square side the model sees; None: the checkpoint's (840 for U-MRG)
    # GRPO defaults follow the reference run (veRL): 16 samples per prompt, lr 1e-6, KL 0.01, T=1.0
    reward: str = "soft"  # soft | hard | base
    num_generations: int = 16
    learning_rate: float = 1e-6
    beta: float = 0.01
    temperature: float = 1.0
    max_prompt_length: int = 2048  # checked, not truncated: a VLM prompt cannot be cut safely
    max_completion_length: int = 2048
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 5.0
    max_steps: int = -1
    warmup_ratio: float = 0.0  # a fraction of all steps (passed as warmup_steps < 1)
    lr_scheduler_type: str = "constant"
    # optional reward from real ASM masks (mask Dice of the ASM's mask from the answer vs the GT mask)
    mask_reward: bool = False
    mask_reward_asm: str = "litemedsam"
    mask_reward_checkpoint: str | None = None
    # efficiency
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool | None = None  # None: on for GPUs, off on CPU
    bf16: bool | None = None  # None: on where CUDA supports it
    use_vllm: bool = False  # generation through vLLM when installed
    vllm_mode: str = "colocate"  # colocate | server (trl vllm-serve)
    # bookkeeping
    save_steps: int = 50
    save_total_limit: int = 3
    logging_steps: int = 1
    seed: int = 0
    report_to: list[str] | None = None  # None: tensorboard when installed
    # SFT only
    sft_targets: str = "answer"  # answer | reasoning (use reasoning traces where the data has them)


def parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) then ``key=value`` overrides (values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path:
        values.update(yaml.safe_load(Path(path).read_text()) or {})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} must look like key=value")
        values[key.strip()] = parse_value(raw)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"unknown config keys: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for f in dataclasses.fields(TrainConfig):  # YAML reads "1e-6" (no dot) as a string
        v = values.get(f.name)
        if isinstance(v, str) and f.type in ("float", "float | None", "int", "int | None"):
            try:
                values[f.name] = float(v) if f.type.startswith("float") else int(float(v))
            except ValueError as exc:
                raise SystemExit(f"{f.name} must be a number, got {v!r}") from exc
    return TrainConfig(**values)


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML run config (see training/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    return p


def model_image_size(cfg: TrainConfig) -> int:
    if cfg.image_size:
        return int(cfg.image_size)
    sidecar = Path(cfg.model) / CRM_SIDECAR
    if sidecar.is_file():
        return int(json.loads(sidecar.read_text()).get("image_size", DEFAULT_CRM_IMAGE_SIZE))
    return DEFAULT_CRM_IMAGE_SIZE


def scaled_ground_truth(gt: dict, w: int, h: int, size: int) -> dict:
    """Ground truth from image pixels to the model's (size x size) pixels."""
    sx, sy = size / w, size / h
    b = gt["bbox_2d"]
    return {"bbox_2d": [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy],
            "point_2d": [[p[0] * sx, p[1] * sy] for p in gt["point_2d"]]}


def build_rows(cfg: TrainConfig, with_answers: bool = False) -> list[dict]:
    """All rows in memory (small data, tests); trainers use :func:`training_dataset`."""
    rows = list(iter_rows(cfg, with_answers))
    if not rows:
        raise SystemExit(f"no training samples in {cfg.data} (split {cfg.split})")
    return rows


def training_dataset(cfg: TrainConfig, with_answers: bool = False, columns: tuple[str, ...] | None = None):
    """A ``datasets.Dataset`` streamed row by row to an Arrow cache next to the run, so the resized
    images of a 14K-sample dataset are never all in memory at once."""
    from datasets import Dataset

    cache = Path(cfg.output_dir) / ".dataset_cache"
    ds = Dataset.from_generator(_generate, gen_kwargs={"config": dataclasses.asdict(cfg), "with_answers": with_answers},
                                cache_dir=str(cache))
    if len(ds) == 0:
        raise SystemExit(f"no training samples in {cfg.data} (split {cfg.split})")
    return ds.select_columns(list(columns)) if columns else ds


def _generate(config: dict, with_answers: bool):
    yield from iter_rows(TrainConfig(**config), with_answers)


def iter_rows(cfg: TrainConfig, with_answers: bool = False):
    """Dataset rows for TRL: chat prompt (image + our prompt), the resized image, GT in model pixels.

    With ``with_answers`` (SFT), each row also gets the target completion built from the GT.
    """
    from PIL import Image

    from medreasoner.models.prompts import build_prompt

    size = model_image_size(cfg)
    from medreasoner.data import iter_samples

    for s in iter_samples(cfg.data, split=cfg.split, limit=cfg.limit):
        h, w = s.image.shape[:2]
        gt = scaled_ground_truth(s.ground_truth, w, h, size)
        row = {
            "id": s.id,
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": build_prompt(s.query, cfg.prompt)}]}],
            "image": Image.fromarray(s.image).resize((size, size), Image.BICUBIC),
            "ground_truth": json.dumps(gt),
        }
        if cfg.mask_reward:  # only the mask-Dice reward reads masks; then every sample needs one
            if s.mask is None:
                raise SystemExit(f"mask_reward is on but sample {s.id} has no mask")
            row["mask"] = Image.fromarray(s.mask.astype("uint8") * 255).resize((size, size), Image.NEAREST)
        if with_answers:
            row["completion"] = [{"role": "assistant", "content": [{"type": "text",
                                                                    "text": target_text(gt, cfg, s)}]}]
        yield row


def target_text(gt: dict, cfg: TrainConfig, sample=None) -> str:
    """The SFT target: the answer in the reference format, with the sample's reasoning trace if any."""
    b = [round(v) for v in gt["bbox_2d"]]
    p1, p2 = ([round(v) for v in p] for p in gt["point_2d"])
    answer = f"{{'bbox': {b}, 'points_1': {p1}, 'points_2': {p2}}}"
    trace = getattr(sample, "reasoning", None) if cfg.sft_targets == "reasoning" else None
    if cfg.prompt == "direct":
        return f"<answer>{answer}</answer>"
    return f"<think>{trace or 'The target region is identified from the question and the image.'}</think>" \
           f"<answer>{answer}</answer>"


def resolve_precision(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, gradient_checkpointing) resolved for this machine."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    gc = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
    return bf16, gc


def report_to(cfg: TrainConfig) -> list[str]:
    if cfg.report_to is not None:
        return cfg.report_to
    try:
        import tensorboard  # noqa: F401

        return ["tensorboard"]
    except ImportError:
        return []


def newest_checkpoint(output_dir: str) -> str | None:
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def plot_curves(log_history: list[dict], path: Path, title: str) -> None:
    """Reward (and loss) curves from the trainer's log history, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in log_history if "step" in h]
    keys = sorted({k for h in rows for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    keys = keys or sorted({k for h in rows for k in h if k in ("reward", "loss")})
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in keys + (["reward"] if "reward" not in keys and any("reward" in h for h in rows) else []):
        pts = [(h["step"], h[k]) for h in rows if k in h]
        if pts:
            ax.plot(*zip(*pts), label=k.replace("rewards/", "").replace("/mean", ""))
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
