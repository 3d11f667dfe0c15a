"""Issue 20, item 2: a converted checkpoint served by ``vllm serve`` and used through the official
``openai`` client, as a user does it, from conversion to Ctrl-C.

A tiny Llama with odd layer sizes (intermediate 344 = 2 x 172: the Paley-Hadamard R4 and a
K that is not a multiple of the GEMM tile, the crash of issue 20), trained so that its greedy
choices have margins of 4-7 (``tiny_models.train_tiny_llama``), converted by
``ruquant-convert --scheme w4a4kv4`` (on CUDA where there is a GPU) and served with
``vllm serve CKPT``: no ``--quantization`` (found in config.json), no ``--dtype`` (vLLM's
default makes this float32 checkpoint bfloat16, as for every real model).

* GPU (``cuda``): the user's path -- CUDA graphs and torch.compile, the checkpoint's int4 KV
  cache, the Triton kernels.
* CPU (``cpu``, what CI runs): the same test body; ``--enforce-eager`` (a compiled start costs
  ~50 s more) and ``--kv-cache-dtype bfloat16`` (vLLM's CPU backend has no int4 cache, so
  the plugin refuses ``auto`` there; the simulation then keeps K/V in 16 bits too).

What is checked: completions, a batch of prompts, streaming (completion and chat), chat,
echo with prompt logprobs -- greedy tokens equal to the converter's simulated forward, prompt
logprobs close to it; a prompt longer than ``--max-model-len`` answered with HTTP 400 and the
server healthy and serving after it; SIGINT to the server's PID ends it and its engine
process, with exit status 0, within ``STOP_TIMEOUT_S``.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai  # a dependency of vLLM, as is psutil
import psutil
import pytest
import torch
from transformers import AutoTokenizer

from convert import cli
from convert.tiny_models import make_tiny_llama, train_tiny_llama
from plugin_helpers import BF16_W4A4, ServedVsSimulated, SimulatedQuantizedModel, position_errors
from serve_helpers import vllm_server
from vllm_ruquant.serve_process import STOP_TIMEOUT_S, Server, health_status, stop

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "tiny"
INTERMEDIATE = 344
MAX_MODEL_LEN = 256
N_TOKENS = 16
ECHO_TOKENS = 32  # as in plugin_helpers.served_vs_simulation, whose measure BF16_W4A4 bounds
PROMPTS = [list(range(5, 37)), [3, 100, 200, 300, 7, 9, 11, 13], list(range(400, 330, -2))]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Per device: the server's extra arguments and environment (see the module docstring).
SERVE_ARGS = {
    "cpu": ["--enforce-eager", "--kv-cache-dtype", "bfloat16"],
    "cuda": ["--gpu-memory-utilization", "0.3"],
}
SERVE_ENV = {
    "cpu": {},
    # FlashInfer's sampler JIT cost the first engine of a fresh GPU machine ~2 minutes
    # (README, gpu-2026-11-30e); these requests are greedy and never call it. Autotuning every
    # M bucket cost ~140 s of engine start (test_gpu_vllm); each config is test_kernels_gpu's.
    "cuda": {"VLLM_USE_FLASHINFER_SAMPLER": "0", "RUQUANT_AUTOTUNE": "0"},
}
STARTUP_TIMEOUT_S = {"cpu": 240, "cuda": 420}

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                 reason="vLLM's CUDA build serves on the GPU: the cuda case")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def convert_checkpoint(root: Path, device: str) -> Path:
    src = train_tiny_llama(make_tiny_llama(root / "src", intermediate_size=INTERMEDIATE, seed=5), steps=100)
    out = root / "w4a4kv4"
    assert cli.main([str(src), str(out), "--scheme", "w4a4kv4", "--calib-samples", "8", "--calib-seq-len", "64",
                     "--device", device]) == 0
    if device == "cuda":
        torch.cuda.empty_cache()  # the server's memory check counts what this process still holds
    return out


@dataclass
class Seen:
    """What the test saw, for the one summary line."""

    device: str
    items: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return f"serve_openai[{self.device}]: " + "; ".join(f"{k} {v}" for k, v in self.items.items())


def _extra(**kw) -> dict:
    """vLLM's own request fields: every sequence runs its full length; token ids come back."""
    return {"ignore_eos": True, "return_token_ids": True, **kw}


def check_completions(client, sim: SimulatedQuantizedModel, seen: Seen) -> list:
    """One prompt, then all three in one request: each choice is the simulation's greedy continuation."""
    one = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=N_TOKENS, temperature=0,
                                    extra_body=_extra())
    assert one.usage.prompt_tokens == len(PROMPTS[0]) and one.usage.completion_tokens == N_TOKENS
    assert one.choices[0].finish_reason == "length" and one.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=N_TOKENS, temperature=0,
                                      extra_body=_extra())
    choices = sorted(batch.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    assert batch.usage.completion_tokens == len(PROMPTS) * N_TOKENS
    diverged = {k: sim.greedy_divergence(p, c.token_ids)
                for k, (p, c) in enumerate(zip(PROMPTS, choices, strict=True))}
    assert all(j is None for j in diverged.values()), f"greedy tokens differ from the simulation at {diverged}"
    assert (choices[0].token_ids, choices[0].text) == (one.choices[0].token_ids, one.choices[0].text)
    seen.items["greedy"] = f"{len(PROMPTS)} prompts x {N_TOKENS} tokens == simulation (single and batched)"
    return choices


def check_streaming(client, choices: list, seen: Seen) -> None:
    """A streamed completion is the non-streamed one, delivered in several chunks."""
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=N_TOKENS, temperature=0,
                                            stream=True, extra_body=_extra()))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choices[1].text
    assert [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])] == choices[1].token_ids
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    seen.items["stream"] = f"{len(chunks)} chunks == non-streamed"


def check_chat(client, sim: SimulatedQuantizedModel, seen: Seen) -> None:
    """Chat (through the tokenizer's chat template), plain and streamed."""
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N_TOKENS, temperature=0,
                                          extra_body=_extra())
    msg = chat.choices[0]
    assert msg.message.role == "assistant" and msg.finish_reason == "length"
    assert chat.usage.completion_tokens == N_TOKENS
    assert sim.greedy_divergence(chat.prompt_token_ids, msg.token_ids) is None
    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N_TOKENS, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert len(stream) >= 2
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == msg.message.content
    seen.items["chat"] = f"{len(chat.prompt_token_ids)}-token template, greedy == simulation, stream == plain"


def check_echo_logprobs(client, sim: SimulatedQuantizedModel, tokenizer, seen: Seen) -> ServedVsSimulated:
    """``echo`` returns each prompt and its continuation with the top-3 logprobs at every position:
    compared with the simulation's, teacher-forced -- the measure of ``plugin_helpers.BF16_W4A4``
    (the same prompts and ``ECHO_TOKENS``), asserted at the end of the test."""
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=ECHO_TOKENS, temperature=0, echo=True,
                                    logprobs=3, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    errors: list[float] = []
    diverged: list[str] = []
    for k, (prompt, choice) in enumerate(zip(PROMPTS, sorted(out.choices, key=lambda c: c.index), strict=True)):
        assert choice.text.startswith(tokenizer.decode(prompt))
        lp = choice.logprobs
        ids = [_token_id(t) for t in lp.tokens]
        assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + ECHO_TOKENS and lp.token_logprobs[0] is None
        if (j := sim.greedy_divergence(prompt, ids[len(prompt):])) is not None:
            diverged.append(f"prompt {k} at token {j}")
        # position i: the distribution after ids[:i] (row i - 1): the echoed token and vLLM's top 3
        rows = [(i - 1, {ids[i]: lp.token_logprobs[i], **{_token_id(t): v for t, v in lp.top_logprobs[i].items()}})
                for i in range(1, len(ids))]
        errors += position_errors(sim, ids, rows)
    result = ServedVsSimulated(errors, diverged)
    seen.items["echo logprobs"] = result.summary(BF16_W4A4.noise_atol)
    return result


def _token_id(token: str) -> int:
    """``return_tokens_as_token_ids`` spells each token ``token_id:N``."""
    assert token.startswith("token_id:"), token
    return int(token.removeprefix("token_id:"))


def check_too_long_prompt(client, server: Server, seen: Seen) -> None:
    """A prompt over ``--max-model-len`` is the client's error (HTTP 400); the server keeps serving."""
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=list(range(3, 3 + MAX_MODEL_LEN + 44)), max_tokens=4)
    assert err.value.status_code == 400
    assert server.proc.poll() is None
    assert health_status(server.base) == 200
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")
    seen.items["too long"] = f"HTTP {err.value.status_code}, healthy after"


def check_stop(server: Server, seen: Seen) -> None:
    """SIGINT (Ctrl-C) to the server's PID: it and its engine process exit cleanly in time."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "vllm serve started no engine process"
    result = stop(server.proc, signal.SIGINT)
    _, alive = psutil.wait_procs(children, timeout=STOP_TIMEOUT_S)
    seen.items["stop"] = (f"SIGINT -> exit {result.returncode} in {result.seconds:.1f} s, "
                          f"{len(children)} child processes, {len(alive)} left")
    assert not result.killed, f"vllm serve ignored SIGINT for {STOP_TIMEOUT_S} s"
    assert result.returncode == 0, f"vllm serve exited with {result.returncode}:\n{server.log_text()[-3000:]}"
    assert not alive, f"processes left behind: {alive}"


@pytest.mark.parametrize("device", DEVICES)
def test_openai_client_end_to_end(device: str, tmp_path: Path) -> None:
    ckpt = convert_checkpoint(tmp_path, device)
    # the CPU serves K/V in 16 bits (see the module docstring): simulate that
    sim = SimulatedQuantizedModel(ckpt, **({"kv_bits": 16} if device == "cpu" else {}))
    seen = Seen(device)
    t0 = time.monotonic()
    with vllm_server(ckpt, tmp_path / "serve.log", "--served-model-name", MODEL, "--max-model-len",
                     str(MAX_MODEL_LEN), "--max-num-seqs", "8", *SERVE_ARGS[device], env=SERVE_ENV[device],
                     startup_timeout=STARTUP_TIMEOUT_S[device]) as server:
        seen.items["healthy after"] = f"{time.monotonic() - t0:.0f} s"
        try:
            log = server.log_text()
            assert "dtype=torch.bfloat16" in log, "the server did not run in bfloat16"
            backend = "triton" if device == "cuda" else "reference"
            assert f"ruquant: linear layers run on the '{backend}' backend" in log
            # the GPU serves the checkpoint's int4 KV cache with our attention kernel, unasked
            int4_kv = "--kv-cache-dtype auto -> int4_per_token_head" in log
            ours = "int4 KV attention by kernels/int4_kv_attention.py" in log
            seen.items["engine"] = f"bfloat16, {backend} linears, " + (
                ("int4 KV, our attention kernel" if ours else "int4 KV, vLLM's attention") if int4_kv else "16-bit KV")
            assert int4_kv == ours == (device == "cuda")
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)
            choices = check_completions(client, sim, seen)
            check_streaming(client, choices, seen)
            check_chat(client, sim, seen)
            echo = check_echo_logprobs(client, sim, AutoTokenizer.from_pretrained(str(ckpt)), seen)
            check_too_long_prompt(client, server, seen)
            check_stop(server, seen)
        finally:
            print("\n" + seen.line())  # whatever happened: on the GPU machine this line is the evidence
    echo.check(BF16_W4A4)  # last: a failure here leaves the server checks above done
