"""Exceptions with messages meant for the person at the keyboard."""


class MedReasonerError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(MedReasonerError, ValueError):
    """The user's input (file, query, coordinates) cannot be used; the message says why."""


class ModelLoadError(MedReasonerError, RuntimeError):
    """A model or its weights could not be found or loaded."""


class CancelledError(MedReasonerError):
    """The caller asked the running job to stop."""


class UnknownComponentError(InputError):
    """A registry (ASM, CRM backend) has nothing under the requested name."""
