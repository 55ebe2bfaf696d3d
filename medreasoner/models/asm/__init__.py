"""Anatomical Segmentation Modules, created by name through ``medreasoner.models.registry.ASMS``."""

from medreasoner.constants import DEFAULT_ASM
from medreasoner.models.asm.base import ASM, SegmentResult


def load_asm(name: str = DEFAULT_ASM, **kwargs) -> ASM:
    from medreasoner.models.asm import litemedsam, medsam, sam2_asm  # noqa: F401 - registers the implementations
    from medreasoner.models.registry import ASMS

    return ASMS.create(name, **kwargs)


def asm_names() -> list[str]:
    from medreasoner.models.asm import litemedsam, medsam, sam2_asm  # noqa: F401
    from medreasoner.models.registry import ASMS

    return ASMS.names()


__all__ = ["ASM", "DEFAULT_ASM", "SegmentResult", "asm_names", "load_asm"]
