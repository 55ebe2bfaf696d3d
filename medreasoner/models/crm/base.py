"""What every CRM backend returns, and the contract it follows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreasoner.constants import DEFAULT_CRM, DEFAULT_MAX_NEW_TOKENS  # noqa: F401 - re-exported
from medreasoner.imaging.resize import ResizeMap
from medreasoner.models.answer import ParsedAnswer, parse_completion
from medreasoner.models.prompts import PromptKind, PromptTemplate, build_prompt, effective_template


@dataclass
class CRMAnswer:
    """One CRM call: the raw completion and the answer mapped to original image pixels."""

    text: str
    answer: ParsedAnswer
    resize: ResizeMap
    seconds: float = 0.0
    confidence: float | None = None  # geometric-mean token probability of the completion, if known

    def to_dict(self) -> dict[str, Any]:
        return {
            "completion": self.text,
            "answer": self.answer.to_dict(),
            "model_input_size": [self.resize.model_w, self.resize.model_h],
            "seconds": round(self.seconds, 4),
            "confidence": self.confidence,
        }


def answer_in_original_pixels(text: str, resize: ResizeMap) -> ParsedAnswer:
    """Parse in the model's pixel space (where clipping is meaningful), then map back exactly."""
    parsed = parse_completion(text, image_size=(resize.model_w, resize.model_h))
    if parsed.box is not None:
        parsed.box = resize.box_to_orig(parsed.box)
    if parsed.points is not None:
        parsed.points = [resize.point_to_orig(p) for p in parsed.points]
    return parsed


class CRM(ABC):
    """A vision-language model that answers a box and two points for (image, question)."""

    name: str = "crm"
    model_id: str = ""
    is_tiny: bool = False  # a random/format-only test model: outputs carry a loud warning
    # replaces the built-in wording for every question when set (--prompt-file, or the checkpoint's sidecar)
    prompt_template: PromptTemplate | None = None

    @abstractmethod
    def answer_batch(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str],
        prompt: PromptKind = "reasoning",
    ) -> list[CRMAnswer]:
        """Answer for each (RGB uint8 image, question) pair; order is preserved."""

    def answer(self, image: np.ndarray, question: str, prompt: PromptKind = "reasoning") -> CRMAnswer:
        return self.answer_batch([image], [question], prompt)[0]

    def prompt_text(self, question: str, prompt: PromptKind = "reasoning") -> str:
        """The user text sent with the image: the template's when this CRM has one, else the built-in
        ``prompt`` wording."""
        return build_prompt(question, prompt, self.prompt_template)

    def prompt_info(self, prompt: PromptKind = "reasoning") -> dict[str, str]:
        """``prompt``, ``prompt_sha256``, ``prompt_source`` of what :meth:`prompt_text` uses."""
        return effective_template(self, prompt).record()

    def describe(self) -> dict[str, Any]:
        from medreasoner.models.fingerprint import model_fingerprint

        return {"backend": self.name, "model": self.model_id, "fingerprint": model_fingerprint(self.model_id),
                "tiny_test_model": self.is_tiny, **self.extra_description()}

    def extra_description(self) -> dict[str, Any]:
        return {}


@dataclass
class GenerationConfig:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False  # greedy, as the reference evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
