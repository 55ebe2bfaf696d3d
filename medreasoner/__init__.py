"""MedReasoner: reasoning grounding for medical images.

A Clinical Reasoning Module (CRM, a Qwen2.5-VL-family model) reads an implicit clinical question
and answers a box and two key points; a frozen Anatomical Segmentation Module (ASM, e.g. MedSAM2
or LiteMedSAM) turns them into a mask. Heavy dependencies (torch, transformers, sam2) are imported
lazily so that light parts (parsing, geometry, rewards) import anywhere.
"""

__version__ = "0.1.0"

from medreasoner.errors import InputError, MedReasonerError, ModelLoadError  # noqa: E402
from medreasoner.models.answer import AnswerStatus, ParsedAnswer, parse_completion  # noqa: E402

__all__ = [
    "AnswerStatus",
    "InputError",
    "MedReasonerError",
    "ModelLoadError",
    "ParsedAnswer",
    "__version__",
    "parse_completion",
]
