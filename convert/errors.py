"""User-facing converter errors: one message, one exit code from the shared table, never a traceback.

The codes are ``vllm_ruquant.checkpoint.errors.ExitCode`` (one table for every ruquant command).
"""

from __future__ import annotations

from vllm_ruquant.checkpoint.errors import ExitCode, RUQuantError

__all__ = ["ConvertError", "ExitCode"]


class ConvertError(RUQuantError):
    """An error the user caused or can fix; the CLI prints ``message`` and exits ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message, code)
