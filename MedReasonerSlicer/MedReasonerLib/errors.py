"""The one error type the module shows the user: a clear, one-line message."""

from __future__ import annotations


class MedReasonerSlicerError(Exception):
    """Something the user can fix or must know (no volume, blank question, worker died, ...).

    ``kind`` says which: input, worker, server, model, cancelled, no_target."""

    def __init__(self, message: str, kind: str = "input"):
        super().__init__(" ".join(str(message).split()) or kind)
        self.kind = kind
