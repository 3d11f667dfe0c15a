"""Fused online rotation + dynamic per-token activation quantization (Triton).

Why one kernel: the activation is read once from device memory (bf16) and written once
as packed int4 (or int8) plus one fp32 scale per token, so the step costs about the
bytes of a copy. A separate rotation would add a full fp32 round trip.

Arithmetic follows ``vllm_ruquant.reference`` exactly where the reference fixes it:

* no rotation: bit-identical integers and scales (``div_rn`` / ``rint`` / the same
  multiply-then-divide for the scale);
* power-of-two Hadamard: the same butterfly order as ``reference.fwht`` (stage ``h = 1``
  first, ``[a + b, a - b]``) and the same final IEEE division by ``fp32(sqrt(n))``, so
  bit-identical as well;
* Kronecker ``H_m (x) H_p`` and block-diagonal rotations: the dense factor is a matrix
  product whose summation order the reference leaves to its BLAS, so results agree to fp32
  rounding (computed with 3xTF32 on tensor cores), and integers can differ by one where a
  value lands within rounding of a half-step.

Layouts written: int4 packed two per byte along K, element ``2i`` in the low nibble
(``reference.pack_int4``); or int8 one per byte (also used for 4-bit values when the GEMM
wants unpacked activations); or bf16 (``bits=16``: rotation only, for weight-only layers).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from vllm_ruquant import reference as ref
from vllm_ruquant.hadamard import factor_size, small_hadamard, small_hadamard_on

FLT_MIN = torch.finfo(torch.float32).tiny
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Dense rotation factors run on tensor cores with three TF32 passes (about fp32 accuracy);
# the CPU interpreter only knows plain fp32.
_DOT_PRECISION = "ieee" if _INTERPRET else "tf32x3"
# libdevice's rint on the GPU; the interpreter has no libdevice, so it uses the magic-number form.
_USE_LIBDEVICE = tl.constexpr(not _INTERPRET)


@triton.jit
def _quantize_store(y, valid, flat_idx, row, q_ptr, s_ptr, stride_qm, K, clip,
                    QMAX: tl.constexpr, MODE: tl.constexpr, NUMEL: tl.constexpr):
    """Per-token scale and rounding of one row ``y`` (any shape, ``NUMEL`` elements).

    ``flat_idx`` is each element's index k in the row (0..K-1 where ``valid``). MODE 0:
    packed int4, 1: int8 per element, 2: bf16/fp16 (no quantization, rotation only).
    """
    if MODE == 2:
        tl.store(q_ptr + row * stride_qm + flat_idx, y.to(q_ptr.dtype.element_ty), mask=valid)
    else:
        absmax = tl.max(tl.max(tl.abs(y), axis=1), axis=0)  # y is 2-D
        scale = tl.maximum(tl.div_rn(absmax * clip, QMAX * 1.0), 1.1754943508222875e-38)
        q = _rint(tl.div_rn(y, scale))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
        tl.store(s_ptr + row, scale)
        if MODE == 1:
            tl.store(q_ptr + row * stride_qm + flat_idx, q.to(tl.int8), mask=valid)
        else:
            qf = tl.reshape(q, (NUMEL // 2, 2))
            lo, hi = tl.split(qf)
            byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            bidx = tl.arange(0, NUMEL // 2)
            tl.store(q_ptr + row * stride_qm + bidx, byte, mask=bidx < K // 2)


@triton.jit
def _rint(x):
    """Round half to even in fp32, as ``torch.round`` does.

    libdevice ``rint`` on the GPU; under the CPU interpreter (no libdevice) the
    magic-number form, exact for |x| < 2^22 (here |x / scale| <= qmax + 1/2).
    """
    if _USE_LIBDEVICE:
        return libdevice.rint(x)
    else:
        magic = 12582912.0  # 1.5 * 2^23
        r = (x + magic) - magic
        return tl.where(tl.abs(x) < 4194304.0, r, x)


@triton.jit
def _butterfly(y, R: tl.constexpr, P: tl.constexpr, H: tl.constexpr):
    """One FWHT stage: pairs (i, i + H) within blocks of 2H become (a + b, a - b)."""
    y = tl.reshape(y, (R, P // (2 * H), 2, H))
    y = tl.permute(y, (0, 1, 3, 2))
    a, b = tl.split(y)
    y = tl.join(a + b, a - b)
    y = tl.permute(y, (0, 1, 3, 2))
    return tl.reshape(y, (R, P))


@triton.jit
def _fwht_rows(y, R: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform over the last dim of ``y (R, P)``.

    Same stage order and pairing as ``reference.fwht``, hence bit-identical fp32 results.
    """
    for s in tl.static_range(LOG_P):
        y = _butterfly(y, R, P, 1 << s)
    return y


@triton.jit
def _rq_plain_kernel(x_ptr, q_ptr, s_ptr, stride_xm, stride_qm, K, clip,
                     QMAX: tl.constexpr, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """No rotation: one token (row) per program.

    The row is loaded as ``(BLOCK_K/2, 2)`` pairs so that each thread holds both nibbles
    of the bytes it writes (the int4 packing needs no data movement between threads).
    """
    row = tl.program_id(0).to(tl.int64)
    k = 2 * tl.arange(0, BLOCK_K // 2)[:, None] + tl.arange(0, 2)[None, :]
    valid = k < K
    y = tl.load(x_ptr + row * stride_xm + k, mask=valid, other=0.0).to(tl.float32)
    _quantize_store(y, valid, k, row, q_ptr, s_ptr, stride_qm, K, clip, QMAX, MODE, BLOCK_K)


@triton.jit
def _rq_hadamard_kernel(x_ptr, q_ptr, s_ptr, ht_ptr, stride_xm, stride_qm, K, clip, sqrt_n,
                        QMAX: tl.constexpr, MODE: tl.constexpr, HM: tl.constexpr,
                        HM_P2: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Hadamard ``H_m (x) H_p`` rotation of one token per program.

    The row is viewed as an ``(m, p)`` matrix X (row-major, as the reference reshapes it),
    padded to ``HM_P2`` rows with zeros: FWHT over p, then ``H_m^T X`` as one tensor-core
    product with the transposed, zero-padded ``H_m`` (``ht``), then ``/ sqrt(n)``.
    """
    row = tl.program_id(0).to(tl.int64)
    ra = tl.arange(0, HM_P2)
    rj = tl.arange(0, P)
    flat = ra[:, None] * P + rj[None, :]
    valid = flat < K
    y = tl.load(x_ptr + row * stride_xm + flat, mask=valid, other=0.0).to(tl.float32)
    if LOG_P > 0:
        y = _fwht_rows(y, HM_P2, P, LOG_P)
    if HM > 1:
        ht = tl.load(ht_ptr + ra[:, None] * HM_P2 + ra[None, :])
        y = tl.dot(ht, y, input_precision=PRECISION)
    y = tl.div_rn(y, sqrt_n)
    _quantize_store(y, valid, flat, row, q_ptr, s_ptr, stride_qm, K, clip, QMAX, MODE, HM_P2 * P)


@triton.jit
def _kron_rows_kernel(x_ptr, y_ptr, amax_ptr, h_ptr, stride_xm, stride_ym, sqrt_n,
                      HM: tl.constexpr, RB: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                      NA: tl.constexpr):
    """Rows ``[rb*RB, rb*RB + RB)`` of one token's ``Y = H_m^T X H_p / sqrt(n)``, fp32 (program (token, rb)).

    Decode sizes: one program per token (``_rq_hadamard_kernel``) leaves a decode step's GPU nearly
    idle for ~20 us while it runs log2(p) butterfly stages over the whole (m, p) row. Here the rows
    of Y are independent: program rb mixes first (``Z = H_m^T[R, :] X``, m row-FMAs with +-1, each X
    row read once, from L2 after the first program) and then runs the butterflies over its ``RB``
    rows only. The absmax needs the whole row, so quantization is left to the kernel after it (the
    GEMV's in-kernel quantization, or ``_rq_plain_kernel``). Mixing before the butterflies sums in
    another order than the reference (fwht first): fp32 rounding, as the tensor-core product.
    """
    row = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * RB + tl.arange(0, RB)
    r_ok = r < HM
    j = tl.arange(0, P)
    z = tl.zeros((RB, P), tl.float32)
    for a in tl.static_range(HM):
        xa = tl.load(x_ptr + row * stride_xm + a * P + j).to(tl.float32)
        h = tl.load(h_ptr + a * HM + r, mask=r_ok, other=0.0)  # H_m[a, r] = (H_m^T)[r, a]
        z += h[:, None] * xa[None, :]
    if LOG_P > 0:
        z = _fwht_rows(z, RB, P, LOG_P)
    z = tl.div_rn(z, sqrt_n)
    tl.store(y_ptr + row * stride_ym + r[:, None] * P + j[None, :], z, mask=r_ok[:, None])
    tl.store(amax_ptr + row * NA + tl.program_id(1), tl.max(tl.max(tl.abs(z), axis=1), axis=0))


@triton.jit
def _quantize_chunks_kernel(y_ptr, amax_ptr, q_ptr, s_ptr, stride_ym, stride_qm, K, clip,
                            QMAX: tl.constexpr, MODE: tl.constexpr, NA: tl.constexpr, NA_P2: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Quantize ``BLOCK`` elements of one token's rotated row (program (token, chunk)) on the token's
    scale from the ``NA`` partial maxima ``_kron_rows_kernel`` stored: the absmax (a max, exact in any
    order), so the scale and integers are ``_quantize_store``'s, with the row spread over programs
    instead of one program (one SM) doing a decode token alone. MODE as ``_quantize_store``'s."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    ia = tl.arange(0, NA_P2)
    absmax = tl.max(tl.load(amax_ptr + row * NA + ia, mask=ia < NA, other=0.0), axis=0)
    k = c * BLOCK + 2 * tl.arange(0, BLOCK // 2)[:, None] + tl.arange(0, 2)[None, :]
    valid = k < K
    y = tl.load(y_ptr + row * stride_ym + k, mask=valid, other=0.0)
    if MODE == 2:
        tl.store(q_ptr + row * stride_qm + k, y.to(q_ptr.dtype.element_ty), mask=valid)
    else:
        scale = tl.maximum(tl.div_rn(absmax * clip, QMAX * 1.0), 1.1754943508222875e-38)
        q = _rint(tl.div_rn(y, scale))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
        if c == 0:
            tl.store(s_ptr + row, scale)
        if MODE == 1:
            tl.store(q_ptr + row * stride_qm + k, q.to(tl.int8), mask=valid)
        else:
            lo, hi = tl.split(q)
            byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            b = c * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            tl.store(q_ptr + row * stride_qm + b, byte, mask=b < K // 2)


@triton.jit
def _rq_blockdiag_kernel(x_ptr, q_ptr, s_ptr, blk_ptr, M, stride_xm, stride_qm, K, clip,
                         NB, QMAX: tl.constexpr, MODE: tl.constexpr, B: tl.constexpr,
                         B_P2: tl.constexpr, BC: tl.constexpr, ROWS: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Block-diagonal rotation for ``ROWS`` tokens per program, two passes over the blocks.

    Pass 1 finds each token's absmax, pass 2 recomputes the blocks and quantizes: the
    rotated row never exists whole (up to 28672 fp32 per token), so recomputing the cheap
    ``(ROWS, b) x (b, BC)`` products beats a round trip through device memory. Output
    columns of a block go ``BC`` at a time so a 256 x 256 fp32 block never sits in shared
    memory whole.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, B_P2)
    cmask = c < B
    o = tl.arange(0, BC)
    absmax = tl.zeros((ROWS,), tl.float32)
    for kb in range(NB):
        xk = tl.load(x_ptr + rows64[:, None] * stride_xm + kb * B + c[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        for c0 in tl.static_range(0, B_P2, BC):
            bk = tl.load(blk_ptr + kb * B * B + c[:, None] * B + (c0 + o)[None, :],
                         mask=cmask[:, None] & ((c0 + o) < B)[None, :], other=0.0)
            yk = tl.dot(xk, bk, input_precision=PRECISION)
            absmax = tl.maximum(absmax, tl.max(tl.abs(yk), axis=1))
    scale = tl.maximum(tl.div_rn(absmax * clip, QMAX * 1.0), 1.1754943508222875e-38)
    if MODE != 2:
        tl.store(s_ptr + rows, scale, mask=rmask)
    for kb in range(NB):
        xk = tl.load(x_ptr + rows64[:, None] * stride_xm + kb * B + c[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        for c0 in tl.static_range(0, B_P2, BC):
            omask_c = (c0 + o) < B
            bk = tl.load(blk_ptr + kb * B * B + c[:, None] * B + (c0 + o)[None, :],
                         mask=cmask[:, None] & omask_c[None, :], other=0.0)
            yk = tl.dot(xk, bk, input_precision=PRECISION)
            omask = rmask[:, None] & omask_c[None, :]
            optr = rows64[:, None] * stride_qm + kb * B + c0 + o[None, :]
            if MODE == 2:
                tl.store(q_ptr + optr, yk.to(q_ptr.dtype.element_ty), mask=omask)
            else:
                q = _rint(tl.div_rn(yk, scale[:, None]))
                q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
                if MODE == 1:
                    tl.store(q_ptr + optr, q.to(tl.int8), mask=omask)
                else:
                    lo, hi = tl.split(tl.reshape(q, (ROWS, BC // 2, 2)))
                    byte = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
                    bc = tl.arange(0, BC // 2)
                    tl.store(q_ptr + rows64[:, None] * stride_qm + (kb * B + c0) // 2 + bc[None, :],
                             byte, mask=rmask[:, None] & ((c0 // 2 + bc) < B // 2)[None, :])


def _warps_for(numel: int) -> int:
    """Enough threads that a row of up to 32K fp32 stays in registers (about 32 per thread)."""
    return max(4, min(32, triton.next_power_of_2(max(numel // 1024, 1))))


# Up to this many tokens a Kronecker rotation (m > 1) runs as ``rotate_rows`` (its rows spread over
# programs) and then the plain quantization kernel; more tokens fill the GPU with one program each.
KRON_ROWS_MAX_M = int(os.environ.get("RUQUANT_KRON_ROWS_MAX_M", "64"))
# Rows of H_m^T X per program: enough programs to spread a decode step's few tokens over the SMs.
KRON_ROWS_PER_PROGRAM = int(os.environ.get("RUQUANT_KRON_RB", "0"))  # 0: by the token count


def _kron_rows_warps(p: int) -> int:
    """Warps of a ``_kron_rows_kernel`` program: two elements of each P-wide row a thread. With four a
    thread the butterflies' exchanges go through shared memory: offline sm_90 builds (Triton 3.9) of
    Llama-3-8B's down_proj (m = 28, P = 512, one row a program) show 63 barriers and 896 instructions
    with 4 warps against 9 and 528 with 8, and the same at P = 1024 (65 against 11 with 16 warps).
    Not yet timed on a GPU; the arithmetic is the same, so the results are too."""
    return min(16, max(4, p // 64))


def _rows_per_program(tokens: int) -> int:
    if KRON_ROWS_PER_PROGRAM:
        return KRON_ROWS_PER_PROGRAM
    return 1 if tokens <= 4 else 2 if tokens <= 16 else 4


def kron_rows_apply(x: torch.Tensor, rotation: ref.OnlineRotation | None) -> bool:
    """Whether ``rotate_rows`` serves ``x (M, K)`` under ``rotation``: a plain Kronecker Hadamard
    ``H_m (x) H_p`` with 1 < m <= 64, p >= 2, and at most ``KRON_ROWS_MAX_M`` tokens."""
    if rotation is None or rotation.kind != "hadamard" or rotation.padded_from is not None:
        return False
    if rotation.block_size not in (None, rotation.size) or x.shape[-1] != rotation.size:
        return False
    m, p = factor_size(rotation.size)
    return 1 < m <= 64 and p >= 2 and x.shape[0] <= KRON_ROWS_MAX_M


def rotate_rows(x: torch.Tensor, rotation: ref.OnlineRotation) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotation`` (a Kronecker Hadamard, see ``kron_rows_apply``) of ``x (M, K)``, fp32 ``(M, K)``,
    spread over ``M * ceil(m / RB)`` programs (``_kron_rows_kernel``), and each program's absmax
    ``(M, ceil(m / RB))``. ``H_m`` is the device-resident factor the reference uses too (made at load
    by ``TritonBackend.prepare``, never in a graph capture)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    m, p = factor_size(K)
    rb = _rows_per_program(M)
    na = triton.cdiv(m, rb)
    y = torch.empty(M, K, dtype=torch.float32, device=x.device)
    amax = torch.empty(M, na, dtype=torch.float32, device=x.device)
    if M:
        _kron_rows_kernel[(M, na)](
            x, y, amax, small_hadamard_on(m, x.device), x.stride(0), y.stride(0), float(math.sqrt(K)),
            HM=m, RB=rb, P=p, LOG_P=int(math.log2(p)), NA=na, num_warps=_kron_rows_warps(p))
    return y, amax


QUANT_CHUNK = 1024  # elements of a rotated decode row per program of _quantize_chunks_kernel


def _quantize_rotated_rows(y: torch.Tensor, amax: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                           qmax: int, mode: int, clip: float) -> None:
    M, K = y.shape
    if M:
        na = amax.shape[1]
        _quantize_chunks_kernel[(M, triton.cdiv(K, QUANT_CHUNK))](
            y, amax, q, s, y.stride(0), q.stride(0), K, clip, QMAX=qmax, MODE=mode, NA=na,
            NA_P2=max(2, triton.next_power_of_2(na)), BLOCK=QUANT_CHUNK, num_warps=4)


_HT_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def hadamard_factor_t(m: int, device: torch.device) -> torch.Tensor:
    """``H_m^T`` zero-padded to the next power of two (fp32, on ``device``), cached."""
    key = (m, device.index if device.index is not None else -1, device.type)
    if key not in _HT_CACHE:
        m_p2 = max(16, triton.next_power_of_2(m))
        ht = torch.zeros(m_p2, m_p2, dtype=torch.float32)
        ht[:m, :m] = small_hadamard(m).T
        _HT_CACHE[key] = ht.to(device)
    return _HT_CACHE[key]


def rotate_quant(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                 rotation: ref.OnlineRotation | None = None, pack: bool = True,
                 blocks: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate (optional) and quantize ``x (M, K)`` per token in one pass.

    Returns ``(q, scale)``: q is uint8 ``(M, K/2)`` when ``bits == 4 and pack``, else int8
    ``(M, K)``; scale fp32 ``(M,)``. ``bits >= 16`` returns the rotated activations in x's
    dtype and ``None``. ``blocks`` overrides ``rotation.blocks`` (already on the device).
    ``out`` / ``out_scale`` receive the results (tests poison them first).
    """
    if x.dim() != 2:
        raise ValueError(f"rotate_quant expects (M, K), got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    dev = x.device
    if bits >= 16:
        mode, qmax = 2, 1
        q = torch.empty(M, K, dtype=x.dtype, device=dev)
    else:
        qmax = ref.qmax_for(bits)
        mode = 0 if (bits == 4 and pack) else 1
        if mode == 0 and K % 2:
            raise ValueError(f"int4 packing needs an even K, got {K}")
        q = torch.empty(M, K // 2 if mode == 0 else K, dtype=torch.uint8 if mode == 0 else torch.int8,
                        device=dev)
    s = torch.empty(M, dtype=torch.float32, device=dev)
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {q.dtype} {tuple(q.shape)}")
        q = out
    if out_scale is not None:
        s = out_scale
    if M == 0:
        return q, (None if mode == 2 else s)
    clip = float(clip_ratio)
    if rotation is None:
        if mode == 2:
            q.copy_(x)
            return q, None
        bk = triton.next_power_of_2(K)
        _rq_plain_kernel[(M,)](x, q, s, x.stride(0), q.stride(0), K, clip, QMAX=qmax, MODE=mode,
                               BLOCK_K=bk, num_warps=_warps_for(bk))
    elif rotation.kind == "hadamard":
        if rotation.size != K:
            raise ValueError(f"rotation of size {rotation.size} applied to K={K}")
        m, p = factor_size(K)
        # tl.dot needs >= 16 columns; an H_m above 64 (108..172) does not fit shared memory
        # as one fp32 tile: torch rotation, then the fused quantization kernel
        if m > 64 or (m > 1 and p < 16):
            xr = rotation.apply(x)
            return rotate_quant(xr.to(x.dtype) if mode == 2 else xr, bits, clip_ratio, None, pack,
                                out=out, out_scale=out_scale)
        if kron_rows_apply(x, rotation):
            y, amax = rotate_rows(x, rotation)
            _quantize_rotated_rows(y, amax, q, s, qmax, mode, clip)
            return q, (None if mode == 2 else s)
        m_p2 = 1 if m == 1 else max(16, triton.next_power_of_2(m))
        ht = hadamard_factor_t(m, dev) if m > 1 else s  # dummy pointer when unused
        _rq_hadamard_kernel[(M,)](x, q, s, ht, x.stride(0), q.stride(0), K, clip,
                                  float(math.sqrt(K)), QMAX=qmax, MODE=mode, HM=m, HM_P2=m_p2, P=p,
                                  LOG_P=int(math.log2(p)), PRECISION=_DOT_PRECISION,
                                  num_warps=_warps_for(m_p2 * p))
    elif rotation.kind == "block_diagonal":
        blk = blocks if blocks is not None else rotation.blocks
        assert blk is not None
        blk = blk.to(device=dev, dtype=torch.float32).contiguous()
        nb, b, _ = blk.shape
        if nb * b != K:
            raise ValueError(f"rotation of size {nb * b} applied to K={K}")
        if (mode == 0 and b % 2) or b > 128 or b < 2:  # 256x256 fp32 blocks: torch rotation
            xr = ref.OnlineRotation("block_diagonal", K, blk).apply(x)
            return rotate_quant(xr.to(x.dtype) if mode == 2 else xr, bits, clip_ratio, None, pack,
                                out=out, out_scale=out_scale)
        b_p2 = max(16, triton.next_power_of_2(b))
        rows = 16 if M <= 16 else 32
        _rq_blockdiag_kernel[(triton.cdiv(M, rows),)](
            x, q, s, blk, M, x.stride(0), q.stride(0), K, clip, nb, QMAX=qmax, MODE=mode, B=b,
            B_P2=b_p2, BC=min(b_p2, 64), ROWS=rows, PRECISION=_DOT_PRECISION,
            num_warps=4 if b_p2 <= 64 else 8, num_stages=1)
    else:
        raise ValueError(f"unknown online rotation kind {rotation.kind!r}")
    return q, (None if mode == 2 else s)
