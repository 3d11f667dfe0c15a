"""GPU kernels against ``vllm_ruquant.reference`` (the oracle), on fresh random inputs.

Integers (quantized activations, scales, int32 sums through the epilogue) must match
exactly; bf16 outputs of quantized GEMMs must match the reference's bf16 bit for bit
(the epilogue runs the same fp32 operations in the same order); weight-only outputs,
whose bf16 products the reference leaves to cuBLAS, must agree within bf16 rounding.
Every output buffer is poisoned before the kernel writes it.

The activation reference runs on the CPU: on CUDA, torch divides by a Python scalar as a
multiplication by its reciprocal, which is not the IEEE division the reference specifies.
Rotations with a dense factor (Kronecker ``H_m``, block-diagonal) are matrix products
whose summation order the reference does not fix, so their integers may differ by one
where a value sits within fp32 rounding of a half-step; the tests bound how often.
"""

from __future__ import annotations

import pytest
import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.linear_backend import LinearSpec, ReferenceBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# K x N of the Llama-3-8B / 70B linears (issue 9)
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344),
          (28672, 8192)]
MS = [1, 7, 33, 1000]
POISON_F = float("nan")


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heuristic configs (the first of each M bucket): autotuning belongs to benchmarks."""
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "0")


def _randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    # heavy-ish tails so that clipping, absmax and rounding see varied values
    x = torch.randn(*shape, device="cuda") * (1 + 3 * torch.rand(shape[0], 1, device="cuda"))
    return x.to(dtype)


def _assert_bf16_close(y: torch.Tensor, yr: torch.Tensor, noise: torch.Tensor | None = None) -> None:
    """Within one bf16 rounding of the reference (plus fp32 summation-order noise)."""
    assert not torch.isnan(y).any(), "unwritten (poisoned) outputs"
    d = (y.float() - yr.float()).abs()
    tol = yr.float().abs() * 2.0**-7
    if noise is not None:
        tol = tol + noise
    bad = d > tol
    assert not bad.any(), f"{int(bad.sum())} of {d.numel()} outside bf16 rounding; max diff {d.max()}"


# ------------------------------------------------------------------------ rotate + quantize


def _check_quant(q: torch.Tensor, s: torch.Tensor, x_rot_cpu: torch.Tensor, bits: int, clip: float,
                 packed: bool, exact: bool) -> None:
    qr, sr = ref.quantize_activation(x_rot_cpu, bits, clip)
    q = q.cpu()
    s = s.cpu()
    qi = ref.unpack_int4(q) if packed else q
    if exact:
        assert torch.equal(s, sr[:, 0]), "scales differ"
        assert torch.equal(qi, qr), f"{int((qi != qr).sum())} integers differ"
        if packed:
            assert torch.equal(q, ref.pack_int4(qr)), "packing differs"
    else:
        rel = ((s - sr[:, 0]).abs() / sr[:, 0]).max().item()
        assert rel < 1e-5, f"scales differ by {rel:.2e} (relative)"
        d = (qi.int() - qr.int()).abs()
        assert d.max() <= 1, "integers differ by more than one step"
        assert (d > 0).float().mean() < 1e-3, f"{int((d > 0).sum())} integers off by one"


@pytest.mark.parametrize("K", sorted({k for k, _ in SHAPES} | {n for _, n in SHAPES if n <= 28672}))
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits,pack", [(4, True), (4, False), (8, False)])
def test_quantize_plain_exact(K: int, M: int, bits: int, pack: bool) -> None:
    from vllm_ruquant.kernels.rotate_quant import rotate_quant

    x = _randn(M, K)
    clip = 0.9 if bits == 4 else 1.0
    out = torch.full((M, K // 2 if pack else K), 0x5A, dtype=torch.uint8 if pack else torch.int8,
                     device="cuda")
    out_s = torch.full((M,), POISON_F, device="cuda")
    q, s = rotate_quant(x, bits, clip, None, pack=pack, out=out, out_scale=out_s)
    _check_quant(q, s, x.cpu(), bits, clip, pack, exact=True)


@pytest.mark.parametrize("K", [4096, 8192, 14336, 28672, 11008])
@pytest.mark.parametrize("M", MS)
def test_rotate_quant_hadamard(K: int, M: int) -> None:
    """Power-of-two sizes are bit-exact (same butterflies); m*2^k within fp32 rounding."""
    from vllm_ruquant.hadamard import factor_size
    from vllm_ruquant.kernels.rotate_quant import rotate_quant

    rot = ref.OnlineRotation("hadamard", K)
    x = _randn(M, K)
    out = torch.full((M, K // 2), 0x5A, dtype=torch.uint8, device="cuda")
    out_s = torch.full((M,), POISON_F, device="cuda")
    q, s = rotate_quant(x, 4, 1.0, rot, out=out, out_scale=out_s)
    xr = rot.apply(x.cpu())
    _check_quant(q, s, xr, 4, 1.0, True, exact=factor_size(K)[0] == 1)
    # rotation only (weight-only layers): bf16 of the fp32 rotation
    out_b = torch.full((M, K), POISON_F, dtype=torch.bfloat16, device="cuda")
    y, _ = rotate_quant(x, 16, rotation=rot, out=out_b)
    _assert_bf16_close(y.cpu(), xr.to(torch.bfloat16), noise=torch.full((), 1e-5))


@pytest.mark.parametrize("b", [64, 128, 96, 256])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("bits,pack", [(4, True), (8, False)])
def test_rotate_quant_block_diagonal(b: int, M: int, bits: int, pack: bool) -> None:
    from vllm_ruquant.kernels.rotate_quant import rotate_quant

    K = 4096 if 4096 % b == 0 else 96 * 40
    blocks = torch.linalg.qr(torch.randn(K // b, b, b, dtype=torch.float64))[0].float()
    rot = ref.OnlineRotation("block_diagonal", K, blocks)
    x = _randn(M, K)
    out_s = torch.full((M,), POISON_F, device="cuda")
    q, s = rotate_quant(x, bits, 1.0, rot, pack=pack, blocks=blocks.cuda(), out_scale=out_s)
    _check_quant(q, s, rot.apply(x.cpu()), bits, 1.0, pack, exact=False)


# ------------------------------------------------------------------------------ GEMMs

_VARIANTS = {  # name: (weight bits, act bits, group, fp8)
    "w4a4": (4, 4, -1, False),
    "w4a4_fp8": (4, 4, -1, True),
    "w4a4_g128": (4, 4, 128, False),
    "w4a8": (4, 8, -1, False),
    "w4a8_g128": (4, 8, 128, False),
    "w8a8": (8, 8, -1, False),
}


def _operands(variant: str, M: int, K: int, N: int, bias: bool):
    from vllm_ruquant.kernels import layout

    wb, ab, g, fp8 = _VARIANTS[variant]
    w_q, w_s = ref.quantize_weight(torch.randn(N, K, device="cuda"), wb, g)
    a_q, a_s = ref.quantize_activation(torch.randn(M, K) * 2, ab)  # CPU: the IEEE division
    a_q, a_s = a_q.cuda(), a_s.cuda()
    chunk = layout.chunk_for(K, g) or 128
    if wb == 4 and ab == 4:
        a, a_mode, b, b_mode = ref.pack_int4(a_q), 1, ref.pack_int4(w_q), 1
    elif wb == 4:
        a, a_mode, b, b_mode = a_q, 0, layout.pack_chunked(w_q, chunk), 2
    else:
        a, a_mode, b, b_mode = a_q, 0, w_q, 0
    bias_t = torch.randn(N, device="cuda").to(torch.bfloat16) if bias else None
    yr = ref.int_linear(a_q, a_s, w_q, w_s, g, bias_t, torch.bfloat16)
    kw = dict(a_mode=a_mode, b_mode=b_mode, K=K, group_size=g, chunk=chunk, bias=bias_t, use_fp8=fp8)
    return a, a_s[:, 0].contiguous(), b, w_s, kw, yr


def _assert_exact(y: torch.Tensor, yr: torch.Tensor) -> None:
    assert not torch.isnan(y).any(), "unwritten (poisoned) outputs"
    if not torch.equal(y, yr):
        _assert_bf16_close(y, yr)  # report how far; then fail: the epilogue should be bitwise
        raise AssertionError(f"{int((y != yr).sum())} of {y.numel()} outputs differ in the last bit")


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_qgemm_exact(K: int, N: int, M: int, variant: str) -> None:
    from vllm_ruquant.kernels.gemm import qgemm

    a, a_s, b, w_s, kw, yr = _operands(variant, M, K, N, bias=M != 7)
    out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
    y = qgemm(a, a_s, b, w_s, out=out, **kw)
    _assert_exact(y, yr)


@pytest.mark.parametrize("variant", ["w4a4", "w4a8", "w8a8", "w4a4_fp8"])
@pytest.mark.parametrize("M", [1, 33, 300])
def test_qgemm_every_config(variant: str, M: int) -> None:
    """Each config the autotuner may pick for this M bucket, on a 4096 x 6144 layer."""
    from vllm_ruquant.kernels.gemm import configs_for, qgemm

    K, N = 4096, 6144
    a, a_s, b, w_s, kw, yr = _operands(variant, M, K, N, bias=True)
    for cfg in configs_for(M, K, kw["group_size"], kw["b_mode"], kw["chunk"]):
        out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
        y = qgemm(a, a_s, b, w_s, config=cfg, out=out, **kw)
        try:
            _assert_exact(y, yr)
        except AssertionError as e:
            raise AssertionError(f"config {cfg}: {e}") from e


@pytest.mark.parametrize("variant", ["w4a4", "w4a8"])
@pytest.mark.parametrize("M", [1, 33, 300])
def test_qgemm_plain_unpack(variant: str, M: int) -> None:
    """The portable (non-asm) nibble unpack, in case the inline assembly is unavailable."""
    from vllm_ruquant.kernels.gemm import configs_for, qgemm

    K, N = 4096, 4096
    a, a_s, b, w_s, kw, yr = _operands(variant, M, K, N, bias=True)
    cfg = configs_for(M, K, kw["group_size"], kw["b_mode"], kw["chunk"])[0]
    cfg = type(cfg)(dict(cfg.kwargs, ASM=0), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
    _assert_exact(qgemm(a, a_s, b, w_s, config=cfg, out=out, **kw), yr)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("group", [-1, 128])
def test_w4a16(K: int, N: int, M: int, group: int) -> None:
    from vllm_ruquant.kernels import layout
    from vllm_ruquant.kernels.dequant_gemm import w4a16_gemm

    x = _randn(M, K)
    w_q, w_s = ref.quantize_weight(torch.randn(N, K, device="cuda"), 4, group)
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    yr = ref.quantized_linear(x, w_q, w_s, act_bits=16, group_size=group, bias=bias)
    out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
    chunk = layout.chunk_for(K, group)
    y = w4a16_gemm(x, layout.pack_chunked(w_q, chunk), w_s, K=K, group_size=group, chunk=chunk,
                   bias=bias, out=out)
    # fp32 summation order differs from cuBLAS: noise ~ K * 2^-24 * sum|x w|
    w = ref.dequantize_weight(w_q, w_s, group).to(torch.bfloat16).float()
    noise = (x.float().abs() @ w.abs().T) * (K * 2.0**-24) + 1e-6
    _assert_bf16_close(y, yr, noise=noise)


# ------------------------------------------------------------------------ backend end to end


_BACKEND_CASES = [  # (weight bits, act bits, group, rotation, K, N[, "full_range"])
    (4, 4, -1, None, 4096, 6144),
    (4, 4, -1, "hadamard", 4096, 4096),
    (4, 4, -1, "hadamard", 14336, 4096),
    (4, 4, 128, None, 4096, 4096),
    (4, 8, -1, "hadamard", 14336, 4096),
    (4, 8, 128, None, 4096, 4096),
    (8, 8, -1, None, 4096, 4096),
    (4, 16, -1, None, 4096, 4096),
    (4, 16, 128, "hadamard", 14336, 4096),
    (4, 4, -1, "block_diagonal", 4096, 4096),
    # dimension expansion: a 4000-wide input zero-padded to 4096 before the Hadamard
    (4, 4, -1, "padded", 4096, 4096),
    (4, 8, -1, "padded", 4096, 4096),
    (4, 16, -1, "padded", 4096, 4096),
    # issue 20: input sizes without a whole 128-wide tile are zero-padded to one; H_344 > 64 rotates in torch
    (4, 4, -1, "hadamard", 344, 512),
    (4, 8, -1, "hadamard", 344, 512),
    (4, 16, -1, "hadamard", 344, 512),
    (4, 4, -1, None, 172, 512),
    (4, 4, 64, None, 576, 512),
    (4, 8, -1, "hadamard", 576, 512),
    (4, 4, 128, "hadamard", 1536, 512),
    (4, 16, -1, "hadamard", 1536, 512),
    (4, 4, -1, "hadamard", 11008, 4096),  # Llama-2-7B down_proj: H_344 (x) H_32
    (4, 16, -1, "hadamard", 11008, 4096),
    # issue 24: the full-range weight grid of the w4a8 / w4a16 defaults (about half the scales negative)
    (4, 8, 64, None, 4096, 4096, "full_range"),
    (4, 8, 64, None, 576, 512, "full_range"),
    (4, 4, -1, "hadamard", 4096, 4096, "full_range"),
    (4, 16, 64, "hadamard", 14336, 4096, "full_range"),
]


@pytest.mark.parametrize("case", _BACKEND_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("M", [1, 33])
def test_triton_backend_matches_reference(case: tuple, M: int) -> None:
    from vllm_ruquant.hadamard import factor_size
    from vllm_ruquant.kernels import TritonBackend

    wb, ab, g, rot_kind, K, N, *flags = case
    if rot_kind == "hadamard":
        rot = ref.OnlineRotation("hadamard", K)
    elif rot_kind == "block_diagonal":
        rot = ref.OnlineRotation("block_diagonal", K, torch.linalg.qr(torch.randn(K // 128, 128, 128))[0])
    elif rot_kind == "padded":
        rot = ref.OnlineRotation("hadamard", K, padded_from=K - 96)
    else:
        rot = None
    spec = LinearSpec(K, N, wb, g, ab, clip_ratio=0.95 if ab == 4 else 1.0, rotation=rot)
    w_q, w_s = ref.quantize_weight(torch.randn(N, K), wb, g, full_range="full_range" in flags)
    assert ((w_s < 0).any()) == ("full_range" in flags)
    qweight = ref.pack_weight(w_q, wb)
    bias = torch.randn(N).to(torch.bfloat16)
    x = (torch.randn(3, M, K if rot is None else rot.in_features) * 2).to(torch.bfloat16)
    yr = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, bias)
    tb = TritonBackend()
    prepared = tb.prepare(spec, qweight.cuda(), w_s.cuda())
    y = tb.apply(spec, prepared, x.cuda(), bias.cuda()).cpu()
    assert y.shape == yr.shape and y.dtype == yr.dtype
    exact_ints = rot_kind is None or (rot_kind in ("hadamard", "padded") and factor_size(K)[0] == 1)
    if ab < 16 and exact_ints:
        _assert_exact(y, yr)
    else:
        # one integer step here and there (dense rotation factor) or bf16 products (weight-only)
        rel = ((y.float() - yr.float()).norm() / yr.float().norm()).item()
        assert rel < (2e-3 if ab < 16 else 5e-3), f"relative error {rel:.2e}"


_GRAPH_CASES = [  # (weight bits, act bits, rotation, K): the paths a decode step takes
    (4, 4, "hadamard", 344),     # H_344 > 64: torch rotation with a device-resident factor
    (4, 4, "hadamard", 11008),   # Llama-2-7B down_proj: H_344 (x) H_32
    (4, 8, "hadamard", 344),     # the same on the int8-activation path
    (4, 4, "hadamard", 1536),    # H_12 (x) H_128: rotate_rows, then the GEMV (M = 1) or quantize + GEMM
    (4, 4, "hadamard", 14336),   # Llama-3-8B down_proj: H_28 (x) H_512, the same
    (4, 8, "hadamard", 14336),
    (4, 8, None, 4096),          # no rotation: quantized inside the GEMM (M <= 16)
    (4, 16, "hadamard", 344),    # weight-only on a padded K
]


@pytest.mark.parametrize("case", _GRAPH_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("M", [1, 16])
def test_triton_backend_replays_in_a_cuda_graph(case: tuple, M: int) -> None:
    """A decode step is a CUDA-graph replay in vLLM: every path must capture (no host copy,
    sync or allocation that capture forbids) and replay what it computes eagerly, bit for bit.

    vLLM's order: load (``prepare``), a profiling run at a large M, then per decode size a
    warm-up run and the capture. Issue 20: the H_344 rotation copied its factor from the host
    on every call, which capture refuses, so ``vllm serve`` died at start on intermediate 344.
    """
    from vllm_ruquant.kernels import TritonBackend

    wb, ab, rot_kind, K = case
    rot = ref.OnlineRotation("hadamard", K) if rot_kind else None
    spec = LinearSpec(K, 512, wb, -1, ab, clip_ratio=1.0, rotation=rot)
    w_q, w_s = ref.quantize_weight(torch.randn(512, K), wb, -1)
    tb = TritonBackend()
    prepared = tb.prepare(spec, ref.pack_weight(w_q, wb).cuda(), w_s.cuda())
    bias = torch.randn(512, device="cuda").to(torch.bfloat16)
    xs = [(torch.randn(M, K, device="cuda") * 2).to(torch.bfloat16) for _ in range(3)]
    tb.apply(spec, prepared, torch.randn(256, K, device="cuda").to(torch.bfloat16), bias)  # profiling run
    static_x = xs[0].clone()
    tb.apply(spec, prepared, static_x, bias)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tb.apply(spec, prepared, static_x, bias)
    for x in xs[1:]:
        static_x.copy_(x)
        graph.replay()
        eager = tb.apply(spec, prepared, x, bias)
        torch.cuda.synchronize()
        assert torch.equal(static_y, eager), (static_y - eager).abs().max().item()

@pytest.mark.parametrize("ab,g", [(4, -1), (8, 128)])
@pytest.mark.parametrize("M", [1, 16])
def test_triton_backend_on_integers_quantized_in_the_graph(monkeypatch, ab: int, g: int, M: int) -> None:
    """``apply_quantized`` (the compiled model's path, default on: integers from
    Inductor's quantization) is the reference's integer linear on those integers, bit for bit, at the
    GEMV's and the GEMM's sizes."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels import backend as be

    monkeypatch.setattr(be, "GRAPH_QUANT", True)

    K, N = 4096, 1024
    spec = LinearSpec(K, N, 4, g, ab, clip_ratio=0.9)
    tb = TritonBackend()
    assert tb.quantizes_in_graph(spec)
    w_q, w_s = ref.quantize_weight(torch.randn(N, K), 4, g)
    prepared = tb.prepare(spec, ref.pack_weight(w_q, 4).cuda(), w_s.cuda())
    q, s = ref.quantize_activation((torch.randn(M, K) * 2).to(torch.bfloat16), ab, 0.9)
    bias = torch.randn(N).to(torch.bfloat16)
    y = tb.apply_quantized(spec, prepared, q.cuda(), s.cuda(), bias.cuda(), torch.bfloat16).cpu()
    _assert_exact(y, ref.int_linear(q, s, w_q, w_s, g, bias, torch.bfloat16))


def test_warm_up_leaves_nothing_to_tune_at_served_sizes(monkeypatch) -> None:
    """After ``warm_up`` (load time) a layer meets no new autotuner key at any served number of tokens up
    to the engine's largest step: the calls of a throughput run's mixed steps time nothing. The outputs
    stay the reference's (a warmed config is an autotuned one)."""
    from vllm_ruquant.kernels import TritonBackend, gemm
    from vllm_ruquant.kernels import backend as be

    monkeypatch.setattr(be, "_PRETUNED", set())
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "1")
    K, N = 4096, 1536  # a shape no other test tunes
    spec = LinearSpec(K, N, 4, -1, 4, clip_ratio=0.9)
    tb = TritonBackend()
    w_q, w_s = ref.quantize_weight(torch.randn(N, K), 4, -1)
    prepared = tb.prepare(spec, ref.pack_weight(w_q, 4).cuda(), w_s.cuda())
    assert tb.warm_up(spec, prepared, max_tokens=2048, dtype=torch.bfloat16) == 8  # buckets 16 .. 2048
    tuned = gemm._tuned_kernel(gemm._ASM["ok"])
    keys = set(tuned.cache)
    for m in (2, 17, 100, 300, 1000, 2048):
        q, s = ref.quantize_activation((torch.randn(m, K) * 2).to(torch.bfloat16), 4, 0.9)
        y = tb.apply_quantized(spec, prepared, q.cuda(), s.cuda(), None, torch.bfloat16).cpu()
        _assert_exact(y, ref.int_linear(q, s, w_q, w_s, -1, None, torch.bfloat16))
    assert set(tuned.cache) == keys, f"tuned while serving: {set(tuned.cache) - keys}"


@pytest.mark.parametrize("bits,clip", [(4, 0.9), (4, 1.0), (8, 1.0)])
def test_compiled_quantization_divides_like_eager(bits: int, clip: float) -> None:
    """What the compiled model fuses before an un-rotated layer (``reference.quantize_activation`` with the
    layer's qmax tensor, under the Inductor switches ``prepare`` sets) gives the reference's scales and
    integers bit for bit, on rows built to sit on the edges: absmax values whose ``absmax * clip / qmax``
    differs from ``absmax * clip * fl(1 / qmax)`` (Inductor's rewrite of a division by a constant on
    GPUs), and elements at half steps of that scale and one ulp either side (where Triton's approximate
    ``/`` rounds the other way). The same with a constant divisor is printed, not asserted."""
    from vllm_ruquant.kernels import inductor_setup

    inductor_setup.rounds_like_eager()
    qmax = ref.qmax_for(bits)
    a = torch.rand(20000, generator=torch.Generator().manual_seed(bits)) * 8 + 0.5
    a = a[(a * clip / qmax) != (a * clip * torch.tensor(1.0 / qmax))][:256]
    assert a.numel() == 256  # a reciprocal rounds differently for many scales
    half = (torch.arange(-qmax, qmax).float() + 0.5)[None, :] * (a * clip / qmax)[:, None]
    x = torch.cat([half, torch.nextafter(half, half + 1), torch.nextafter(half, half - 1), a[:, None]], dim=1)
    q_e, s_e = ref.quantize_activation(x, bits, clip)  # CPU eager: IEEE division
    torch._dynamo.reset()
    q_c, s_c = torch.compile(lambda t, d: ref.quantize_activation(t, bits, clip, d), fullgraph=True,
                             dynamic=False)(x.cuda(), torch.tensor(float(qmax), device="cuda"))
    torch._dynamo.reset()
    q_k, s_k = torch.compile(lambda t: ref.quantize_activation(t, bits, clip), fullgraph=True, dynamic=False)(x.cuda())
    print(f"\ncompiled quantization w{bits} clip {clip}: constant divisor {int((s_k.cpu() != s_e).sum())} of "
          f"{s_e.numel()} scales and {int((q_k.cpu() != q_e).sum())} of {q_e.numel()} integers differ from eager; "
          f"qmax tensor {int((s_c.cpu() != s_e).sum())} and {int((q_c.cpu() != q_e).sum())}")
    assert torch.equal(s_c.cpu(), s_e)
    assert torch.equal(q_c.cpu(), q_e)


@pytest.mark.parametrize("tokens", [1, 16])
def test_norm_and_quantization_compile_to_one_pass(tokens: int) -> None:
    """Under the settings ``prepare`` makes (``inductor_setup``), Inductor compiles what vLLM's graph holds
    before qkv / gate_up (residual add, bf16 RMSNorm, per-token int4 quantization on the layer's qmax tensor)
    into persistent kernels: each row read once, not a looped reduction over it three times. The integers
    and scales are the reference's for the normed row the compiled graph made."""
    import re

    from torch._inductor.utils import fresh_inductor_cache, run_and_get_code

    from vllm_ruquant.kernels import inductor_setup

    inductor_setup.configure_for_graph_quant()
    gen = torch.Generator().manual_seed(tokens)
    h, r = ((torch.randn(tokens, 4096, generator=gen) * 3).to(torch.bfloat16).cuda() for _ in range(2))
    gamma = (torch.rand(4096, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    qmax = torch.tensor(7.0, device="cuda")

    def add_norm_quantize(h: torch.Tensor, r: torch.Tensor):
        s = h.float() + r.float()
        x = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * gamma
        return (*ref.quantize_activation(x, 4, 0.9, qmax), x, s.to(torch.bfloat16))

    torch._dynamo.reset()
    for t in (h, r):  # vLLM compiles for any number of tokens
        torch._dynamo.mark_dynamic(t, 0)
    with fresh_inductor_cache():
        (q, scale, x, _), codes = run_and_get_code(torch.compile(add_norm_quantize, fullgraph=True), h, r)
    kernels = re.findall(r"def (triton_\w+)\(", "\n".join(codes))
    print(f"\nnorm + quantization, {tokens} tokens: {kernels}")
    assert kernels and all(k.startswith(("triton_per_", "triton_poi_")) for k in kernels), kernels
    q_ref, s_ref = ref.quantize_activation(x.cpu(), 4, 0.9)  # CPU eager: IEEE division
    assert torch.equal(scale.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)


# ------------------------------------------------------------------------------ decode GEMV

_GEMV_VARIANTS = {  # name: (act bits, clip, group, a_mode): what TritonBackend runs at decode sizes
    "w4a4_fused": (4, 0.9, -1, 2),  # un-rotated W4A4: float activations quantized in the kernel
    "w4a8_fused_g128": (8, 1.0, 128, 2),
    "w4a4_int8": (4, 0.9, -1, 0),  # rotated: rotate_quant's int8-held integers
    "w4a8_g128": (8, 1.0, 128, 0),
    "w4a4_packed": (4, 0.9, -1, 1),  # RUQUANT_W4A4_PACKED_ACT=1
}
_GEMV_PARAMS = [pytest.param(v, dt, id=f"{v}-{str(dt)[6:]}") for v in _GEMV_VARIANTS
                for dt in (torch.bfloat16, torch.float16) if dt == torch.bfloat16 or v in ("w4a4_fused", "w4a4_int8")]


def _gemv_operands(variant: str, M: int, K: int, N: int, dtype: torch.dtype):
    """(qgemm / qgemv positional args, keyword args, the reference's output) on fresh random data."""
    from vllm_ruquant.kernels import layout

    ab, clip, g, a_mode = _GEMV_VARIANTS[variant]
    x = _randn(M, K, dtype=dtype)
    w_q, w_s = ref.quantize_weight(torch.randn(N, K, device="cuda"), 4, g)
    a_q, a_s = ref.quantize_activation(x.cpu(), ab, clip)  # CPU: the IEEE division
    a_q, a_s = a_q.cuda(), a_s.cuda()
    bias = torch.randn(N, device="cuda").to(dtype)
    chunk = layout.chunk_for(K, g) or 128
    kw = dict(K=K, group_size=g, chunk=chunk, bias=bias, out_dtype=dtype)
    if a_mode == 1:
        args = (ref.pack_int4(a_q), a_s[:, 0].contiguous(), ref.pack_int4(w_q), w_s)
        kw.update(a_mode=1, b_mode=1)
    elif a_mode == 0:
        args = (a_q, a_s[:, 0].contiguous(), layout.pack_chunked(w_q, chunk), w_s)
        kw.update(a_mode=0, b_mode=2)
    else:
        args = (x, None, layout.pack_chunked(w_q, chunk), w_s)
        kw.update(a_mode=2, b_mode=2, act_bits=ab, clip_ratio=clip)
    return args, kw, ref.int_linear(a_q, a_s, w_q, w_s, g, bias, dtype)


@pytest.mark.parametrize("K,N", SHAPES[:4])
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("variant,dtype", _GEMV_PARAMS)
def test_qgemv_exact(K: int, N: int, M: int, variant: str, dtype: torch.dtype) -> None:
    """The decode GEMV on Llama-3-8B's four linears: the reference's bits, and qgemm's."""
    from vllm_ruquant.kernels.gemm import qgemm
    from vllm_ruquant.kernels.gemv import qgemv

    args, kw, yr = _gemv_operands(variant, M, K, N, dtype)
    for _ in range(2):  # the second call needs the block counters left at zero
        out = torch.full((M, N), POISON_F, dtype=dtype, device="cuda")
        y = qgemv(*args, **kw, out=out)
        _assert_exact(y, yr)
    assert torch.equal(y, qgemm(*args, **kw))


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("variant", ["w4a4_fused", "w4a4_int8"])
def test_qgemv_every_config(variant: str, M: int) -> None:
    """Each tile ``decode_linears.py --gemv-sweep`` times (M = 3: rows padded to 4), and the plain
    (non-asm) products."""
    from vllm_ruquant.kernels.gemv import SWEEP, qgemv

    K, N = 4096, 6144
    args, kw, yr = _gemv_operands(variant, M, K, N, torch.bfloat16)
    for cfg in SWEEP:
        out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
        try:
            _assert_exact(qgemv(*args, **kw, config=cfg, out=out), yr)
        except AssertionError as e:
            raise AssertionError(f"config {cfg}: {e}") from e
    out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
    _assert_exact(qgemv(*args, **kw, asm=False, out=out), yr)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("variant", ["w4a4_int8", "w4a4_packed"])
def test_qgemv_k_loop_tiles(variant: str, M: int) -> None:
    """The tiles that walk every K slice in one program (``k_loop``) on down_proj's K = 14336 (7 slices):
    the reference's bits."""
    from vllm_ruquant.kernels.gemv import SWEEP, launch_shape, qgemv

    K, N = 14336, 4096
    args, kw, yr = _gemv_operands(variant, M, K, N, torch.bfloat16)
    tiles = [cfg for cfg in SWEEP if cfg.k_loop]
    assert tiles and all(launch_shape(cfg, M, N, K, 0, a_mode=kw["a_mode"])["KSTEPS"] > 1 for cfg in tiles)
    for cfg in tiles:
        for _ in range(2):
            out = torch.full((M, N), POISON_F, dtype=torch.bfloat16, device="cuda")
            try:
                _assert_exact(qgemv(*args, **kw, config=cfg, out=out), yr)
            except AssertionError as e:
                raise AssertionError(f"config {cfg}: {e}") from e


@pytest.mark.parametrize("variant", ["w4a4_fused", "w4a4_int8", "w4a8_g128"])
def test_qgemv_eight_rows(variant: str) -> None:
    """The most rows the kernel holds (past the backend's default GEMV_MAX_M of 4)."""
    from vllm_ruquant.kernels.gemv import qgemv

    args, kw, yr = _gemv_operands(variant, 8, 4096, 4096, torch.bfloat16)
    out = torch.full((8, 4096), POISON_F, dtype=torch.bfloat16, device="cuda")
    _assert_exact(qgemv(*args, **kw, out=out), yr)


def test_qgemv_replays_in_a_cuda_graph() -> None:
    """Two layers of different shapes sharing the workspace and counters, captured once, replayed on new
    inputs: each replay equals an eager call (the counters come back zeroed, nothing is allocated)."""
    from vllm_ruquant.kernels.gemv import qgemv

    layers = [_gemv_operands("w4a4_fused", 2, 4096, 6144, torch.bfloat16),
              _gemv_operands("w4a4_int8", 2, 14336, 4096, torch.bfloat16)]
    for args, kw, _ in layers:
        qgemv(*args, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [qgemv(*args, **kw) for args, kw, _ in layers]
    for _ in range(3):
        for args, _, _ in layers:
            args[0].copy_(torch.randn_like(args[0].float()).to(args[0].dtype) if args[0].is_floating_point()
                          else torch.randint_like(args[0], -8, 8))
        graph.replay()
        torch.cuda.synchronize()
        for (args, kw, _), y in zip(layers, outs, strict=True):
            assert torch.equal(y, qgemv(*args, **kw))


@pytest.mark.parametrize("case", [(4, -1, None, 4096, 6144), (4, -1, "hadamard", 14336, 4096),
                                  (8, 128, None, 4096, 4096), (4, -1, "hadamard", 344, 512)],
                         ids=lambda c: "-".join(map(str, c)))
def test_triton_backend_gemv_matches_the_default_path(monkeypatch, case: tuple) -> None:
    """RUQUANT_GEMV=1: decode sizes through qgemv, the same bits as through qgemm."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels import backend as backend_mod

    ab, g, rot_kind, K, N = case
    rot = ref.OnlineRotation("hadamard", K) if rot_kind else None
    spec = LinearSpec(K, N, 4, g, ab, clip_ratio=0.95 if ab == 4 else 1.0, rotation=rot)
    w_q, w_s = ref.quantize_weight(torch.randn(N, K), 4, g)
    tb = TritonBackend()
    prepared = tb.prepare(spec, ref.pack_weight(w_q, 4).cuda(), w_s.cuda())
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    for M in range(1, backend_mod.GEMV_MAX_M + 1):
        x = _randn(M, K)
        monkeypatch.setattr(backend_mod, "GEMV", False)
        want = tb.apply(spec, prepared, x, bias)
        monkeypatch.setattr(backend_mod, "GEMV", True)
        assert torch.equal(tb.apply(spec, prepared, x, bias), want), f"M={M}"
