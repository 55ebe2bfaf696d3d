"""SFT baseline: teach the CRM to answer U-MRG questions with the ground-truth box and key points.

    python training/sft.py --config training/configs/sft.yaml [--set key=value ...] [--resume]

Multi-GPU (the reference baseline used DeepSpeed ZeRO-3; the config comments say how to launch it):

    accelerate launch --config_file training/accelerate/deepspeed_zero3.yaml training/sft.py \
        --config training/configs/sft.yaml

TRL's ``SFTTrainer`` on prompt-completion rows from :func:`training.common.build_rows` (chat prompt
with one image, the answer as the completion); the loss covers the completion tokens only. LoRA
(peft) when ``lora: true``, else full fine-tuning. Writes, in ``output_dir``: ``checkpoint-N/``
(resumable with ``--resume``), ``final/`` (the LoRA adapter or the full model, with the processor),
``train_log.jsonl`` (the trainer's log history), ``loss.png`` and ``run.json`` (the resolved config).
``training/export_bundle.py`` turns ``final/`` or a checkpoint into a MONAI bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python training/sft.py` from anywhere

from medreasoner.constants import CRM_SIDECAR as SIDECAR  # noqa: E402
from training.common import (  # noqa: E402
    TrainConfig,
    arg_parser,
    is_main_process,
    load_config,
    newest_checkpoint,
    report_to,
    resolve_precision,
    training_dataset,
)

log = logging.getLogger("medreasoner.training.sft")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _model_path(cfg: TrainConfig) -> str:
    """A local model folder as an absolute path (LoRA adapters record it for the export); hub ids as is."""
    p = Path(cfg.model).expanduser()
    return str(p.resolve()) if p.exists() else cfg.model


def _using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _model_dtype(cfg: TrainConfig, bf16: bool):
    """Weights' dtype at load time.

    LoRA: the frozen base in bf16 when training in bf16 (peft keeps the adapter in fp32). Full
    fine-tuning: bf16 only under DeepSpeed (which keeps fp32 master weights); otherwise fp32 weights
    with bf16 autocast, since bf16 weights lose updates of lr ~5e-6.
    """
    import torch

    if bf16 and (cfg.lora or _using_deepspeed()):
        return torch.bfloat16
    return torch.float32


def _plot_loss(log_history: list[dict], path: Path, title: str) -> bool:
    """Training loss (and learning rate, second axis) per step, as a PNG; False when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    if not loss:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*loss), marker="o" if len(loss) < 30 else None, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    lr = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h and "step" in h]
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="tab:gray", linestyle="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _sidecar_callback(source: Path | None):
    """A TrainerCallback copying the model's ``medreasoner_crm.json`` into every checkpoint."""
    from transformers import TrainerCallback

    class CopySidecar(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if source is not None and state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    shutil.copy2(source, ckpt / SIDECAR)
            return control

    return CopySidecar()


def build_dataset(cfg: TrainConfig):
    """prompt / completion / image rows as a ``datasets.Dataset``.

    A Dataset (not the plain list) matters: TRL's vision collator pops ``image`` from and rewrites
    ``prompt`` in the examples it gets, and a Dataset hands out fresh dicts on every access.
    """
    return training_dataset(cfg, with_answers=True, columns=("prompt", "completion", "image"))


def sft_config(cfg: TrainConfig):
    import torch
    from trl import SFTConfig

    bf16, gc = resolve_precision(cfg)
    cuda = torch.cuda.is_available()
    if not 0 <= cfg.warmup_ratio < 1:
        raise SystemExit(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    return SFTConfig(
        output_dir=cfg.output_dir,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio (warmup_ratio is gone)
        bf16=bf16,  # set explicitly: TRL's default is bf16=True
        gradient_checkpointing=gc,  # set explicitly: TRL's default is True
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        seed=cfg.seed,
        report_to=report_to(cfg),
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        # prompt-completion data: loss on the completion only (TRL would infer it; stated for clarity)
        completion_only_loss=True,
        # No truncation: a VLM prompt cannot be cut safely (image tokens), and a cut answer is a wrong
        # target. U-MRG rows are ~1.5k tokens at 840 px; max_prompt/completion_length are not used here.
        max_length=None,
        remove_unused_columns=True,  # vision datasets keep prompt/completion/image only
        trust_remote_code=False,
    )


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run SFT; return the ``final/`` folder."""
    out = Path(cfg.output_dir)
    resume_from = None
    if resume:
        resume_from = newest_checkpoint(cfg.output_dir)
        if resume_from is None:
            raise SystemExit(f"--resume: no checkpoint-* folder in {out}")
    elif out.is_dir() and (newest_checkpoint(cfg.output_dir) or (out / "final").exists()):
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it, or choose another output_dir")

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTTrainer

    args = sft_config(cfg)  # before the model: under DeepSpeed ZeRO-3 this sets up sharded loading
    bf16, gc = args.bf16, args.gradient_checkpointing
    model_path = _model_path(cfg)
    dataset = build_dataset(cfg)
    log.info("SFT on %d samples from %s (split %s)", len(dataset), cfg.data, cfg.split)

    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=False)
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=_model_dtype(cfg, bf16),
                                                        trust_remote_code=False)
    if gc:
        model.config.use_cache = False

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")

    sidecar = Path(model_path) / SIDECAR
    sidecar = sidecar if sidecar.is_file() else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config, callbacks=[_sidecar_callback(sidecar)])
    if cfg.lora and is_main_process():
        trainer.model.print_trainable_parameters()

    run_info: dict[str, Any] = {
        "kind": "sft",
        "config": dataclasses.asdict(cfg),
        "resolved": {"model": model_path, "bf16": bf16, "gradient_checkpointing": gc,
                     "dtype": str(_model_dtype(cfg, bf16)).replace("torch.", ""), "deepspeed": _using_deepspeed(),
                     "report_to": args.report_to, "world_size": args.world_size, "samples": len(dataset),
                     "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "resumed_from": resume_from,
        "argv": sys.argv,
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "run.json", run_info)

    result = trainer.train(resume_from_checkpoint=resume_from)

    final = out / "final"
    trainer.save_model(str(final))  # LoRA: the adapter only; full: the whole model (gathered under ZeRO-3)
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(final))
        if sidecar is not None:
            shutil.copy2(sidecar, final / SIDECAR)
        history = trainer.state.log_history
        tmp = out / ".train_log.jsonl.tmp"
        with tmp.open("w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, out / "train_log.jsonl")
        plotted = _plot_loss(history, out / "loss.png", f"SFT {Path(cfg.output_dir).name}")
        run_info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), global_step=trainer.state.global_step,
                        train_metrics=result.metrics, final=str(final), adapter=bool(cfg.lora),
                        loss_plot=str(out / "loss.png") if plotted else None)
        _write_json(out / "run.json", run_info)
        print(f"final {'LoRA adapter' if cfg.lora else 'model'}: {final}")
        print(f"export: python training/export_bundle.py {final} --bundle monai_bundle --out BUNDLE_DIR")
    return final


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = arg_parser("SFT baseline for the MedReasoner CRM (TRL SFTTrainer)").parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.data:
        raise SystemExit("no training data: set `data` in the config or pass --set data=PATH")
    train(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
