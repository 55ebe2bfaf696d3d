"""Infer tasks over the shared medreasoner session."""

from .medreasoner import MedReasonerInfer

__all__ = ["MedReasonerInfer"]
