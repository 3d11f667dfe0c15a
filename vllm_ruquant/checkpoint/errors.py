"""The one exit-code table of every ruquant command, and the errors that carry a code.

Both command lines (``ruquant-convert``, ``ruquant-eval`` and ``ruquant-validate``) end a
user's mistake in one line and one of these codes, so a script can tell "fix the flags"
from "re-copy the checkpoint" without parsing messages. Each number means one thing:

====  ==============  ========================================================================
code  name            meaning
====  ==============  ========================================================================
0     OK
1     INVALID         the checkpoint is not servable as it is: its config.json, format or
                      tensors disagree (ruquant-validate)
2     BAD_INPUT       a bad command line (argparse's own code), a missing or unreadable input
                      path, a malformed config.json or model dimension, a source shard the
                      converter cannot read
3     UNSUPPORTED     an architecture, dtype, scheme or flag combination ruquant does not handle
4     OUTPUT_EXISTS   the output directory exists (ruquant-convert refuses to overwrite it)
5     NUMERICS        NaN / Inf in weights or calibration activations
6     IO_ERROR        permissions, a full disk, out of memory
7     CORRUPT         a checkpoint shard or its index is damaged: truncated, bad header,
                      checksum mismatch -- re-copy it (ruquant-validate)
8     MISSING         the checkpoint directory, its config.json or a shard is missing or
                      unreadable (ruquant-validate)
130   INTERRUPTED     Ctrl-C
====  ==============  ========================================================================

The converter stops at the first problem and reports a damaged or missing *source* file as
BAD_INPUT; ruquant-validate tells a damaged (CORRUPT) from a missing (MISSING) checkpoint file.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INVALID = 1
    BAD_INPUT = 2
    UNSUPPORTED = 3
    OUTPUT_EXISTS = 4
    NUMERICS = 5
    IO_ERROR = 6
    CORRUPT = 7
    MISSING = 8
    INTERRUPTED = 130


class RUQuantError(Exception):
    """An error the user caused or can fix: commands print ``str(e)`` and exit ``code``."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class CheckpointError(RUQuantError, ValueError):
    """A model directory or checkpoint cannot be used as it is; ``str(e)`` is one line that
    names the culprit (config key, tensor, shard).

    A ``ValueError`` so that vLLM and callers that already handle config errors treat it as one.
    """

    def __init__(self, message: str, code: ExitCode = ExitCode.INVALID) -> None:
        super().__init__(message, code)
