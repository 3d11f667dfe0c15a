"""Shared pytest setup: the Triton interpreter on machines without a GPU, shared fixtures.

``plugin_helpers`` (in this folder) imports as a top-level module because pytest's default
"prepend" import mode puts the test folder (it has no ``__init__.py``) on ``sys.path``;
the tiny-model builders are ``convert.tiny_models``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Without a GPU, Triton kernels can still run in Triton's CPU interpreter -- but only if it is
# on before triton is first imported (its own standard library is @jit code), so here.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def vllm_ctx():
    """A one-rank (gloo) distributed context and vLLM config, as a worker has."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        ensure_model_parallel_initialized(1, 1)
        yield
        cleanup_dist_env_and_memory()


@pytest.fixture
def triton_interpreter() -> None:
    """Skip unless Triton kernels run in the CPU interpreter (on a GPU machine they compile)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's CPU interpreter is off (a GPU machine: the gpu tests cover the kernels)")
