"""Task configs: read --conf and load the models once."""

from .medreasoner import MedReasonerConfig

__all__ = ["MedReasonerConfig"]
