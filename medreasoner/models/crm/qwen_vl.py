"""CRM backend for Qwen2.5-VL-family checkpoints through transformers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medreasoner.constants import CRM_SIDECAR as SIDECAR
from medreasoner.constants import DEFAULT_CRM_IMAGE_SIZE as DEFAULT_IMAGE_SIZE
from medreasoner.errors import InputError, ModelLoadError
from medreasoner.imaging.resize import ResizeMap, target_size
from medreasoner.models.crm.base import (
    CRM,
    DEFAULT_CRM,
    CRMAnswer,
    GenerationConfig,
    answer_in_original_pixels,
)
from medreasoner.models.prompts import PromptKind, PromptTemplate, checkpoint_template, messages_for
from medreasoner.models.registry import CRMS

log = logging.getLogger(__name__)

# What a local checkpoint folder needs; checked before transformers touches it, because with a file
# missing transformers either fails pages deep (truncated weights: a raw SafetensorError) or, worse,
# loads and runs (no tokenizer.json: an empty tokenizer that answers "" to every question).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZERS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
_PROCESSORS = ("preprocessor_config.json", "processor_config.json")
_TEMPLATES = ("chat_template.jinja", "chat_template.json")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"CRM file {path} is unreadable or not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"CRM file {path} must hold a JSON object")
    return data


def _check_safetensors(path: Path) -> None:
    """Header and size agree (a copy cut short, a download still running, a Git LFS pointer)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ModelLoadError(f"CRM weights {path} are not a safetensors file ({size} bytes; truncated, "
                                 "or a Git LFS pointer?)")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ModelLoadError(f"CRM weights {path} have a damaged safetensors header") from exc
    if 8 + n + end != size:
        raise ModelLoadError(f"CRM weights {path} are truncated or damaged: the header describes {8 + n + end} "
                             f"bytes, the file has {size}")


def check_checkpoint_files(folder: str | Path) -> None:
    """Refuse a local checkpoint folder that cannot work, naming the missing or damaged file
    (``ModelLoadError``, exit 3). Reads only small files and safetensors headers."""
    root = Path(folder).expanduser()
    config = root / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"CRM folder {root} has no config.json (is it a Hugging Face checkpoint folder?)")
    if "model_type" not in _json_file(config):
        raise ModelLoadError(f"CRM file {config} has no model_type")
    weights = next((root / w for w in _WEIGHTS if (root / w).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"CRM folder {root} has no weights (one of {', '.join(_WEIGHTS)})")
    shards = [weights]
    if weights.name.endswith(".index.json"):
        weight_map = _json_file(weights).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"CRM file {weights} has no weight_map")
        shards = [root / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelLoadError(f"CRM folder {root} lacks weight shard(s) listed in {weights.name}: "
                                 f"{', '.join(missing[:3])}" + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    for shard in shards:
        if shard.suffix == ".safetensors":
            _check_safetensors(shard)
        elif shard.stat().st_size == 0:
            raise ModelLoadError(f"CRM weights {shard} are empty")
    if not any(all((root / f).is_file() for f in group) for group in _TOKENIZERS):
        raise ModelLoadError(f"CRM folder {root} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    processor = next((root / f for f in _PROCESSORS if (root / f).is_file()), None)
    if processor is None:
        raise ModelLoadError(f"CRM folder {root} has no image processor config ({' or '.join(_PROCESSORS)})")
    configs = [processor] + [root / "tokenizer_config.json"] * (root / "tokenizer_config.json").is_file()
    if not any((root / f).is_file() for f in _TEMPLATES) and not any("chat_template" in _json_file(c)
                                                                     for c in configs):
        raise ModelLoadError(f"CRM folder {root} has no chat template ({' or '.join(_TEMPLATES)}, or "
                             "chat_template in tokenizer_config.json)")


def _read_sidecar(path: str) -> dict[str, Any]:
    """The checkpoint's ``medreasoner_crm.json`` (prompt, image size it was trained with), or {} when
    there is none. A damaged one is a load error: running without it would silently use other
    settings than the ones the checkpoint was trained with."""
    f = Path(path) / SIDECAR
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"CRM file {f} is unreadable or not JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"CRM file {f} must hold a JSON object; fix or remove it")
    return data


def sidecar_prompt_template(folder: str | Path) -> PromptTemplate | None:
    """The prompt template a local checkpoint's sidecar names (``prompt_template`` text or a
    ``prompt_file`` inside the folder), or None; a template that cannot be used is a ``ModelLoadError``."""
    if not Path(folder).expanduser().is_dir():
        return None
    try:
        return checkpoint_template(Path(folder).expanduser(), _read_sidecar(str(Path(folder).expanduser())))
    except InputError as exc:
        raise ModelLoadError(f"CRM {folder}: {exc}") from exc


class QwenVLCRM(CRM):
    name = "transformers"

    def __init__(
        self,
        model: str = DEFAULT_CRM,
        device: str | None = "auto",
        dtype: str | None = "auto",
        image_size: int | tuple[int, int] | None | str = "auto",
        generation: GenerationConfig | None = None,
        batch_size: int = 4,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        self.model_id = str(model)
        local = Path(self.model_id).expanduser()
        if not local.exists() and (self.model_id.startswith((".", "/", "~")) or self.model_id.count("/") != 1):
            raise ModelLoadError(f"CRM folder not found: {self.model_id}")
        if local.is_dir():
            check_checkpoint_files(local)  # before torch/transformers import, and before a byte of weights is read
        self.prompt_template = sidecar_prompt_template(local)  # --prompt-file replaces it after the load

        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from medreasoner.models.devices import default_dtype, resolve_device

        self.device = resolve_device(device)
        self.dtype = default_dtype(self.device, dtype)
        self.generation = generation or GenerationConfig()
        self.batch_size = max(1, int(batch_size))
        sidecar = _read_sidecar(self.model_id) if Path(self.model_id).is_dir() else {}
        self.is_tiny = bool(sidecar.get("tiny_test_model", False))
        if image_size == "auto":
            image_size = sidecar.get("image_size", DEFAULT_IMAGE_SIZE)
        self.image_size = image_size
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            self.processor = AutoProcessor.from_pretrained(
                self.model_id, padding_side="left", trust_remote_code=trust_remote_code
            )
            self._check_image_size()
            self._check_chat_template()
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_id, **kwargs)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure (safetensors, config, imports) is a model error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "" if local.exists() else (
                " It is not a local folder, and the hub could not provide it (offline?). "
                "Download it once (huggingface-cli download ID --local-dir DIR) and pass the folder."
            )
            raise ModelLoadError(f"could not load CRM {self.model_id!r}: {first}.{hint}") from exc
        self.model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # batched decoding needs left padding
        self._torch = torch
        if self.is_tiny:
            log.warning("CRM %s is a TINY TEST MODEL: its answers are meaningless", self.model_id)

    def _check_chat_template(self) -> None:
        """Render the chat template once before the weights load: a broken template is a load error
        naming it, not a Jinja traceback on the first question."""
        from medreasoner.models.prompts import messages_for

        try:
            text = self.processor.apply_chat_template(messages_for("check"), tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - Jinja syntax/undefined errors and a missing template alike
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"the chat template of CRM {self.model_id} cannot be rendered: {first}") from exc
        token = getattr(self.processor, "image_token", None)
        if isinstance(text, str) and isinstance(token, str) and token not in text:
            # the processor would then fail on every question ("0 image tokens and 1 images")
            raise ModelLoadError(f"the chat template of CRM {self.model_id} renders no image placeholder "
                                 f"({token}); it must place the image in the user turn")

    def _check_image_size(self) -> None:
        """Warn when the requested square is above this checkpoint's processor cap: the processor
        shrinks it back, so the model sees less than was asked for (coordinates stay exact)."""
        if not isinstance(self.image_size, int):
            return
        proc = getattr(self.processor, "image_processor", None)
        size = getattr(proc, "size", None)  # a dict in older transformers, a SizeDict in newer ones
        cap = getattr(proc, "max_pixels", None) or (size.get("longest_edge") if isinstance(size, dict)
                                                    else getattr(size, "longest_edge", None))
        if cap and self.image_size ** 2 > int(cap):
            log.warning("image size %d is above this checkpoint's processor limit (max_pixels %d, about %dx%d): "
                        "the model sees the smaller image", self.image_size, int(cap), int(cap ** 0.5), int(cap ** 0.5))

    def extra_description(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "image_size": self.image_size, "max_new_tokens": self.generation.max_new_tokens,
                "greedy": not self.generation.do_sample}

    def _prepare(self, image: np.ndarray):
        from PIL import Image

        h, w = image.shape[:2]
        tw, th = target_size(w, h, self.image_size)
        pil = Image.fromarray(image)
        if (tw, th) != (w, h):
            pil = pil.resize((tw, th), Image.BICUBIC)
        return pil, (w, h)

    def _seen_sizes(self, grid_thw) -> list[tuple[int, int]]:
        # The processor may round sizes to its patch grid: read back what the model really saw.
        patch = int(getattr(self.processor.image_processor, "patch_size", 14))
        return [(int(g[2]) * patch, int(g[1]) * patch) for g in grid_thw.tolist()]

    def answer_batch(
        self, images: Sequence[np.ndarray], questions: Sequence[str], prompt: PromptKind = "reasoning"
    ) -> list[CRMAnswer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        out: list[CRMAnswer] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._generate(images[start:start + self.batch_size],
                                      questions[start:start + self.batch_size], prompt))
        return out

    def _generate(self, images, questions, prompt) -> list[CRMAnswer]:
        torch = self._torch
        t0 = time.perf_counter()
        prepared = [self._prepare(np.asarray(im)) for im in images]
        texts = self._chat_texts(questions, prompt)
        inputs = self.processor(text=texts, images=[p for p, _ in prepared], padding=True,
                                return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        gen = self.generation
        kwargs: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        kwargs.update(gen.extra)
        with torch.inference_mode():
            gen_out = self.model.generate(**inputs, **kwargs, output_scores=True, return_dict_in_generate=True)
            new = gen_out.sequences[:, inputs["input_ids"].shape[1]:]
            confidences = self._confidences(gen_out, new)
        completions = self.processor.batch_decode(new, skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
        seen = self._seen_sizes(inputs["image_grid_thw"])
        per = (time.perf_counter() - t0) / len(images)
        answers = []
        for text, (_, (w, h)), (sw, sh), conf in zip(completions, prepared, seen, confidences):
            rmap = ResizeMap(w, h, sw, sh)
            answers.append(CRMAnswer(text, answer_in_original_pixels(text, rmap), rmap, per, conf))
        return answers

    def _chat_texts(self, questions: Sequence[str], prompt: PromptKind) -> list[str]:
        """The processor's chat text for each question: the image, then :meth:`prompt_text`."""
        return [self.processor.apply_chat_template(messages_for(self.prompt_text(q, prompt)), tokenize=False,
                                                   add_generation_prompt=True)
                for q in questions]

    def _confidences(self, gen_out, new) -> list[float | None]:
        """exp(mean log-probability) of each completion's tokens, padding after EOS excluded."""
        torch = self._torch
        try:
            logp = self.model.compute_transition_scores(gen_out.sequences, gen_out.scores, normalize_logits=True)
        except Exception:  # noqa: BLE001 - confidence is a nicety; generation already succeeded
            return [None] * new.shape[0]
        pad = self.processor.tokenizer.pad_token_id
        valid = torch.ones_like(new, dtype=torch.bool) if pad is None else new != pad
        logp = torch.where(valid, logp.float(), torch.zeros_like(logp, dtype=torch.float32))
        n = valid.sum(dim=1).clamp(min=1)
        return [float(v) for v in torch.exp(logp.sum(dim=1) / n)]


@CRMS.register("transformers", help="Qwen2.5-VL-family checkpoint through transformers (local folder or hub id)")
def _make_qwen(**kwargs: Any) -> QwenVLCRM:
    return QwenVLCRM(**kwargs)
