"""Errors of the export stage."""
from __future__ import annotations

from cnnbench.common.errors import UserError



class ExportError(UserError):
    """Bad input, a tampered or missing export file, or ensemble members that cannot be combined."""


class ParityError(ExportError):
    """An exported graph failed a parity gate; ``report`` is the parity report that failed."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report
