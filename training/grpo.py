"""GRPO training of a Qwen2.5-VL-family CRM on MedReasoner's rewards, with TRL's GRPOTrainer.

    python training/grpo.py --config training/configs/grpo_soft.yaml [--set key=value ...] [--resume]
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/grpo.py --config ...

Rows come from the U-MRG loader (image resized to the model's input size, the reasoning prompt, the
ground truth in model pixels); rewards are ``medreasoner.science.rewards`` components (soft / hard / base),
each logged separately, plus an optional mask-Dice reward from a real ASM. Checkpoints every
``save_steps``; ``--resume`` restores weights, optimizer, scheduler, RNG and the data position.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from medreasoner.constants import CRM_SIDECAR

os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from training.common import (  # noqa: E402
    TrainConfig,
    arg_parser,
    is_main_process,
    load_config,
    newest_checkpoint,
    plot_curves,
    report_to,
    resolve_precision,
    training_dataset,
)


def mask_dice_reward(cfg: TrainConfig):
    """Reward = Dice between the ASM's mask for the answered box + points and the GT mask."""
    import numpy as np

    from medreasoner.engine import ModelOptions, Session, load_models
    from medreasoner.models.answer import parse_completion
    from medreasoner.science.metrics import mask_dice
    from medreasoner.science.rewards import completion_text

    # The ASM only: completions come from the policy being trained. The session caches each
    # image's embedding, so the group of completions for one prompt costs one encode.
    session = Session(load_models(ModelOptions(asm=cfg.mask_reward_asm, asm_checkpoint=cfg.mask_reward_checkpoint),
                                  with_crm=False), embedding_cache_mb=256)

    def mask_dice_asm(completions, image, mask=None, **_):
        out = []
        for c, im, m in zip(completions, image, mask if mask is not None else [None] * len(image)):
            rgb = np.asarray(im.convert("RGB"))
            a = parse_completion(completion_text(c), image_size=(rgb.shape[1], rgb.shape[0]))
            if m is None or a.box is None:
                out.append(0.0)
                continue
            pred = session.segment_image(rgb, a.box, a.points).mask
            out.append(float(mask_dice(pred, np.asarray(m) > 0)))
        return out

    return mask_dice_asm


def build_trainer(cfg: TrainConfig):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from medreasoner.science.rewards import component_rewards

    bf16, grad_ckpt = resolve_precision(cfg)
    dataset = training_dataset(cfg)
    processor = AutoProcessor.from_pretrained(cfg.model, padding_side="left", trust_remote_code=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype, trust_remote_code=False)
    rewards = component_rewards(cfg.reward)
    if cfg.mask_reward:
        rewards.append(mask_dice_reward(cfg))
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=cfg.output_dir, num_generations=cfg.num_generations, learning_rate=cfg.learning_rate,
        beta=cfg.beta, temperature=cfg.temperature, max_completion_length=cfg.max_completion_length,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        bf16=bf16, gradient_checkpointing=grad_ckpt, use_cpu=not torch.cuda.is_available(),
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, seed=cfg.seed, data_seed=cfg.seed, report_to=report_to(cfg),
        use_vllm=cfg.use_vllm, vllm_mode=cfg.vllm_mode, log_completions=False, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    _check_prompt_length(processor, dataset[0], cfg)
    return GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                       processing_class=processor, peft_config=peft_config)


def _check_prompt_length(processor, row, cfg: TrainConfig) -> None:
    """VLM prompts cannot be truncated safely (image tokens); refuse overlong ones up front."""
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    n = len(processor(text=[text], images=[row["image"]], return_tensors="pt")["input_ids"][0])
    if n > cfg.max_prompt_length:
        raise SystemExit(f"prompt is {n} tokens (image included) > max_prompt_length {cfg.max_prompt_length}; "
                         "lower image_size or raise max_prompt_length")


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.output_dir)
    resume = None
    if args.resume:
        resume = newest_checkpoint(cfg.output_dir)
        if resume is None:
            print(f"--resume: no checkpoint in {out}; starting from scratch", file=sys.stderr)
    trainer = build_trainer(cfg)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the shards; only rank 0 writes
    if is_main_process():
        sidecar = Path(cfg.model) / CRM_SIDECAR
        if sidecar.is_file():  # keep the tiny-model marker and input size with the trained weights
            (final / sidecar.name).write_text(sidecar.read_text())
        (out / "run.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        with (out / "train_log.jsonl").open("w") as f:
            for h in trainer.state.log_history:
                f.write(json.dumps(h) + "\n")
        plot_curves(trainer.state.log_history, out / "reward_curves.png", f"GRPO ({cfg.reward}) {Path(cfg.model).name}")
        print(f"GRPO done: {trainer.state.global_step} steps on {trainer.accelerator.num_processes} process(es); "
              f"model in {final}; curves in {out / 'reward_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
