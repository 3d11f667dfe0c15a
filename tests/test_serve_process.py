"""``vllm_ruquant.serve_process`` without vLLM: stopping, waiting and the failure excerpt, on
stand-in processes (seconds), so that the part every server user shares is checked on every run;
the real ``vllm serve`` runs in ``test_plugin_serve`` / ``test_serve_openai``."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_ruquant.serve_process import Server, ServerFailed, failure_excerpt, free_port, stop, wait_healthy


def group_gone(pgid: int) -> bool:
    """Whether no process of group ``pgid`` is left (an orphan is reaped by init a moment later)."""
    for _ in range(50):
        if subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).returncode == 1:
            return True
        time.sleep(0.1)
    return False


def test_stop_of_the_group_ends_every_process_of_it() -> None:
    """``group=True`` (the example, serve_openai): the children get the signal too."""
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60; wait"], start_new_session=True)
    time.sleep(0.3)
    result = stop(proc, timeout=5, group=True)
    assert result.returncode is not None and not result.killed and result.seconds < 5
    assert group_gone(proc.pid), "a process of the server's group survived stop()"


def test_a_server_that_ignores_the_signal_is_killed_with_its_group() -> None:
    """By PID (the tests, convert_scale): after ``timeout`` the whole group gets SIGKILL."""
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & sleep 60; wait"], start_new_session=True)
    time.sleep(0.3)
    result = stop(proc, timeout=1)
    assert result.killed and result.returncode == -9 and 1 <= result.seconds < 5
    assert group_gone(proc.pid)
    assert stop(proc).returncode == -9  # idempotent


def _server(tmp_path: Path, code: str) -> Server:
    """A stand-in server: ``python -c CODE`` logging like ``start`` does, on a port nobody answers."""
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    port = free_port()
    return Server(f"http://127.0.0.1:{port}", port, proc, log)


def test_a_server_that_exits_fails_with_its_first_traceback(tmp_path: Path) -> None:
    """The engine core's traceback comes first, then pages of shutdown noise: the excerpt keeps both."""
    code = ("import sys, traceback\ntry:\n    raise ValueError('the root cause')\nexcept ValueError:\n"
            "    traceback.print_exc()\nsys.stderr.flush()\nprint('noise\\n' * 1000)\nsys.exit(3)")
    server = _server(tmp_path, code)
    with pytest.raises(ServerFailed) as err:
        wait_healthy(server, timeout=60)
    assert str(err.value) == "vllm serve exited with 3"
    assert "the root cause" in err.value.excerpt and "noise" in err.value.excerpt
    assert err.value.report() == f"vllm serve exited with 3:\n{err.value.excerpt}"


def test_a_server_not_healthy_in_time_fails_and_is_left_running(tmp_path: Path) -> None:
    server = _server(tmp_path, "import time; time.sleep(60)")
    try:
        with pytest.raises(ServerFailed, match="not healthy after 1 s"):
            wait_healthy(server, timeout=1)
        assert server.proc.poll() is None
    finally:
        stop(server.proc, timeout=5)


def test_failure_excerpt_shows_the_root_cause_above_the_tail() -> None:
    cause = "Traceback (most recent call last):\n  File 'core.py'\nValueError: the root cause"
    log = "starting\n" + cause + "\n" + "noise\n" * 1000 + "RuntimeError: Engine core initialization failed"
    excerpt = failure_excerpt(log)
    assert "the root cause" in excerpt and excerpt.endswith(log[-3000:]) and "\n[...]\n" in excerpt
    assert failure_excerpt("short log") == "short log"


def test_importing_it_does_not_import_vllm() -> None:
    """The examples and benchmarks import it at the top; vLLM comes only with the command."""
    code = "import sys, vllm_ruquant.serve_process; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
