"""GRPO training of a Qwen2.5-VL-family CRM on MedReasoner's rewards, with TRL's GRPOTrainer.

    python -m training.grpo --config training/configs/grpo_soft.yaml [--any_field value ...] [--resume]
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/grpo.py --config ...

Arguments are TRL's own: every ``trl.GRPOConfig`` and ``trl.ModelConfig`` field, plus MedReasoner's
few (:class:`training.common.MedReasonerArguments`), from the YAML file and the command line (which
wins), parsed by ``trl.TrlParser`` as in TRL's example scripts. Rows come from the U-MRG loader (image
resized to the model's input size, the reasoning prompt, the ground truth in model pixels); rewards
are ``medreasoner.science.rewards`` components (soft / hard / base), each logged separately, plus an
optional mask-Dice reward from a real ASM. Checkpoints every ``save_steps``; ``--resume`` restores
weights, optimizer, scheduler, RNG and the data position.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_DISABLED", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from medreasoner.constants import CRM_SIDECAR  # noqa: E402
from training.common import (  # noqa: E402
    MedReasonerArguments,
    is_main_process,
    local_model_path,
    model_dtype,
    model_image_size,
    model_load_kwargs,
    parse_args,
    peft_config,
    plot_curves,
    resume_checkpoint,
    run_config,
    training_dataset,
)


def _asm_device() -> str:
    """Each process's own GPU under accelerate/torchrun (LOCAL_RANK), else the ASM's default."""
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return "auto"


def mask_dice_reward(med: MedReasonerArguments, asm=None):
    """Reward = Dice between the ASM's mask for the answered box + points and the GT mask.

    The G completions of one prompt share its image: each call groups the completions by the image's
    pixels, encodes every distinct image once (in the ASM's batches) and decodes each completion's
    prompts on that embedding. ``asm`` takes an already loaded ASM (tests); the returned function's
    ``counts`` say how many images were encoded and how many masks decoded.
    """
    import numpy as np

    from medreasoner.engine import ModelOptions, load_models
    from medreasoner.engine.cache import array_digest
    from medreasoner.models.answer import parse_completion
    from medreasoner.science.metrics import mask_dice
    from medreasoner.science.rewards import completion_text

    # The ASM only: completions come from the policy being trained.
    models = load_models(ModelOptions(asm=med.mask_reward_asm, asm_checkpoint=med.mask_reward_checkpoint,
                                      device=_asm_device()), with_crm=False, asm=asm)
    counts = {"calls": 0, "completions": 0, "asm_encodes": 0, "asm_decodes": 0}

    def mask_dice_asm(completions, image, mask=None, **_):
        counts["calls"] += 1
        counts["completions"] += len(completions)
        masks = mask if mask is not None else [None] * len(completions)
        out = [0.0] * len(completions)
        groups: dict[str, list[tuple[int, object, np.ndarray]]] = {}  # image digest -> its completions
        frames: dict[str, np.ndarray] = {}
        for i, (c, im, m) in enumerate(zip(completions, image, masks)):
            if m is None:
                continue
            rgb = np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im)
            a = parse_completion(completion_text(c), image_size=(rgb.shape[1], rgb.shape[0]))
            if a.box is None:
                continue  # no box, no mask: 0, and no encode for an image nobody prompts
            key = array_digest(rgb)
            frames.setdefault(key, rgb)
            groups.setdefault(key, []).append((i, a, np.asarray(m) > 0))
        keys = list(groups)
        step = max(1, int(getattr(models.asm, "batch_size", 1) or 1))
        for s in range(0, len(keys), step):  # a batch of distinct images at a time bounds the memory held
            chunk = keys[s:s + step]
            with models.asm_lock:
                embeddings = models.asm.encode([frames[k] for k in chunk])
                counts["asm_encodes"] += len(chunk)
                for key, emb in zip(chunk, embeddings):
                    for i, a, gt in groups[key]:
                        try:
                            pred = models.asm.decode(emb, a.box, a.points).mask
                        except ValueError:  # a degenerate box the ASM refuses: no mask, reward 0
                            continue
                        counts["asm_decodes"] += 1
                        out[i] = float(mask_dice(pred, gt))
        return out

    mask_dice_asm.counts = counts
    return mask_dice_asm


def build_trainer(med: MedReasonerArguments, args, model_args):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOTrainer

    from medreasoner.science.rewards import component_rewards

    rewards = component_rewards(med.reward)  # an unknown mode fails here, before anything loads
    if med.mask_reward:
        rewards.append(mask_dice_reward(med))
    model_path = local_model_path(model_args.model_name_or_path)
    dataset = training_dataset(med, model_image_size(med, model_path), Path(args.output_dir) / ".dataset_cache")
    processor = AutoProcessor.from_pretrained(model_path, padding_side="left", revision=model_args.model_revision,
                                              trust_remote_code=bool(args.trust_remote_code))
    dtype = model_dtype(model_args, torch.bfloat16 if args.bf16 else torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(model_path, **model_load_kwargs(model_args, args, dtype))
    _check_prompt_length(processor, dataset[0], med.max_prompt_length)
    return GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                       processing_class=processor, peft_config=peft_config(model_args))


def _check_prompt_length(processor, row, max_prompt_length: int) -> None:
    """VLM prompts cannot be truncated safely (image tokens); refuse overlong ones up front."""
    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    n = len(processor(text=[text], images=[row["image"]], return_tensors="pt")["input_ids"][0])
    if n > max_prompt_length:
        raise SystemExit(f"prompt is {n} tokens (image included) > max_prompt_length {max_prompt_length}; "
                         "lower image_size or raise max_prompt_length")


def parse(argv: list[str] | None = None):
    """``(MedReasonerArguments, GRPOConfig, ModelConfig)`` from ``--config`` and the command line."""
    from trl import GRPOConfig

    return parse_args(GRPOConfig, argv, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    med, args, model_args = parse(argv)
    out = Path(args.output_dir)
    resume = resume_checkpoint(med, args)
    if med.resume and resume is None:
        print(f"--resume: no checkpoint in {out}; starting from scratch", file=sys.stderr)
    trainer = build_trainer(med, args, model_args)
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    trainer.save_model(str(final))  # every rank: ZeRO-3 gathers the shards; only rank 0 writes
    if is_main_process():
        sidecar = Path(model_args.model_name_or_path) / CRM_SIDECAR
        if sidecar.is_file():  # keep the tiny-model marker and input size with the trained weights
            (final / sidecar.name).write_text(sidecar.read_text())
        info = {"kind": "grpo", "config": run_config(med, args, model_args), "resumed_from": resume,
                "argv": sys.argv, "global_step": trainer.state.global_step}
        mask = next((f for f in trainer.reward_funcs if getattr(f, "__name__", "") == "mask_dice_asm"), None)
        if mask is not None:  # this process's share: how many images the mask reward encoded
            info["mask_reward_counts"] = dict(mask.counts)
        (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
        with (out / "train_log.jsonl").open("w") as f:
            for h in trainer.state.log_history:
                f.write(json.dumps(h) + "\n")
        plot_curves(trainer.state.log_history, out / "reward_curves.png",
                    f"GRPO ({med.reward}) {Path(model_args.model_name_or_path).name}")
        print(f"GRPO done: {trainer.state.global_step} steps on {trainer.accelerator.num_processes} process(es); "
              f"model in {final}; curves in {out / 'reward_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
