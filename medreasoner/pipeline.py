"""Image + implicit question -> CRM reasoning -> box + 2 points -> ASM mask, batched.

``GroundingPipeline.run`` reports progress through a callback and checks a cancel flag between
batches, so a GUI or a subprocess driver can show a bar and stop the job cleanly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from medreasoner.answer import AnswerStatus, ParsedAnswer
from medreasoner.asm.base import ASM
from medreasoner.crm.base import CRM, CRMAnswer
from medreasoner.errors import CancelledError, InputError
from medreasoner.prompts import PromptKind

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

TINY_WARNING = ("TINY TEST MODEL OUTPUT: made with random/format-only test weights; "
                "the box, points, reasoning and mask have no medical meaning.")


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class ResultStatus:
    OK = "ok"  # a mask was produced
    NO_TARGET = "no_target"  # the CRM gave no usable box: the mask is empty, `message` says why


@dataclass
class GroundingResult:
    """Everything a user looks at for one (image, question): JSON-serialisable via ``to_dict``."""

    query: str
    status: str
    answer: ParsedAnswer
    mask: np.ndarray  # bool (H, W), original image size; all False when status is no_target
    mask_score: float | None
    completion: str
    image_size: tuple[int, int]  # (width, height) of the input
    model_input_size: tuple[int, int]
    crm: dict[str, Any]
    asm: dict[str, Any]
    prompt: str
    asm_prompt: str | None = None
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == ResultStatus.OK

    def to_dict(self) -> dict[str, Any]:
        a = self.answer
        return {
            "query": self.query,
            "status": self.status,
            "message": self.message,
            "warnings": self.warnings,
            "reasoning": a.think,
            "box": list(a.box) if a.box else None,
            "points": [list(p) for p in a.points] if a.points else None,
            "answer_status": a.status.value,
            "answer_repairs": a.repairs,
            "answer_message": a.message,
            "completion": self.completion,
            "mask_area_px": int(self.mask.sum()),
            "mask_score": self.mask_score,
            "asm_prompt": self.asm_prompt,
            "image_size": list(self.image_size),
            "model_input_size": list(self.model_input_size),
            "prompt": self.prompt,
            "crm": self.crm,
            "asm": self.asm,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "coordinates": "pixels of the input image, x right, y down, continuous (pixel i spans [i, i+1))",
        }


def check_query(query: Any) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; type a question about the image")
    return query.strip()


class GroundingPipeline:
    def __init__(self, crm: CRM, asm: ASM, prompt: PromptKind = "reasoning", batch_size: int = 4):
        self.crm = crm
        self.asm = asm
        self.prompt = prompt
        self.batch_size = max(1, int(batch_size))

    def run(
        self,
        images: Sequence[np.ndarray],
        queries: Sequence[str],
        progress: ProgressFn | None = None,
        cancel: CancelFlag | None = None,
    ) -> list[GroundingResult]:
        """Ground each (RGB uint8 image, query) pair. Bad queries raise before any model runs."""
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries")
        queries = [check_query(q) for q in queries]
        for im in images:
            if np.asarray(im).ndim != 3 or np.asarray(im).shape[-1] != 3:
                raise InputError(f"pipeline images must be RGB (H, W, 3); got shape {np.asarray(im).shape}")
        total = len(images)
        results: list[GroundingResult] = []
        for s in range(0, total, self.batch_size):
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"cancelled after {s} of {total} images")
            results.extend(self._batch(images[s:s + self.batch_size], queries[s:s + self.batch_size]))
            if progress is not None:
                progress("ground", len(results), total)
        return results

    def ground(self, image: np.ndarray, query: str) -> GroundingResult:
        return self.run([image], [query])[0]

    def _batch(self, images, queries) -> list[GroundingResult]:
        t0 = time.perf_counter()
        answers: list[CRMAnswer] = self.crm.answer_batch(images, queries, self.prompt)
        t_crm = (time.perf_counter() - t0) / len(images)
        todo = [i for i, a in enumerate(answers) if a.answer.box is not None]
        segs = {}
        if todo:
            out = self.asm.segment_batch([images[i] for i in todo], [answers[i].answer.box for i in todo],
                                         [answers[i].answer.points for i in todo])
            segs = dict(zip(todo, out))
        crm_desc, asm_desc = self.crm.describe(), self.asm.describe()
        results = []
        for i, (im, q, a) in enumerate(zip(images, queries, answers)):
            h, w = im.shape[:2]
            seg = segs.get(i)
            warnings = [TINY_WARNING] if (self.crm.is_tiny or self.asm.is_tiny) else []
            if a.answer.repairs:
                warnings.append("answer repaired: " + "; ".join(a.answer.repairs))
            if seg is not None:
                status, message = ResultStatus.OK, ""
                if a.answer.status is not AnswerStatus.OK:
                    message = f"segmented from the box alone: {a.answer.message}"
                mask = seg.mask
            else:
                status = ResultStatus.NO_TARGET
                message = f"the CRM gave no usable box ({a.answer.status.value}: {a.answer.message})"
                mask = np.zeros((h, w), bool)
            timings = {"crm": t_crm, **({f"asm_{k}": v for k, v in seg.timings.items()} if seg else {})}
            results.append(GroundingResult(
                query=q, status=status, answer=a.answer, mask=mask, mask_score=seg.score if seg else None,
                completion=a.text, image_size=(w, h), model_input_size=(a.resize.model_w, a.resize.model_h),
                crm=crm_desc, asm=asm_desc, prompt=self.prompt, asm_prompt=seg.prompt if seg else None,
                message=message, timings=timings, warnings=warnings,
            ))
        return results
