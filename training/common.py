"""What the GRPO and SFT entry points share: their arguments (MedReasoner's few + TRL's own) and the rows.

A run is configured by three dataclasses parsed together by TRL's own ``TrlParser`` (as TRL's example
scripts do): :class:`MedReasonerArguments` (data, prompt, image size, reward, mask reward, resume),
``trl.GRPOConfig`` / ``trl.SFTConfig`` (every trainer field) and ``trl.ModelConfig`` (model path, dtype,
LoRA). ``--config run.yaml`` gives a flat mapping of any of their fields; ``--field value`` on the
command line overrides it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medreasoner.constants import CRM_SIDECAR, DEFAULT_CRM_IMAGE_SIZE

log = logging.getLogger("medreasoner.training")

# LoRA on the language model's attention projections (the vision tower's are named qkv/proj) unless
# ``lora_target_modules`` says otherwise.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class MedReasonerArguments:
    """MedReasoner's own run settings; every other setting is a field of TRL's trainer config or ModelConfig."""

    data: str = field(default="", metadata={"help": "U-MRG data: a datasets folder, parquet file/folder or "
                                                    "plain folder (medreasoner.data)"})
    split: str = field(default="train", metadata={"help": "split of `data` to train on"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N samples"})
    prompt: str = field(default="reasoning", metadata={"help": "user prompt style", "choices": ["reasoning", "direct"]})
    image_size: int | None = field(default=None, metadata={
        "help": "square side the model sees; default: the checkpoint's (840 for MedReasoner, 112 for the tiny model)"})
    reward: str = field(default="soft", metadata={"help": "reward mode of medreasoner.science.rewards (GRPO): soft "
                                                          "(4 terms), hard (8 terms), base (Seg-Zero binary)"})
    max_prompt_length: int = field(default=2048, metadata={
        "help": "GRPO: longest prompt in tokens, image tokens included; checked up front, never truncated"})
    mask_reward: bool = field(default=False, metadata={
        "help": "GRPO: add the Dice of a real ASM's mask (from the answered box + points) against the GT mask"})
    mask_reward_asm: str = field(default="litemedsam", metadata={"help": "ASM of the mask reward"})
    mask_reward_checkpoint: str | None = field(default=None, metadata={"help": "its checkpoint (default: the ASM's)"})
    sft_targets: str = field(default="answer", metadata={
        "help": "SFT: answer (a fixed short <think> + the GT answer) or reasoning (the data's traces where present)",
        "choices": ["answer", "reasoning"]})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "linear warmup over this fraction of all steps, in [0, 1). transformers 5 has no warmup_ratio: "
                "this sets the trainer's warmup_steps to the ratio (a warmup_steps value < 1 is a ratio)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest checkpoint-N in output_dir (weights, optimizer, scheduler, RNG, data "
                "position); --resume_from_checkpoint PATH picks one"})

    def __post_init__(self):
        if self.warmup_ratio is not None and not 0 <= float(self.warmup_ratio) < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


TrainConfig = MedReasonerArguments  # the name used before the TRL parser (target_text callers)


def _machine_defaults() -> dict[str, Any]:
    """Defaults that depend on this machine; the YAML file and the command line override them."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        # TRL defaults to bf16 and gradient checkpointing everywhere; on CPU both only slow things down
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "gradient_checkpointing": cuda,
        "use_cpu": not cuda,
        "dataloader_pin_memory": cuda,
        "report_to": _default_report_to(),
        "dtype": None,  # ModelConfig's is float32; None: chosen from bf16 / LoRA / DeepSpeed (see model_dtype)
    }


def _default_report_to() -> str:
    try:
        import tensorboard  # noqa: F401

        return "tensorboard"
    except ImportError:
        return "none"


def parse_args(config_class, argv: list[str] | None = None, description: str | None = None,
               defaults: dict[str, Any] | None = None):
    """``(MedReasonerArguments, trainer config, ModelConfig)`` from ``--config FILE`` and the command line.

    ``config_class`` is ``trl.GRPOConfig`` or ``trl.SFTConfig``. Precedence, lowest first: TRL's
    defaults, this machine's (bf16 and gradient checkpointing on GPUs only, ...), ``defaults`` (the
    entry point's), the YAML file, the command line.
    """
    import warnings

    from trl import ModelConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--set" in argv:
        raise SystemExit("--set key=value is gone: pass --key value (any MedReasonerArguments, trainer config or "
                         "ModelConfig field), e.g. --max_steps 100 --use_peft false")
    parser = TrlParser((MedReasonerArguments, config_class, ModelConfig), description=description)
    parser.set_defaults(**{**_machine_defaults(), **(defaults or {})})
    try:
        with warnings.catch_warnings():
            # TRL's configs default gradient_checkpointing (transformers 5's alias of activation_checkpointing)
            # to True, so transformers warns on every parse whatever the user wrote
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            med, args, model_args = parser.parse_args_and_config(argv)
    except ValueError as exc:  # unknown YAML keys, bad values: one line, not a traceback
        raise SystemExit(f"error: {exc}") from exc
    if not model_args.model_name_or_path:
        raise SystemExit("no model: set model_name_or_path in the config or pass --model_name_or_path PATH")
    if not med.data:
        raise SystemExit("no training data: set `data` in the config or pass --data PATH")
    if med.warmup_ratio is not None:
        if args.warmup_steps and args.warmup_steps != med.warmup_ratio:
            raise SystemExit(f"warmup_ratio {med.warmup_ratio} and warmup_steps {args.warmup_steps} are both set; "
                             "give one")
        # transformers 5 reads a warmup_steps value in [0, 1) as a ratio of all steps (get_warmup_steps)
        args.warmup_steps = float(med.warmup_ratio)
    if model_args.lora_target_modules is None:
        model_args.lora_target_modules = list(DEFAULT_LORA_TARGETS)
    return med, args, model_args


def peft_config(model_args):
    """TRL's LoRA config from ModelConfig (``use_peft``, ``lora_*``), or None for full fine-tuning."""
    from trl import get_peft_config

    return get_peft_config(model_args)


def model_dtype(model_args, default):
    """ModelConfig's ``dtype`` when given (``auto``, ``bfloat16``, ...), else ``default`` (a torch dtype)."""
    import torch

    if model_args.dtype in (None, ""):
        return default
    return model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)


def model_load_kwargs(model_args, args, dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from ModelConfig and the trainer config."""
    from trl import get_quantization_config

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": model_args.model_revision,
                              "trust_remote_code": bool(args.trust_remote_code)}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:  # load_in_4bit / load_in_8bit: each process's weights on its own GPU
        kwargs.update(quantization_config=quantization, device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
    init = args.model_init_kwargs
    if isinstance(init, dict):  # TRL's model_init_kwargs, applied to the model we load ourselves
        kwargs.update(init)
        args.model_init_kwargs = None
    return kwargs


def resume_checkpoint(med: MedReasonerArguments, args) -> str | None:
    """The checkpoint to resume from: ``resume_from_checkpoint`` if given, else with ``resume`` the newest."""
    if args.resume_from_checkpoint:
        return str(args.resume_from_checkpoint)
    return newest_checkpoint(args.output_dir) if med.resume else None


def run_config(med: MedReasonerArguments, args, model_args) -> dict[str, Any]:
    """Every setting of the run, by where it lives (written to run.json)."""
    return {"medreasoner": dataclasses.asdict(med), "model": dataclasses.asdict(model_args),
            "trainer": args.to_dict()}


def local_model_path(model: str) -> str:
    """A local model folder as an absolute path (LoRA adapters record it for the export); hub ids as is."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def model_image_size(med: MedReasonerArguments, model: str) -> int:
    if med.image_size:
        return int(med.image_size)
    sidecar = Path(model) / CRM_SIDECAR
    if sidecar.is_file():
        return int(json.loads(sidecar.read_text()).get("image_size", DEFAULT_CRM_IMAGE_SIZE))
    return DEFAULT_CRM_IMAGE_SIZE


def scaled_ground_truth(gt: dict, w: int, h: int, size: int) -> dict:
    """Ground truth from image pixels to the model's (size x size) pixels."""
    sx, sy = size / w, size / h
    b = gt["bbox_2d"]
    return {"bbox_2d": [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy],
            "point_2d": [[p[0] * sx, p[1] * sy] for p in gt["point_2d"]]}


def build_rows(med: MedReasonerArguments, image_size: int, with_answers: bool = False) -> list[dict]:
    """All rows in memory (small data, tests); trainers use :func:`training_dataset`."""
    rows = list(iter_rows(med, image_size, with_answers))
    if not rows:
        raise SystemExit(f"no training samples in {med.data} (split {med.split})")
    return rows


def training_dataset(med: MedReasonerArguments, image_size: int, cache_dir: str | Path, with_answers: bool = False,
                     columns: tuple[str, ...] | None = None):
    """A ``datasets.Dataset`` streamed row by row to an Arrow cache in ``cache_dir``, so the resized
    images of a 14K-sample dataset are never all in memory at once."""
    from datasets import Dataset

    ds = Dataset.from_generator(_generate, gen_kwargs={"config": dataclasses.asdict(med), "image_size": image_size,
                                                       "with_answers": with_answers},
                                cache_dir=str(cache_dir))
    if len(ds) == 0:
        raise SystemExit(f"no training samples in {med.data} (split {med.split})")
    return ds.select_columns(list(columns)) if columns else ds


def _generate(config: dict, image_size: int, with_answers: bool):
    yield from iter_rows(MedReasonerArguments(**config), image_size, with_answers)


def iter_rows(med: MedReasonerArguments, image_size: int, with_answers: bool = False):
    """Dataset rows for TRL: chat prompt (image + our prompt), the image resized to ``image_size``
    squared, the ground truth in those pixels.

    With ``with_answers`` (SFT), each row also gets the target completion built from the GT.
    """
    from PIL import Image

    from medreasoner.data import iter_samples
    from medreasoner.models.prompts import build_prompt

    size = int(image_size)
    for s in iter_samples(med.data, split=med.split, limit=med.limit):
        h, w = s.image.shape[:2]
        gt = scaled_ground_truth(s.ground_truth, w, h, size)
        row = {
            "id": s.id,
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": build_prompt(s.query, med.prompt)}]}],
            "image": Image.fromarray(s.image).resize((size, size), Image.BICUBIC),
            "ground_truth": json.dumps(gt),
        }
        if med.mask_reward:  # only the mask-Dice reward reads masks; then every sample needs one
            if s.mask is None:
                raise SystemExit(f"mask_reward is on but sample {s.id} has no mask")
            row["mask"] = Image.fromarray(s.mask.astype("uint8") * 255).resize((size, size), Image.NEAREST)
        if with_answers:
            row["completion"] = [{"role": "assistant", "content": [{"type": "text",
                                                                    "text": target_text(gt, med, s)}]}]
        yield row


def target_text(gt: dict, cfg: MedReasonerArguments, sample=None) -> str:
    """The SFT target: the answer in the reference format, with the sample's reasoning trace if any."""
    b = [round(v) for v in gt["bbox_2d"]]
    p1, p2 = ([round(v) for v in p] for p in gt["point_2d"])
    answer = f"{{'bbox': {b}, 'points_1': {p1}, 'points_2': {p2}}}"
    trace = getattr(sample, "reasoning", None) if cfg.sft_targets == "reasoning" else None
    if cfg.prompt == "direct":
        return f"<answer>{answer}</answer>"
    return f"<think>{trace or 'The target region is identified from the question and the image.'}</think>" \
           f"<answer>{answer}</answer>"


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest COMPLETE checkpoint: the trainer writes trainer_state.json last, so a folder without it
    is one a kill interrupted (resuming from it would fail); such folders are skipped, never deleted."""
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    ckpts.sort(key=lambda p: int(p.name.split("-")[-1]))
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
