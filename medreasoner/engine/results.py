"""Typed results of one question about one image or volume, and their versioned JSON record.

Every record carries ``schema_version`` and ``kind`` ("image" or "volume") and validates against
``medreasoner/schemas/result.schema.json`` (:func:`validate_record`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from medreasoner.constants import RESULT_SCHEMA_VERSION, Status
from medreasoner.models.answer import ParsedAnswer

COORDINATES_2D = "pixels of the input image, x right, y down, continuous (pixel i spans [i, i+1))"
COORDINATES_3D = ("box/points: pixels of the key slice as shown (radiological display orientation); "
                  "*_lps: millimetres in DICOM/ITK LPS physical space")


@dataclass
class ImageResult:
    """One (2D image, question): the answer, the mask on the input pixel grid, and what was done."""

    query: str
    status: str
    answer: ParsedAnswer
    mask: np.ndarray  # bool (H, W), the input image's size; all False when status is no_target
    mask_score: float | None
    completion: str
    image_size: tuple[int, int]  # (width, height) of the input
    model_input_size: tuple[int, int]
    crm: dict[str, Any]
    asm: dict[str, Any]
    prompt: str  # reasoning | direct | file (a template replaced the built-in wording)
    asm_prompt: str | None = None
    prompt_sha256: str | None = None  # of the template text as used (medreasoner.models.prompts)
    prompt_source: str | None = None  # builtin:NAME | file:PATH | checkpoint:PATH
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    input: dict[str, Any] = field(default_factory=dict)  # path, intensity scaling, metadata
    counts: dict[str, int] = field(default_factory=dict)
    rgb: np.ndarray | None = field(default=None, repr=False)  # what the models saw (for pictures)

    kind = "image"

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def reasoning(self) -> str:
        return self.answer.think or ""

    def to_record(self) -> dict[str, Any]:
        a = self.answer
        prompt = {k: v for k, v in (("prompt_sha256", self.prompt_sha256), ("prompt_source", self.prompt_source))
                  if v is not None}
        return {
            "schema_version": RESULT_SCHEMA_VERSION,
            "kind": self.kind,
            "query": self.query,
            "status": self.status,
            "message": self.message,
            "warnings": list(self.warnings),
            "reasoning": a.think,
            "box": list(a.box) if a.box else None,
            "points": [list(p) for p in a.points] if a.points else None,
            "answer_status": a.status.value,
            "answer_repairs": list(a.repairs),
            "answer_message": a.message,
            "completion": self.completion,
            "mask_area_px": int(self.mask.sum()),
            "mask_score": self.mask_score,
            "asm_prompt": self.asm_prompt,
            "image_size": list(self.image_size),
            "model_input_size": list(self.model_input_size),
            "prompt": self.prompt,
            **prompt,
            "crm": self.crm,
            "asm": self.asm,
            "input": self.input,
            "counts": dict(self.counts),
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "coordinates": COORDINATES_2D,
        }

    to_dict = to_record  # older name


@dataclass
class VolumeResult:
    """One (3D volume, question): the mask on exactly the input grid, the key slice and its answer."""

    query: str
    status: str
    message: str
    mask: Any  # SimpleITK.Image, uint8 0/1, the input volume's geometry
    record: dict[str, Any]  # the full JSON record (see to_record)
    warnings: list[str] = field(default_factory=list)
    montage: Any = None  # PIL.Image or None

    kind = "volume"

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def key_slice(self) -> int | None:
        return self.record.get("key_slice")

    @property
    def reasoning(self) -> str:
        return self.record.get("reasoning") or ""

    @property
    def counts(self) -> dict[str, int]:
        return self.record.get("counts", {})

    def mask_array(self) -> np.ndarray:
        """The mask as a (z, y, x) uint8 numpy array (SimpleITK order)."""
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(self.mask)

    def to_record(self) -> dict[str, Any]:
        return dict(self.record)


@lru_cache(maxsize=1)
def result_schema() -> dict[str, Any]:
    """The JSON Schema (draft-07) every result record follows."""
    return json.loads((resources.files("medreasoner") / "schemas" / "result.schema.json").read_text())


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``record`` does not follow the result schema."""
    import jsonschema

    jsonschema.validate(json.loads(json.dumps(record, default=str)), result_schema())
