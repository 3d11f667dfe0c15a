"""Property tests of every reference op (the CPU serving path and the GPU kernels' oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_ruquant import reference as ref
from vllm_ruquant.hadamard import SUPPORTED_FACTORS, factor_size, hadamard_matrix, small_hadamard

FAST = settings(max_examples=25, deadline=None)


@FAST
@given(rows=st.integers(1, 9), half=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_int4_pack_round_trip(rows: int, half: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, 2 * half), generator=g, dtype=torch.int8)
    packed = ref.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half)
    assert torch.equal(ref.unpack_int4(packed), q)
    # layout: element 2i in the low nibble, two's complement
    assert int(packed[0, 0]) & 0xF == int(q[0, 0]) & 0xF
    assert int(packed[0, 0]) >> 4 == int(q[0, 1]) & 0xF


def test_int4_pack_rejects_out_of_range_and_odd() -> None:
    with pytest.raises(ValueError):
        ref.pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        ref.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("m", SUPPORTED_FACTORS)
def test_every_supported_factor_is_hadamard(m: int) -> None:
    h = small_hadamard(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m))


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float16])
def test_rotations_ignore_the_default_dtype(default_dtype: torch.dtype) -> None:
    """vLLM builds layers under ``set_default_dtype(bf16)``; the cached factors stay fp32 (issue 20)."""
    small_hadamard.cache_clear()
    hadamard_matrix.cache_clear()
    x = torch.randn(3, 344, dtype=torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        assert small_hadamard(344).dtype == torch.float32  # first built (and cached) under bf16/fp16
        y = ref.hadamard_transform(x)
        q = ref.OnlineRotation("hadamard", 344).matrix()
    finally:
        torch.set_default_dtype(previous)
    assert y.dtype == torch.float32 and q.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ (hadamard_matrix(344).double() / math.sqrt(344)),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.hadamard_transform(x.bfloat16()), y, rtol=0.02, atol=0.02)


# 5504 and 172: 11008 and 344 split over two tensor-parallel ranks (issue 25)
@pytest.mark.parametrize("n", [11008, 13824, 14336, 18944, 4096, 896, 3584, 28672, 5504, 172, 156])
def test_llm_sizes_factor(n: int) -> None:
    m, p = factor_size(n)
    assert m * p == n and p & (p - 1) == 0 and m in (1, *SUPPORTED_FACTORS)


# The factor a size uses is absorbed into every checkpoint converted for it (the format stores
# only the size): checkpoints of 344 / 11008 converted before H_172 existed hold H_344 (Paley I),
# and serving them with H_172 (x) H_2 would be another rotation. Adding the Williamson orders
# may only make new sizes work (172, 156), never change an existing answer.
@pytest.mark.parametrize("n,want", [(344, (344, 1)), (11008, (344, 32)), (5504, (344, 16)), (688, (344, 2)),
                                    (312, (312, 1)), (172, (172, 1)), (156, (156, 1))])
def test_factor_choice_is_stable_for_converted_checkpoints(n: int, want: tuple[int, int]) -> None:
    assert factor_size(n) == want


def test_unsupported_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no Hadamard rotation of size 13696"):
        factor_size(13696)


@pytest.mark.parametrize("n", [2, 64, 12 * 4, 20 * 8, 28 * 2, 40, 108, 344 * 2, 148 * 2, 156, 172])
def test_hadamard_transform_matches_matrix_and_is_orthogonal(n: int) -> None:
    x = torch.randn(5, n, dtype=torch.float64)
    h = hadamard_matrix(n).double()
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    y = ref.hadamard_transform(x)
    torch.testing.assert_close(y.double(), x @ h / math.sqrt(n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1).double(), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 64, 256, 512, 4096, 1536, 344 * 2, 11008])
def test_hadamard_as_matmul_is_the_same_transform(n: int) -> None:
    """Inside ``hadamard_as_matmul`` the transform (one dense factor up to 256, two above, times H_m) and
    its gradient are the butterflies' up to fp32 summation order; outside, the butterflies again."""
    x = torch.randn(3, 5, n, dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 5, n)
    y_ref = ref.hadamard_transform(x)
    (grad_ref,) = torch.autograd.grad(y_ref, x, g)
    with ref.hadamard_as_matmul():
        y = ref.hadamard_transform(x)
        (grad,) = torch.autograd.grad(y, x, g)
        rht = ref.kv_rht(x[..., :64])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rht, ref.kv_rht(x[..., :64]), rtol=1e-5, atol=1e-5)
    if factor_size(n)[1] > 2:  # it did run another summation order (a 2-point transform has one)
        assert not torch.equal(y, y_ref)
    assert torch.equal(ref.hadamard_transform(x), y_ref)  # the switch is off again after the block


def test_hadamard_as_matmul_is_off_after_an_error() -> None:
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError), ref.hadamard_as_matmul():
        raise RuntimeError("a training step failed")
    assert torch.equal(ref.fwht(x), ref.fwht(x.clone()))  # butterflies: bitwise deterministic
    with ref.hadamard_as_matmul():
        dense = ref.fwht(x)
    assert not torch.equal(ref.fwht(x), dense)


def test_block_diagonal_rotation_matches_dense() -> None:
    blocks = torch.linalg.qr(torch.randn(3, 8, 8))[0]
    rot = ref.OnlineRotation("block_diagonal", 24, blocks)
    x = torch.randn(4, 24)
    torch.testing.assert_close(rot.apply(x), x @ torch.block_diag(*blocks), rtol=1e-5, atol=1e-5)


@FAST
@given(bits=st.sampled_from([4, 6, 8]), k=st.integers(2, 300), seed=st.integers(0, 2**31 - 1),
       clip=st.sampled_from([1.0, 0.9]))
def test_activation_quantization_error_bound(bits: int, k: int, seed: int, clip: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, k, generator=g) * torch.rand(7, 1, generator=g) * 10
    q, s = ref.quantize_activation(x, bits, clip)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and int(q.max()) <= qmax and int(q.min()) >= -qmax - 1
    err = (q.float() * s - x).abs()
    inside = x.abs() <= clip * x.abs().amax(-1, keepdim=True)  # not clipped
    assert bool((err[inside] <= s.expand_as(x)[inside] / 2 + 1e-6).all())


def test_activation_quantization_zero_and_huge_rows_are_finite() -> None:
    x = torch.zeros(3, 16)
    x[1, 3] = 3e38
    x[2] = 1e-40  # subnormal row
    q, s = ref.quantize_activation(x, 4)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q[0], torch.zeros(16, dtype=torch.int8))
    assert int(q[1, 3]) == 7


@FAST
@given(bits=st.sampled_from([3, 4, 6, 8]), group=st.sampled_from([-1, 8, 32]), seed=st.integers(0, 2**31 - 1))
def test_weight_quantization_error_bound(bits: int, group: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 64, generator=g)
    q, s = ref.quantize_weight(w, bits, group)
    assert s.shape == (12, 1 if group == -1 else 64 // group)
    deq = ref.dequantize_weight(q, s, group)
    step = s.repeat_interleave(64 if group == -1 else group, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())


def test_int_matmul_is_exact_beyond_fp32_range() -> None:
    a = torch.full((2, 28672), 127, dtype=torch.int8)
    w = torch.full((3, 28672), 7, dtype=torch.int8)
    w[0, 0] = 6  # breaks the symmetry so fp32 accumulation would round
    out = ref.int_matmul(a, w)
    assert out.dtype == torch.int32
    assert int(out[0, 0]) == 127 * 7 * 28671 + 127 * 6
    assert int(out[1, 1]) == 127 * 7 * 28672


@pytest.mark.parametrize(("w_max", "group"), [(8, 64), (8, -1), (128, -1)])
def test_int_linear_is_the_ordered_group_sum(w_max: int, group: int) -> None:
    """The contract every GEMM kernel is checked against, bit for bit: per group the exact integer
    product, scaled by the group's weight scale and added in group order in fp32; then the token
    scale. Rows span several of the CPU's accumulator blocks; int8 weights over 2048 inputs pass fp32's
    exact range (the fp64 path)."""
    torch.manual_seed(w_max + group)
    m, k, n = 300, 2048, 40
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-w_max, w_max, (n, k), dtype=torch.int8)
    g = k if group == -1 else group
    w_s, a_s, bias = torch.rand(n, k // g) / 100, torch.rand(m), torch.randn(n)
    expect = torch.zeros(m, n)
    for gi in range(k // g):
        exact = a[:, gi * g:(gi + 1) * g].long() @ w[:, gi * g:(gi + 1) * g].long().T
        expect = expect + exact.float() * w_s[:, gi]
    expect = (expect * a_s[:, None] + bias).to(torch.bfloat16)
    got = ref.int_linear(a, a_s, w, w_s, group, bias, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("act_bits", [4, 8, 16])
@pytest.mark.parametrize("group", [-1, 32])
def test_quantized_linear_matches_explicit_dequantized_math(act_bits: int, group: int) -> None:
    torch.manual_seed(act_bits + group)
    x, w = torch.randn(5, 128), torch.randn(48, 128)
    bias = torch.randn(48)
    rot = ref.OnlineRotation("hadamard", 128)
    wq, ws = ref.quantize_weight(w @ rot.matrix(), 4, group)
    y = ref.quantized_linear(x, wq, ws, act_bits=act_bits, group_size=group, rotation=rot, bias=bias)
    xr = rot.apply(x)
    xd = xr if act_bits >= 16 else ref.fake_quantize_activation(xr, act_bits)
    expect = xd @ ref.dequantize_weight(wq, ws, group).T + bias
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-4)
    # and it approximates the unquantized layer
    rel = (y - (x @ w.T + bias)).norm() / (x @ w.T + bias).norm()
    assert rel < (0.25 if act_bits == 4 else 0.12)
