"""Weight quantizers (SEPTQ, LRQ) and GBS clipping: grid-exact, better than RTN, deterministic, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert import cli
from convert.clip import gradual_binary_search, search_kv_clip, search_weight_clip
from convert.quantizers import get_quantizer
from convert.tiny_models import make_tiny_llama
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod

SMALL_CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]
# (name, options): every quantizer this file owns, plus the GBS-clipped baselines
METHODS = [("septq", {}), ("lrq", {"steps": 60}), ("gptq", {"clip": "gbs"}), ("rtn", {"clip": "gbs"}),
           ("septq", {"clip": "gbs"}), ("gptq", {"act_order": True}), ("gptq", {"act_order": True, "clip": "gbs"}),
           # reference.weight_scale's full-range grid (signed scales) under each quantizer
           ("rtn", {"full_range": True}), ("gptq", {"act_order": True, "clip": "gbs", "full_range": True}),
           ("septq", {"full_range": True}), ("lrq", {"steps": 60, "full_range": True})]


def correlated_hessian(k: int, seed: int = 0, tokens: int = 1024) -> torch.Tensor:
    """X^T X / n of correlated inputs with a few outlier channels, like a real linear's input."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :3] *= 6
    return x.T @ x / tokens


def weighted_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int, h: torch.Tensor) -> float:
    d = ref.dequantize_weight(q, scale, group).double() - w.double()
    return float(((d @ h.double()) * d).sum())


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    return w, correlated_hessian(96)


@pytest.mark.parametrize(("name", "opts"), METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize(("bits", "group"), [(4, -1), (3, 32)])
def test_grid_exact_better_than_rtn_deterministic(problem, name: str, opts: dict, bits: int, group: int) -> None:
    w, h = problem
    q, scale = get_quantizer(name, **opts).quantize(w, bits, group, h)
    qmax = ref.qmax_for(bits)
    groups = 1 if group == -1 else w.shape[1] // group
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -qmax - 1 and int(q.max()) <= qmax
    assert scale.dtype == torch.float32 and scale.shape == (w.shape[0], groups)
    if opts.get("full_range"):  # signed scales, both signs present on random weights
        assert bool((scale != 0).all()) and bool((scale < 0).any()) and bool((scale > 0).any())
    else:
        assert bool((scale > 0).all())
    # grid-exact: the served dequantization q * scale re-quantizes to the same integers
    deq = ref.dequantize_weight(q, scale, group)
    assert torch.equal(ref.quantize_weight_with_scale(deq, scale, bits, group), q)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(2))
    served = ref.quantized_linear(x, q, scale, act_bits=16, group_size=group)
    torch.testing.assert_close(served, x @ deq.T, rtol=1e-5, atol=1e-6)
    # better than round-to-nearest on the layer-output error tr(dW H dW^T)
    rtn = weighted_error(w, *ref.quantize_weight(w, bits, group), group, h)
    bar = 1.0 if name == "rtn" and "clip" not in opts else 0.8  # plain RTN on the full-range grid: just lower
    assert weighted_error(w, q, scale, group, h) < bar * rtn
    # deterministic under the (default) seed
    q2, scale2 = get_quantizer(name, **opts).quantize(w, bits, group, h)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)


@pytest.mark.parametrize("group", [-1, 16])
def test_full_range_grid_puts_each_groups_largest_weight_on_the_extra_level(group: int) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    q, scale = ref.quantize_weight(w, 4, group, full_range=True)
    g = w.shape[1] if group == -1 else group
    wg, qg = w.reshape(64, -1, g), q.reshape(64, -1, g)
    at = wg.abs().argmax(-1, keepdim=True)
    assert bool((qg.gather(-1, at) == -8).all())  # the largest weight of every group sits on -8 ...
    torch.testing.assert_close(ref.dequantize_weight(q, scale, group).reshape(64, -1, g).gather(-1, at),
                               wg.gather(-1, at))  # ... exactly, so nothing of it is clipped
    assert bool((torch.sign(scale) == -torch.sign(wg.gather(-1, at).squeeze(-1))).all())
    # steps 8/7 finer on the largest weight's side: the round-to-nearest error falls (~0.75x on Gaussians)
    err = {fr: float((ref.dequantize_weight(*ref.quantize_weight(w, 4, group, full_range=fr), group) - w)
                     .pow(2).sum()) for fr in (False, True)}
    assert err[True] < 0.9 * err[False], err


def test_full_range_gptq_lowers_the_weighted_error(problem) -> None:
    w, h = problem
    errs = {fr: weighted_error(w, *get_quantizer("gptq", act_order=True, clip="gbs", full_range=fr)
                               .quantize(w, 4, 32, h), 32, h) for fr in (False, True)}
    assert errs[True] < errs[False], errs


def test_lrq_seed_and_rank_are_options(problem) -> None:
    w, h = problem
    qz = get_quantizer("lrq", rank=2, steps=5, seed=7, unrelated_option=1)  # unknown options are dropped
    assert (qz.rank, qz.steps, qz.seed) == (2, 5, 7)
    q, scale = qz.quantize(w, 4, -1, h)
    assert q.shape == w.shape and scale.shape == (w.shape[0], 1)


def test_gradual_binary_search_finds_each_rows_minimum() -> None:
    target = torch.tensor([0.55, 0.8, 0.97, 1.0], dtype=torch.float64)
    r, e = gradual_binary_search(lambda r: (r - target).pow(2), 4)
    assert torch.allclose(r, target, atol=0.01), r
    assert bool((e <= (1.0 - target).pow(2) + 1e-12).all())  # never worse than no clipping


def test_weight_clip_lowers_the_weighted_error(problem) -> None:
    w, h = problem
    ratios = search_weight_clip(w, 3, -1, h)
    assert ratios.shape == (w.shape[0], 1) and bool(((ratios > 0) & (ratios <= 1)).all())
    clipped = weighted_error(w, *ref.quantize_weight(w, 3, -1, clip_ratio=ratios), -1, h)
    assert clipped < weighted_error(w, *ref.quantize_weight(w, 3, -1), -1, h)


def test_kv_clip_search_on_heavy_tails() -> None:
    g = torch.Generator().manual_seed(3)
    ks = [torch.distributions.StudentT(2.0).sample((256, 32))]  # heavy tails: clipping helps
    vs = [torch.randn(256, 32, generator=g)]
    rk, rv = search_kv_clip(ks, vs, 3)
    assert 0.4 <= rk <= 1.0 and 0.4 <= rv <= 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("src") / "llama", arch="llama", intermediate_size=256, seed=1)


def _check_checkpoint(out: Path) -> tuple[fmt_mod.RUQuantFormat, dict]:
    cfg = json.loads((out / "config.json").read_text())
    fmt = fmt_mod.RUQuantFormat.from_dict(cfg["quantization_config"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    prefix = "model.layers.0.mlp.down_proj"
    for kind, (shape, dtype) in fmt_mod.linear_tensor_shapes(fmt, 128, 256).items():
        name = fmt_mod.tensor_name(prefix, kind)
        with safe_open(str(out / index["weight_map"][name]), "pt") as f:
            t = f.get_tensor(name)
        assert tuple(t.shape) == shape and str(t.dtype) == f"torch.{dtype}", name
    report = json.loads((out / "ruquant_report.json").read_text())
    assert all(0 < layer["output_rel_error"] < 0.6 for layer in report["layers"])
    return fmt, report


@pytest.mark.parametrize("args", [
    ["--weight-quantizer", "septq"],
    ["--weight-quantizer", "lrq", "--lrq-rank", "2", "--lrq-steps", "10"],
    ["--weight-quantizer", "gptq", "--clip", "gbs", "--scheme", "w3a3kv3"],
], ids=["septq", "lrq", "gbs-w3a3kv3"])
def test_cli_converts_the_tiny_model(tiny: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "out"
    assert cli.main([str(tiny), str(out), *args, *SMALL_CALIB]) == 0
    fmt, report = _check_checkpoint(out)
    if "gbs" in args:
        assert (fmt.weight.bits, fmt.activation.bits, fmt.kv_cache.bits) == (3, 3, 3)
        assert 0.4 <= fmt.activation.clip_ratio <= 1.0
        assert fmt.activation.clip_ratio == report["clip"]["activation"]
        assert len(report["clip"]["kv"]) == 2


def test_lrq_checkpoint_is_reproducible(tiny: Path, tmp_path: Path) -> None:
    """Same seed, same checkpoint bytes (issue 5, acceptance 3)."""
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert cli.main([str(tiny), str(out), "--weight-quantizer", "lrq", "--lrq-steps", "10", "--clip", "gbs",
                         *SMALL_CALIB]) == 0
        digests.append(json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["sha256"])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("n", [50, 170])  # 170 = 2 * 85: no Hadamard order; pads to 172 (Williamson)
def test_dimension_expansion_is_exact_and_helps_outliers(n: int) -> None:
    from convert.dimension_expansion import expand_activation, expand_weight, expanded_linear_error, expanded_size
    from vllm_ruquant.hadamard import is_hadamard_size

    m = expanded_size(n)
    assert m > n and is_hadamard_size(m)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, n, generator=g)
    x[:, :2] *= 20  # outlier channels
    w = torch.randn(32, n, generator=g)
    assert expand_weight(w).shape == (32, m)
    torch.testing.assert_close(expand_activation(x) @ expand_weight(w).T, x.double() @ w.double().T)
    err = expanded_linear_error(x, w, 3, 3)
    assert err["expanded"] < err["plain"]


def test_padded_online_rotation_is_the_expansion_the_plugin_serves() -> None:
    """``OnlineRotation(padded_from=n)`` (what the plugin runs) is ``expand_activation``, and the
    converter's absorption ``W -> W Q`` keeps ``x W^T`` (``Q Q^T = I_n``)."""
    from convert.dimension_expansion import expand_activation, expanded_size
    from vllm_ruquant import reference as ref

    n = 170
    m = expanded_size(n)
    rot = ref.OnlineRotation("hadamard", m, padded_from=n)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rot.apply(x).double(), expand_activation(x), atol=1e-5, rtol=1e-5)
    q = rot.matrix().double()
    assert q.shape == (n, m)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    w = torch.randn(8, n, dtype=torch.float64)
    torch.testing.assert_close(rot.apply(x).double() @ (w @ q).T, x.double() @ w.T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="padded from 170 applied to a dim of 172"):
        rot.apply(torch.randn(2, m))


def test_dimension_expansion_refuses_tensor_parallel(tmp_path, capsys) -> None:
    from convert import cli
    from convert.tiny_models import make_tiny_llama

    make_tiny_llama(tmp_path / "src", intermediate_size=170)
    rc = cli.main([str(tmp_path / "src"), str(tmp_path / "out"), "--dimension-expansion", "--tp-size", "2",
                   *SMALL_CALIB])
    assert rc == 3 and not (tmp_path / "out").exists()
    assert "--dimension-expansion needs --tp-size 1" in capsys.readouterr().err


def test_gptq_damping_in_place_equals_adding_a_scaled_identity() -> None:
    """The in-place diagonal damping (no dense K x K identity: 6.6 GB at a 70B down_proj) gives the
    very factor of damping with ``c * I``, bit for bit, dead columns included."""
    from convert.quantizers.gptq import inverse_hessian_cholesky

    g = torch.Generator().manual_seed(0)
    for n, tokens in [(64, 200), (96, 40)]:  # full rank, and rank 40 < 96
        x = torch.randn(tokens, n, generator=g)
        x[:, 3] = 0  # a dead input column
        h = (x.T @ x).double()
        dead = torch.diag(h) == 0
        dense = h.clone()
        dense[dead, dead] = 1.0
        dense += 0.01 * torch.diag(dense).mean() * torch.eye(n, dtype=torch.float64)
        want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(dense)), upper=True)
        got, got_dead = inverse_hessian_cholesky(h, 0.01)
        assert torch.equal(got, want) and torch.equal(got_dead, dead)


def test_gptq_permutes_while_it_copies() -> None:
    """Act order's permuted fp64 Hessian, gathered a block of rows at a time from the caller's (host)
    Hessian, is ``H[perm][:, perm]``: the same factor and dead mask as factorising the permuted copy."""
    from convert.hessian import float64_copy
    from convert.quantizers import gptq

    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 100, generator=g) * (1 + 3 * torch.rand(100, generator=g))
    x[:, [5, 71]] = 0  # dead input columns
    h = (x.T @ x / 300).float()
    perm = torch.argsort(torch.diag(h), descending=True)
    assert torch.equal(float64_copy(h, h.device, perm, rows=7), h[perm][:, perm].double())
    assert torch.equal(float64_copy(h, h.device, rows=7), h.double())
    got, dead = gptq.inverse_hessian_cholesky(h, 0.01, perm)
    want, want_dead = gptq.inverse_hessian_cholesky(h[perm][:, perm], 0.01)
    assert torch.equal(got, want) and torch.equal(dead, want_dead) and int(dead.sum()) == 2


@pytest.mark.parametrize("group,act_order", [(-1, False), (-1, True), (32, True)])
def test_gptq_block_scales_equal_the_full_scale_matrix(group: int, act_order: bool) -> None:
    """GPTQ reads each block's scales from the (N, G) per-group scales (``group_scale_columns``) instead of
    an (N, K) fp64 repeat (1.9 GB at a 70B down_proj): the same integers, bit for bit, as the sweep over
    the full matrix, with and without act order."""
    from convert.clip import static_scale
    from convert.quantizers.gptq import GPTQQuantizer, gptq_sweep, group_scale_columns, inverse_hessian_cholesky

    g = torch.Generator().manual_seed(1)
    n, k = 48, 256
    w = torch.randn(n, k, generator=g)
    x = torch.randn(512, k, generator=g) * (1 + 4 * torch.rand(k, generator=g))
    h = (x.T @ x / 512).float()
    q, scale = GPTQQuantizer(block_size=64, act_order=act_order).quantize(w, 4, group, h)
    gs = k if group == -1 else group
    full = static_scale(w, 4, group, h, "none").double().repeat_interleave(gs, dim=1)
    wq, hh = w.double().clone(), h
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        hh, wq, full = h[perm][:, perm], wq[:, perm], full[:, perm]
        cols = group_scale_columns(scale, gs, perm)
        assert all(torch.equal(cols(b0, b0 + 64), full[:, b0:b0 + 64]) for b0 in range(0, k, 64))
    u, dead = inverse_hessian_cholesky(hh, 0.01)
    wq[:, dead] = 0
    want = gptq_sweep(wq, u, lambda b0, b1: full[:, b0:b1], 7, 64)
    if perm is not None:
        want = want[:, torch.argsort(perm)]
    assert torch.equal(q, want)
