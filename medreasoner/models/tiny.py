"""Tiny offline models with the real architectures, for tests and the offline demo.

``build_tiny_crm`` writes a Qwen2.5-VL checkpoint (random weights, a byte-level BPE tokenizer
trained here, the Qwen chat template, a real processor) that loads through the same
``from_pretrained`` code as real weights. With ``format_steps > 0`` it is then trained for a few
steps on synthetic images so that it answers in the <think>/<answer> format; its boxes still mean
nothing. ``build_tiny_sam2`` writes a random SAM2 checkpoint for MedSAM2's 512 config.
Everything made here is marked as a tiny test model, and outputs made with it say so.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from medreasoner.constants import CRM_SIDECAR
from medreasoner.models.prompts import ANSWER_EXAMPLE, build_messages, build_prompt

TINY_IMAGE_SIZE = 112  # 8x8 merged patches: cheap, and the processor keeps it unchanged
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# The Qwen2-VL chat template's token layout (system turn, vision markers, assistant header).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2's pre-tokenizer split pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TINY_QUERIES = [
    "Which region is the brightest structure in this scan?",
    "Where is the finding that would explain the patient's symptoms?",
    "Segment the organ responsible for filtering blood.",
    "Which area would a radiologist look at first?",
]
TINY_THINK = "The bright compact region stands out from the darker background, so it is the target."


def _answer_text(box, p1, p2) -> str:
    return (f"<think>{TINY_THINK}</think><answer>{{'bbox': [{box[0]}, {box[1]}, {box[2]}, {box[3]}], "
            f"'points_1': [{p1[0]}, {p1[1]}], 'points_2': [{p2[0]}, {p2[1]}]}}</answer>")


def _train_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [build_prompt(q, k) for q in TINY_QUERIES for k in ("reasoning", "direct")]
    corpus += [_answer_text((i, i + 1, i + 22, i + 33), (i + 4, i + 5), (i + 6, i + 7)) for i in range(100)]
    corpus += [ANSWER_EXAMPLE, "You are a helpful assistant.", "system user assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 5, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _synthetic_sample(rng: random.Random, size: int):
    """Noise with one bright rectangle; the answer is that rectangle (model pixel space)."""
    img = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
    x1, y1 = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
    img[y1:y1 + h, x1:x1 + w] = rng.randint(180, 255)
    box = (x1, y1, x1 + w, y1 + h)
    p1 = (x1 + w // 2, y1 + h // 2)
    p2 = (x1 + w // 4, y1 + h // 4)
    return img, _answer_text(box, p1, p2)


def build_tiny_crm(out_dir: str | Path, format_steps: int = 0, seed: int = 0, vocab_size: int = 1200) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint to ``out_dir`` and return the folder."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_tokenizer(vocab_size)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", extra_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}
    image_processor = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=size)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, size=size)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    hidden = 64
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    if format_steps > 0:
        _teach_format(model, processor, format_steps, seed)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / CRM_SIDECAR).write_text(json.dumps({
        "tiny_test_model": True,
        "image_size": TINY_IMAGE_SIZE,
        "format_steps": format_steps,
        "note": "Tiny test model made by `medreasoner make-tiny`: random weights"
                + (", trained only to answer in the expected format" if format_steps else "")
                + ". Its boxes, points and reasoning carry no medical meaning.",
    }, indent=2))
    return out


def _teach_format(model, processor, steps: int, seed: int, batch: int = 4) -> None:
    """Teacher-forced steps on synthetic samples so generations follow the answer format."""
    import torch
    from PIL import Image

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        prompts, full, images = [], [], []
        for _ in range(batch):
            img, answer = _synthetic_sample(rng, TINY_IMAGE_SIZE)
            msgs = build_messages(rng.choice(TINY_QUERIES), rng.choice(["reasoning", "direct"]))
            prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            prompts.append(prompt)
            full.append(prompt + answer + "<|im_end|>")
            images.append(Image.fromarray(img))
        processor.tokenizer.padding_side = "right"
        enc = processor(text=full, images=images, padding=True, return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for i, p in enumerate(prompts):  # learn only the answer, not the prompt
            n_prompt = len(processor(text=[p], images=[images[i]], return_tensors="pt")["input_ids"][0])
            labels[i, :n_prompt] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    processor.tokenizer.padding_side = "left"


def build_tiny_sam2(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight SAM2 checkpoint ({"model": state_dict}) for MedSAM2's 512 config."""
    import torch

    from medreasoner.models.asm.sam2_asm import build_sam2_model, medsam2_config_path

    torch.manual_seed(seed)
    model = build_sam2_model(medsam2_config_path(), checkpoint=None, device="cpu")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": state, "medreasoner_tiny_test_model": True}, p)
    return p
