"""Clinical Reasoning Module backends, created by name through ``medreasoner.registry.CRMS``."""

from medreasoner.crm.base import CRM, DEFAULT_CRM, CRMAnswer, GenerationConfig


def load_crm(model: str = DEFAULT_CRM, backend: str = "transformers", **kwargs) -> CRM:
    """Create a CRM backend by name (importing the backend modules registers them)."""
    from medreasoner.crm import openai_compat, qwen_vl  # noqa: F401 - importing registers them
    from medreasoner.registry import CRMS

    return CRMS.create(backend, model=model, **kwargs)


__all__ = ["CRM", "CRMAnswer", "DEFAULT_CRM", "GenerationConfig", "load_crm"]
