"""`vllm serve` for the tests that talk to a server (``test_plugin_serve``, ``test_serve_load``,
``test_serve_openai``): ``vllm_ruquant.serve_process`` with the test engine's environment, and a
server that does not come up fails the test with its log's root cause.

Starting, waiting and stopping live in ``vllm_ruquant.serve_process``, shared with the examples
and benchmarks (which may not import from tests/); what is here is only the tests' own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from convert.tiny_models import make_tiny_llama
from plugin_helpers import ENGINE_ENV, write_ruquant_checkpoint
from vllm_ruquant import serve_process
from vllm_ruquant.checkpoint.format import ActivationSpec, RotationSpec, RUQuantFormat, WeightSpec
from vllm_ruquant.serve_process import Server, ServerFailed

STARTUP_TIMEOUT_S = 240
# The server's own process: multi-process engine (the engine core is a child, as for a user)
SERVER_ENV = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@contextlib.contextmanager
def vllm_server(model: str | Path, log: Path, *args: str, env: dict[str, str] | None = None,
                startup_timeout: float = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    """Start ``vllm serve MODEL ARGS`` on a free port, yield it once healthy, stop it by PID after.

    ``env`` is laid over this process's environment and ``SERVER_ENV``. A server that exits or
    is not healthy in time fails the test with ``failure_excerpt`` of its log.
    """
    try:
        with serve_process.vllm_server(model, log, *args, env={**os.environ, **SERVER_ENV, **(env or {})},
                                       startup_timeout=startup_timeout) as server:
            yield server
    except ServerFailed as e:
        pytest.fail(e.report())


def tiny_w4a4_checkpoint(root: Path, seed: int) -> Path:
    """A tiny Llama (intermediate 256) as a w4a4 ruquant checkpoint with an online Hadamard R4."""
    make_tiny_llama(root / "src", intermediate_size=256, arch="llama", seed=seed)
    fmt = RUQuantFormat(weight=WeightSpec(bits=4), activation=ActivationSpec(bits=4),
                        online_rotations={"down_proj": RotationSpec("hadamard", 256)})
    return write_ruquant_checkpoint(root / "src", root / "w4a4", fmt)


@contextlib.contextmanager
def serve_tiny_w4a4(root: Path, seed: int, *extra_args: str) -> Iterator[Server]:
    """`vllm serve` a tiny w4a4 ruquant checkpoint (CPU-sized: eager, float32) as model "tiny"."""
    ckpt = tiny_w4a4_checkpoint(root, seed)
    with vllm_server(ckpt, root / "serve.log", "--quantization", "ruquant", "--served-model-name", "tiny",
                     "--enforce-eager", "--dtype", "float32", *extra_args) as server:
        yield server
