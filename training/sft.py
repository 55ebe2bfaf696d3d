"""SFT baseline: teach the CRM to answer U-MRG questions with the ground-truth box and key points.

    python -m training.sft --config training/configs/sft.yaml [--any_field value ...] [--resume]

Multi-GPU (the reference baseline used DeepSpeed ZeRO-3; the config comments say how to launch it):

    accelerate launch --config_file training/accelerate/deepspeed_zero3.yaml training/sft.py \
        --config training/configs/sft.yaml

Arguments are TRL's own: every ``trl.SFTConfig`` and ``trl.ModelConfig`` field, plus MedReasoner's few
(:class:`training.common.MedReasonerArguments`), from the YAML file and the command line (which wins).
TRL's ``SFTTrainer`` on prompt-completion rows from :func:`training.common.iter_rows` (chat prompt
with one image, the answer as the completion); the loss covers the completion tokens only. LoRA
(peft) when ``use_peft: true``, else full fine-tuning. Writes, in ``output_dir``: ``checkpoint-N/``
(resumable with ``--resume``), ``final/`` (the LoRA adapter or the full model, with the processor),
``train_log.jsonl`` (the trainer's log history), ``loss.png`` and ``run.json`` (every setting).
``training/export_bundle.py`` turns ``final/`` or a checkpoint into a MONAI bundle.
"""

from __future__ import annotations

import contextlib
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
from medreasoner.io.files import atomic_write_bytes, atomic_write_with  # noqa: E402
from training.common import (  # noqa: E402
    MedReasonerArguments,
    is_main_process,
    local_model_path,
    model_dtype,
    model_image_size,
    model_load_kwargs,
    newest_checkpoint,
    parse_args,
    peft_config,
    resume_checkpoint,
    run_config,
    training_dataset,
)

log = logging.getLogger("medreasoner.training.sft")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so readers never see half a file."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _model_dtype(model_args, bf16: bool):
    """Weights' dtype at load time: ModelConfig's ``dtype`` when given, else

    LoRA: the frozen base in bf16 when training in bf16 (peft keeps the adapter in fp32). Full
    fine-tuning: bf16 only under DeepSpeed (which keeps fp32 master weights); otherwise fp32 weights
    with bf16 autocast, since bf16 weights lose updates of lr ~5e-6.
    """
    import torch

    if bf16 and (model_args.use_peft or _using_deepspeed()):
        return model_dtype(model_args, torch.bfloat16)
    return model_dtype(model_args, torch.float32)


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
    atomic_write_with(path, lambda f: fig.savefig(f, dpi=90, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
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


def build_dataset(med: MedReasonerArguments, args, model_path: str):
    """prompt / completion / image rows as a ``datasets.Dataset``.

    A Dataset (not the plain list) matters: TRL's vision collator pops ``image`` from and rewrites
    ``prompt`` in the examples it gets, and a Dataset hands out fresh dicts on every access.
    """
    return training_dataset(med, model_image_size(med, model_path), Path(args.output_dir) / ".dataset_cache",
                            with_answers=True, columns=("prompt", "completion", "image"))


# SFTConfig values this entry point needs unless the YAML file or the command line says otherwise.
SFT_DEFAULTS = {
    # prompt-completion data: loss on the completion only (TRL would infer it; stated for clarity)
    "completion_only_loss": True,
    # No truncation: a VLM prompt cannot be cut safely (image tokens), and a cut answer is a wrong
    # target. U-MRG rows are ~1.5k tokens at 840 px (SFTConfig's default max_length is 1024).
    "max_length": None,
    "logging_first_step": True,
}


def parse(argv: list[str] | None = None):
    """``(MedReasonerArguments, SFTConfig, ModelConfig)`` from ``--config`` and the command line."""
    from trl import SFTConfig

    return parse_args(SFTConfig, argv, description="SFT baseline for the MedReasoner CRM (TRL SFTTrainer)",
                      defaults=SFT_DEFAULTS)


def train(med: MedReasonerArguments, args, model_args) -> Path:
    """Run SFT; return the ``final/`` folder. ``args`` is the SFTConfig: parsing it first matters,
    since under DeepSpeed ZeRO-3 it sets up the sharded model loading."""
    out = Path(args.output_dir)
    resume_from = resume_checkpoint(med, args)
    if med.resume and resume_from is None:
        raise SystemExit(f"--resume: no checkpoint-* folder in {out}")
    if resume_from is None and out.is_dir() and (newest_checkpoint(str(out)) or (out / "final").exists()):
        raise SystemExit(f"{out} already holds a run; pass --resume to continue it, or choose another output_dir")

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTTrainer

    bf16, gc = args.bf16, args.gradient_checkpointing
    model_path = local_model_path(model_args.model_name_or_path)
    dataset = build_dataset(med, args, model_path)
    log.info("SFT on %d samples from %s (split %s)", len(dataset), med.data, med.split)

    processor = AutoProcessor.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=bool(args.trust_remote_code))
    dtype = _model_dtype(model_args, bf16)
    model = AutoModelForImageTextToText.from_pretrained(model_path, **model_load_kwargs(model_args, args, dtype))
    if gc:
        model.config.use_cache = False

    sidecar = Path(model_path) / SIDECAR
    sidecar = sidecar if sidecar.is_file() else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config(model_args), callbacks=[_sidecar_callback(sidecar)])
    if model_args.use_peft and is_main_process():
        trainer.model.print_trainable_parameters()

    run_info: dict[str, Any] = {
        "kind": "sft",
        "config": run_config(med, args, model_args),
        "resolved": {"model": model_path, "bf16": bf16, "gradient_checkpointing": gc,
                     "dtype": str(dtype).replace("torch.", ""), "deepspeed": _using_deepspeed(),
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
        atomic_write_bytes(out / "train_log.jsonl", "".join(json.dumps(row) + "\n" for row in history).encode())
        plotted = _plot_loss(history, out / "loss.png", f"SFT {out.name}")
        run_info.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), global_step=trainer.state.global_step,
                        train_metrics=result.metrics, final=str(final), adapter=bool(model_args.use_peft),
                        loss_plot=str(out / "loss.png") if plotted else None)
        _write_json(out / "run.json", run_info)
        print(f"final {'LoRA adapter' if model_args.use_peft else 'model'}: {final}")
        print(f"export: python training/export_bundle.py {final} --bundle monai_bundle --out BUNDLE_DIR")
    return final


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(*parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
