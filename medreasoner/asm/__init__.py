"""Anatomical Segmentation Modules, created by name through ``medreasoner.registry.ASMS``."""

from medreasoner.asm.base import ASM, SegmentResult

DEFAULT_ASM = "litemedsam"  # the only real medical weights available offline


def load_asm(name: str = DEFAULT_ASM, **kwargs) -> ASM:
    from medreasoner.asm import litemedsam, sam2_asm  # noqa: F401 - registers the implementations
    from medreasoner.registry import ASMS

    return ASMS.create(name, **kwargs)


def asm_names() -> list[str]:
    from medreasoner.asm import litemedsam, sam2_asm  # noqa: F401
    from medreasoner.registry import ASMS

    return ASMS.names()


__all__ = ["ASM", "DEFAULT_ASM", "SegmentResult", "asm_names", "load_asm"]
