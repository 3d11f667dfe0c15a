"""Plain-torch reference of every op the ruquant kernels do.

This module is three things at once: the CPU serving path (vLLM on the CPU runs these),
the converter's simulated-quantization path, and the oracle every GPU kernel is tested
against. It therefore fixes the exact arithmetic, which kernels must reproduce:

Conventions
-----------
* Rotations act on row vectors: ``rotate(x) = x @ Q`` with ``Q`` orthogonal. A linear
  layer ``y = x W^T`` whose input is rotated online stores ``W Q`` offline, so
  ``(x Q)(W Q)^T = x W^T``.
* Hadamard of size ``n = m * p`` (``p`` a power of two, see ``hadamard.factor_size``):
  ``Q = (H_m (x) H_p) / sqrt(n)``.  Viewing a row as an ``(m, p)`` matrix ``X``, ``x @ Q``
  is ``H_m^T X H_p / sqrt(n)``: a fast Walsh-Hadamard transform over ``p`` then a dense
  ``m x m`` product.
* Block-diagonal rotation: ``Q = diag(B_0, ..., B_{nb-1})`` with blocks ``(nb, b, b)``.
* Integers: ``b``-bit signed, range ``[-2^(b-1), 2^(b-1) - 1]``; ``qmax = 2^(b-1) - 1``.
* Dynamic per-token activation quantization, all in fp32 and in this order:
  ``absmax = max|x|`` over the row; ``scale = max(absmax * clip_ratio / qmax, FLT_MIN)``
  (a multiply, then an IEEE division); ``q = clamp(rint(x / scale))`` with
  round-half-to-even and IEEE division. Kernels: use ``div_rn`` and ``rint``.
* Weights: symmetric, per output channel (``group_size == -1``) or per group of
  ``group_size`` input channels; ``scale = max(absmax / qmax, FLT_MIN)`` in fp32.
* int4 packing: two values per byte along the last (input) dimension; element ``2i`` in
  the low nibble and ``2i + 1`` in the high nibble, each nibble two's complement.
* Quantized linear: exact integer dot products (int32 range) per output and weight
  group, then ``y = sum_g acc_g * w_scale[n, g] * x_scale[m]`` in fp32, then ``+ bias``,
  then a cast to the output dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vllm_ruquant.hadamard import factor_size, small_hadamard_on

FLT_MIN = torch.finfo(torch.float32).tiny


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def qmax_for(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"integer bits must be in 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last dim -> uint8 (..., K/2)."""
    if q.is_floating_point() or q.is_complex():
        raise TypeError(f"int4 packing takes integer codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 packing: values outside [-8, 7]")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 (..., K/2) -> int8 (..., K)."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {p.dtype}")
    lo = (p & 0xF).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int8)


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Storage form of integer weights: packed uint8 for 4 bits, int8 otherwise."""
    return pack_int4(q) if bits == 4 else q.to(torch.int8)


def unpack_weight(stored: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(stored) if bits == 4 else stored.to(torch.int8)


# ---------------------------------------------------------------------- quantization


def quantize_activation(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, qmax_divisor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric quantization over the last dim.

    Returns ``(q int8 (..., K), scale fp32 (..., 1))``. ``qmax_divisor``: the same qmax as a 0-d fp32
    tensor, for the same IEEE division; the compiled serving path passes one, because Inductor turns a
    division by a constant into a multiplication by its reciprocal on GPUs, which rounds differently.
    """
    qmax = qmax_for(bits)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp_min(absmax * clip_ratio / (qmax if qmax_divisor is None else qmax_divisor), FLT_MIN)
    q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax).to(torch.int8)
    return q, scale


def fake_quantize_activation(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize (fp32) with the exact arithmetic of ``quantize_activation``."""
    q, s = quantize_activation(x, bits, clip_ratio)
    return q.float() * s


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"group size {group_size} does not divide the input size {k}")
    return w.reshape(n, k // g, g)


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with magnitudes below ``FLT_MIN`` raised to ``FLT_MIN`` (an all-zero group still divides),
    any other value -- and its sign -- kept."""
    return torch.where(scale.abs() < FLT_MIN, torch.full_like(scale, FLT_MIN), scale)


def weight_scale(w: torch.Tensor, bits: int, group_size: int = -1, clip_ratio: float | torch.Tensor = 1.0,
                 full_range: bool = False) -> torch.Tensor:
    """Scales ``(N, G)`` of ``w (N, K)`` for the grid ``q * scale``, ``q`` in ``[-qmax - 1, qmax]``.

    Symmetric (default): ``clip * absmax / qmax``; the level ``-qmax - 1`` is only reached by clipping.
    ``full_range``: the scale is ``-clip * m / (qmax + 1)`` for the group's largest-magnitude weight ``m``
    (signed), so ``m`` lands on ``-qmax - 1``: steps finer by ``(qmax + 1) / qmax`` (8/7 at 4 bits) on
    ``m``'s side, while the other side's extreme clips at ``qmax``. The kernels multiply by the scale
    whatever its sign, so serving is unchanged (the rule of llama.cpp's Q4_0)."""
    wg = _grouped(w.float(), group_size)
    if not full_range:
        return nonzero_scale(wg.abs().amax(dim=-1) * clip_ratio / qmax_for(bits))
    m = wg.gather(-1, wg.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) * clip_ratio
    return nonzero_scale(-m / (qmax_for(bits) + 1))


def quantize_weight_with_scale(
    w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Round ``w (N, K)`` to integers on a given scale grid ``(N, G)`` -> int8 (N, K)."""
    qmax = qmax_for(bits)
    wg = _grouped(w.float(), group_size)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), -qmax - 1, qmax)
    return q.reshape(w.shape).to(torch.int8)


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int = -1, clip_ratio: float | torch.Tensor = 1.0,
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest on ``weight_scale``'s grid: ``w (N, K)`` -> ``(q int8 (N, K), scale fp32 (N, G))``."""
    scale = weight_scale(w, bits, group_size, clip_ratio, full_range)
    return quantize_weight_with_scale(w, scale, bits, group_size), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """int8 (N, K) and scale (N, G) -> fp32 (N, K)."""
    return (_grouped(q.float(), group_size) * scale.float().unsqueeze(-1)).reshape(q.shape)


# ------------------------------------------------------------------------ rotations


# Set by ``hadamard_as_matmul``: fwht as matrix products instead of butterflies.
_FWHT_AS_MATMUL = contextvars.ContextVar("fwht_as_matmul", default=False)
# Up to this size the Sylvester matrix is one dense factor; above, two (H_p = H_p1 (x) H_p2).
_ONE_FACTOR_MAX = 256


@contextlib.contextmanager
def hadamard_as_matmul() -> Iterator[None]:
    """Within the block, ``fwht`` (hence ``hadamard_transform`` and ``kv_rht``) multiplies by the
    Sylvester matrix instead of running butterflies: the same transform up to fp32 summation order.

    Why: on a CPU with autograd, each butterfly stage is a stack (an allocation and a copy) forward
    and backward; one or two BLAS products are 5-9x faster (SmolLM2's down_proj Hadamard, 12 x 128,
    forward + backward: 107 ms -> 17 ms; a 64-wide KV head: 5 ms -> 0.6 ms). The butterfly stays the
    default because it is the order the Triton kernels reproduce bit for bit, and the oracle their
    integers are checked against; training loops (scale tuning), whose values no kernel has to
    match, run under this switch.
    """
    token = _FWHT_AS_MATMUL.set(True)
    try:
        yield
    finally:
        _FWHT_AS_MATMUL.reset(token)


def _fwht_matmul(y: torch.Tensor) -> torch.Tensor:
    """``fwht`` as products with ``small_hadamard_on(p)``: for a power of two that is the Sylvester matrix
    in the butterflies' index order (symmetric, exact +-1)."""
    p = y.shape[-1]
    if p <= _ONE_FACTOR_MAX:
        return y @ small_hadamard_on(p, y.device)
    p1 = 1 << ((p.bit_length() - 1) // 2)  # Sylvester: H_p = H_p1 (x) H_p2, a row read as (p1, p2)
    z = y.reshape(*y.shape[:-1], p1, p // p1)
    z = torch.matmul(small_hadamard_on(p1, y.device), z) @ small_hadamard_on(p // p1, y.device)
    return z.reshape(y.shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (power of two), fp32.

    Equals ``x @ H_p`` for the Sylvester matrix ``H_p`` (symmetric). Butterflies, stage ``h = 1``
    first (the kernels' order), unless inside ``hadamard_as_matmul``.
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two size, got {p}")
    if _FWHT_AS_MATMUL.get():
        return _fwht_matmul(x.float())
    return _fwht_butterflies(x.float())


def _fwht_butterflies(y: torch.Tensor) -> torch.Tensor:
    p = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(*lead, p)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ (H_m (x) H_p) / sqrt(n)`` over the last dim, fp32 (n = x.shape[-1])."""
    n = x.shape[-1]
    m, p = factor_size(n)
    y = fwht(x.float().reshape(*x.shape[:-1], m, p))
    if m > 1:
        # (H_m^T X)[i, :] = sum_a H_m[a, i] X[a, :]
        y = torch.einsum("...ap,ai->...ip", y, small_hadamard_on(m, y.device))
    return y.reshape(x.shape) / math.sqrt(n)


def block_diagonal_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ diag(B_0, ..., B_{nb-1})`` over the last dim, fp32; blocks (nb, b, b)."""
    nb, b, _ = blocks.shape
    if x.shape[-1] != nb * b:
        raise ValueError(f"rotation of size {nb * b} applied to a dim of {x.shape[-1]}")
    y = torch.einsum("...ka,kab->...kb", x.float().reshape(*x.shape[:-1], nb, b), blocks.float())
    return y.reshape(x.shape)


@dataclass(frozen=True)
class OnlineRotation:
    """An online rotation as the plugin executes it: a Hadamard or a block-diagonal matrix."""

    kind: str  # "hadamard" | "block_diagonal"
    size: int
    blocks: torch.Tensor | None = None  # (nb, b, b) for "block_diagonal"
    # "hadamard" only: I_(size/b) (x) H_b, one Hadamard per tensor-parallel shard of the input
    block_size: int | None = None
    # "hadamard" only, dimension expansion: the input has ``padded_from`` features, zero-padded
    # to ``size`` (which has a Hadamard) before the rotation: x -> [x, 0] @ H_size / sqrt(size)
    padded_from: int | None = None

    @property
    def in_features(self) -> int:
        """The size of the vector the rotation reads (``size`` unless it zero-pads)."""
        return self.padded_from if self.padded_from is not None else self.size

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded from ``padded_from`` to ``size`` features (unchanged without padding)."""
        if self.padded_from is None:
            return x
        if x.shape[-1] != self.padded_from:
            raise ValueError(f"a rotation padded from {self.padded_from} applied to a dim of {x.shape[-1]}")
        return torch.nn.functional.pad(x, (0, self.size - self.padded_from))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "hadamard":
            x = self.pad(x)
            b = self.block_size
            if b is None or b == x.shape[-1]:
                return hadamard_transform(x)
            return hadamard_transform(x.reshape(*x.shape[:-1], -1, b)).reshape(x.shape)
        if self.kind == "block_diagonal":
            assert self.blocks is not None
            return block_diagonal_rotate(x, self.blocks)
        raise ValueError(f"unknown online rotation kind {self.kind!r}")

    def matrix(self) -> torch.Tensor:
        """The matrix Q (fp32, ``(in_features, size)``) with ``apply(x) == x @ Q``: orthogonal,
        or with padding the first ``padded_from`` rows of one (``Q Q^T = I``), for offline
        absorption (``W -> W Q``) and tests."""
        return self.apply(torch.eye(self.in_features, dtype=torch.float32))


# --------------------------------------------------------------------- linear layers


_INT_LINEAR_ROW_BLOCK = 128  # rows of int_linear's CPU accumulator block: 128 x N fp32 fits L2 for N up to ~4k


def _abs_max(t: torch.Tensor) -> int:
    return int(t.abs().max().item()) if t.numel() else 0


def _exact_sum_dtype(a: torch.Tensor, w: torch.Tensor, k: int) -> torch.dtype:
    """A float format in which sums of ``k`` products of ``a``'s and ``w``'s integers are exact: fp32
    when ``k * max|a| * max|w| < 2^24``, else fp64 (2^53); CPU has no fast int GEMM. On the CPU the
    bound reads the data; on a GPU it is the int8 worst case, because reading a value back to the
    host (``.item()``) would break CUDA-graph capture (the GPU's fallback path)."""
    bound = k * 128 * 128 if a.is_cuda else k * _abs_max(a) * _abs_max(w)
    return torch.float32 if bound < (1 << 24) else torch.float64


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact integer ``a (M, K) @ w (N, K)^T`` -> int32 (M, N), as the GPU's int MMA does
    (summed in ``_exact_sum_dtype``)."""
    dtype = _exact_sum_dtype(a, w, a.shape[-1])
    return (a.to(dtype) @ w.to(dtype).T).to(torch.int32)


def int_linear(a_q: torch.Tensor, a_s: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               group_size: int, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The integer half of ``quantized_linear``, from given integers: what every quantized GEMM
    kernel computes. Per group ``y += float(A_g @ W_g^T) * w_scale[:, g]`` in fp32, then
    ``* a_s`` (per token), ``+ bias``, one rounding to ``out_dtype``.

    ``a_q`` int8 (M, K), ``a_s`` fp32 (M,) or (M, 1), ``w_q`` int8 (N, K), ``w_scale`` (N, G).
    """
    n, k = w_q.shape
    g = k if group_size == -1 else group_size
    m = a_q.shape[0]
    # Each group's integer products as exact integers in one float format for all groups (any exact
    # one gives the same integers). With several groups on the CPU, blocks of rows keep a block's
    # accumulator in cache across the groups (benchmarks/int_linear_cpu.py); every output element
    # still sees the same operations in the same order.
    exact = _exact_sum_dtype(a_q, w_q, g)
    rows = _INT_LINEAR_ROW_BLOCK if g < k and not a_q.is_cuda else max(m, 1)
    w_exact, scale = w_q.to(exact), w_scale.float()
    y = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    for r0 in range(0, m, rows):
        a_block, y_block = a_q[r0:r0 + rows].to(exact), y[r0:r0 + rows]
        for gi in range(k // g):
            acc = (a_block[:, gi * g:(gi + 1) * g] @ w_exact[:, gi * g:(gi + 1) * g].T).float()
            y_block += acc.mul_(scale[:, gi])
    y = y * a_s.reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def quantized_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    act_bits: int,
    group_size: int = -1,
    clip_ratio: float = 1.0,
    rotation: OnlineRotation | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    act_shards: int = 1,
) -> torch.Tensor:
    """The ruquant linear: rotate -> quantize activations -> integer matmul -> scale.

    ``x (..., K)`` float; ``w_q (N, K)`` int8 (unpacked); ``w_scale (N, G)`` fp32.
    ``act_bits >= 16`` means no activation quantization (W-only: dequantized matmul).
    ``act_shards``: a row-parallel layer served on ``t`` tensor-parallel ranks quantizes each
    rank's slice of K with its own per-token scale and sums the partial outputs; this computes
    exactly that sum (shards in rank order, partials added in fp32).
    """
    if act_shards > 1:
        k = x.shape[-1]
        if k % act_shards or (group_size != -1 and (k // act_shards) % group_size):
            raise ValueError(f"cannot split K={k} (group size {group_size}) into {act_shards} shards")
        ks, gs = k // act_shards, (1 if group_size == -1 else (k // act_shards) // group_size)
        xr = rotation.apply(x) if rotation is not None else x.float()
        y = None
        for r in range(act_shards):
            part = quantized_linear(
                xr[..., r * ks:(r + 1) * ks], w_q[:, r * ks:(r + 1) * ks],
                w_scale if group_size == -1 else w_scale[:, r * gs:(r + 1) * gs], act_bits=act_bits,
                group_size=group_size, clip_ratio=clip_ratio, out_dtype=torch.float32)
            y = part if y is None else y + part
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype or x.dtype)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if rotation is not None:
        x2 = rotation.apply(x2)
    if act_bits >= 16:
        w = dequantize_weight(w_q, w_scale, group_size).to(x.dtype)
        y = (x2.to(x.dtype) @ w.T).float()
    else:
        a_q, a_s = quantize_activation(x2, act_bits, clip_ratio)
        y = int_linear(a_q, a_s, w_q, w_scale, group_size)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, w_q.shape[0])


# ------------------------------------------------------------------------ KV cache
#
# The served 4-bit KV cache is vLLM's ``int4_per_token_head`` cache (TRITON_ATTN, vLLM
# 0.26 ``v1/attention/ops/int4_per_token_head.py``); these functions restate its
# arithmetic so that the converter and ``ruquant-eval`` compute what serving computes.
#
# * Per (token, head) asymmetric 4-bit rounding: ``scale = max((max - min) / 15, 1e-6)``,
#   ``zp = clamp(round(-min / scale), 0, 15)``, ``q = clamp(round(x / scale + zp), 0, 15)``
#   with round-half-away-from-zero; the zero point is stored in the low 4 mantissa bits of
#   the fp32 scale, so attention reads ``(q - zp) * (scale with those bits cleared)``.
#   As the zero point is clamped to [0, 15], a row that does not straddle zero is clipped
#   to [0, max - min] (or [min - max, 0]); rotated rows straddle zero in practice.
# * Rotations over head_dim, applied online to keys on cache write and to queries before
#   attention, leave ``q k^T`` unchanged and spread the keys' outlier channels:
#   - ``value_rotation == "offline"`` (ruquant's path, ``attention.py``): V/O
#     already carry a per-head R2 from the converter, so V is quantized as it comes; Q and
#     K are rotated by the orthonormal Hadamard ``H_d / sqrt(d)``.
#   - ``"online"`` (vLLM's built-in path): the randomized Hadamard ``R = H_d D``
#     (unnormalised, fixed +-1 signs ``D``, ``R^T R = d I``) on Q, K and V, the softmax
#     scale divided by ``d``, the attention output un-rotated.
#
# Other KV bit widths (3, 8) are simulation-only: symmetric absmax per (token, head), keys
# rotated by the orthonormal Hadamard.

KV4_SIGN_SEED = 0x9E3779B9  # vLLM's seed for the RHT signs (``_get_rht_signs(d, 0)``)
KV4_LEVELS = 15


def kv_rht_signs(d: int) -> torch.Tensor:
    """The +-1 diagonal ``D`` of vLLM's KV randomized Hadamard, bit-identical to vLLM's."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(KV4_SIGN_SEED)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


def kv_rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x @ (H_d D)^T`` (forward) or ``x @ (H_d D)`` (inverse) over head_dim, fp32, unnormalised.

    ``kv_rht(kv_rht(x), inverse=True) == d * x``.
    """
    signs = kv_rht_signs(x.shape[-1]).to(x.device)
    return fwht(x.float()) * signs if inverse else fwht(x.float() * signs)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def quantize_kv_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What vLLM's int4 cache stores for ``x`` (..., d): packed nibbles (..., d/2) uint8, element
    ``2j`` low, and the fp32 scale (...) with the zero point in its low 4 mantissa bits."""
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = torch.clamp_min((hi - lo) / KV4_LEVELS, 1e-6)
    zp = torch.clamp(_round_half_away(-lo / scale), 0, KV4_LEVELS)
    q = torch.clamp(_round_half_away(xf * (1.0 / scale) + zp), 0, KV4_LEVELS).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    stored = (scale.view(torch.int32) & -16) | zp.to(torch.int32)
    return packed, stored.view(torch.float32).squeeze(-1)


def dequantize_kv_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_kv_int4`` as attention reads it: ``(q - zp) * scale``, fp32."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).float()
    bits = scales.contiguous().view(torch.int32)[..., None]
    return (q - (bits & 0xF).float()) * (bits & -16).view(torch.float32)


def fake_quantize_kv_int4(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize per (token, head) over the last dim exactly as the int4 cache stores it."""
    return dequantize_kv_int4(*quantize_kv_int4(x))


def int4_cache_views(raw: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    """vLLM 0.26's int4 page ``raw`` (blocks, kv_heads, page, 2 (d/2 + 4)) uint8 as the kernels see it.

    Per slot and head: K's ``d/2`` nibble bytes, K's fp32 scale (zero point in its low bits),
    then V's likewise. Returns ``(key_cache, value_cache, k_scales, v_scales)``: the caches
    (blocks, page, kv_heads, d/2 + 4) split the way vLLM's ``_pth_key_value_caches`` does
    (nibbles first, the scale bytes after them), the scales (blocks, page, kv_heads) fp32.
    One description of the layout for the tests and benchmarks that build such a cache.
    """
    half = head_dim // 2
    if raw.dtype != torch.uint8 or raw.shape[-1] != 2 * (half + 4) or half % 4:
        raise ValueError(f"not an int4 page of head_dim {head_dim}: {tuple(raw.shape)} {raw.dtype}")
    by_slot = raw.transpose(1, 2)
    words = raw.view(torch.float32).transpose(1, 2)
    return (by_slot[..., :half + 4], by_slot[..., half + 4:],
            words[..., half // 4], words[..., (2 * half + 4) // 4])


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Softmax attention of one sequence's queries (nq, heads, d) over its keys (nk, kv_heads, d), fp32.

    The queries are the last ``nq`` of the ``nk`` positions (bottom-right causal alignment, as
    in a prefill chunk or a decode); each KV head serves ``heads / kv_heads`` query heads.
    """
    nq, nk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * softmax_scale
    q_pos = nk - nq + torch.arange(nq, device=q.device)
    scores = scores.masked_fill(torch.arange(nk, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged_int4_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         k_scales: torch.Tensor, v_scales: torch.Tensor, *, cu_seqlens_q: torch.Tensor,
                         seq_lens: torch.Tensor, block_table: torch.Tensor,
                         softmax_scale: float) -> torch.Tensor:
    """Oracle of ``kernels.int4_kv_attention``: causal GQA attention over the paged int4 cache, fp32.

    Sequence ``i``'s queries ``q[cu[i]:cu[i+1]]`` are the last of its ``seq_lens[i]`` keys,
    which live in pages ``block_table[i]`` of ``(blocks, page, kv_heads, >= d/2)`` caches whose
    first ``d/2`` bytes are the nibbles (as the kernel reads vLLM's views with the scale bytes).
    """
    page, half = key_cache.shape[1], q.shape[-1] // 2
    out = torch.zeros(q.shape, dtype=torch.float32)
    for i in range(seq_lens.shape[0]):
        start, stop, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seq_lens[i])
        if stop == start:
            continue
        pos = torch.arange(n)
        blocks, slots = block_table[i].long()[pos // page].cpu(), pos % page
        k = dequantize_kv_int4(key_cache[blocks, slots, :, :half].cpu(), k_scales[blocks, slots].cpu())
        v = dequantize_kv_int4(value_cache[blocks, slots, :, :half].cpu(), v_scales[blocks, slots].cpu())
        out[start:stop] = causal_gqa_attention(q[start:stop].cpu(), k, v, softmax_scale)
    return out


def _straight_through(x: torch.Tensor, xq: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x + (xq - x).detach() if enabled else xq


def simulate_kv_cache(k: torch.Tensor, v: torch.Tensor, bits: int, value_rotated_offline: bool,
                      straight_through: bool = False, online_rotation: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (..., head_dim), after RoPE, as attention effectively sees them through the cache.

    4 bits: the served int4 cache (rotations folded back, so callers keep using the
    unrotated queries). ``straight_through`` passes gradients around the rounding (for
    rotation learning). ``online_rotation=False`` drops the online K (and V) rotation: the
    ablation "KV4 without rotation", not a served configuration. Needs a power-of-two
    head_dim, as vLLM's kernel does.
    """
    d = k.shape[-1]
    if bits >= 16:
        return k, v
    if bits == 4:
        if not is_power_of_two(d):
            raise ValueError(f"the 4-bit KV cache needs a power-of-two head_dim, got {d}")

        def plain(x: torch.Tensor) -> torch.Tensor:
            return _straight_through(x.float(), fake_quantize_kv_int4(x), straight_through)

        def through_rht(x: torch.Tensor) -> torch.Tensor:
            xr = kv_rht(x)
            return kv_rht(_straight_through(xr, fake_quantize_kv_int4(xr), straight_through), inverse=True) / d

        if not online_rotation:
            return plain(k), plain(v)
        if value_rotated_offline:  # orthonormal H_d is symmetric: its own inverse
            return hadamard_transform(plain(hadamard_transform(k))), plain(v)
        return through_rht(k), through_rht(v)

    def symmetric(x: torch.Tensor) -> torch.Tensor:
        return _straight_through(x.float(), fake_quantize_activation(x, bits), straight_through)

    if online_rotation and is_power_of_two(d):
        k = hadamard_transform(symmetric(hadamard_transform(k)))  # orthonormal H is its own inverse
    else:
        k = symmetric(k)
    return k, symmetric(v)
