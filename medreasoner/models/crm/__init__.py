"""Clinical Reasoning Module backends, created by name through ``medreasoner.models.registry.CRMS``."""

from medreasoner.models.crm.base import CRM, DEFAULT_CRM, CRMAnswer, GenerationConfig


def load_crm(model: str = DEFAULT_CRM, backend: str = "transformers", **kwargs) -> CRM:
    """Create a CRM backend by name (importing the backend modules registers them)."""
    from medreasoner.models.crm import openai_compat, qwen_vl  # noqa: F401 - importing registers them
    from medreasoner.models.registry import CRMS

    return CRMS.create(backend, model=model, **kwargs)


__all__ = ["CRM", "CRMAnswer", "DEFAULT_CRM", "GenerationConfig", "load_crm"]
