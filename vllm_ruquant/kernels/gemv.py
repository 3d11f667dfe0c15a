"""Quantized GEMV (Triton, CUDA cores) for decode sizes: W4A8 / W4A4 with at most 8 activation rows.

Why a second kernel: at M = 1 the int8 tensor-core GEMM (``gemm.qgemm``) pads M to 16 rows, so 15/16
of every MMA is waste, and it ran Llama-3-8B's four decode linears at ~38% of the H200's HBM bandwidth
(60 us a layer against 22.7 us of 4-bit weight bytes). A decode linear only has to stream its weights
once; this kernel does that with CUDA-core integer dot products and no ``tl.dot``. It serves the same
problems with the same arguments and returns the same bits, so the backend may switch at any M.

* Arithmetic: ``dp4a`` (one instruction: four int8 x int8 products added to an int32) on the nibble
  planes ``gemm.py`` uses: a weight word (4 bytes, 8 nibbles) gives ``(w << 4) & 0xF0F0F0F0`` (the low
  nibbles, 16 * v in each byte) and ``w & 0xF0F0F0F0`` (the high nibbles). In the chunked layout that
  the backend stores for W4A4 / W4A8 (``layout.pack_chunked``, b_mode 2), the low nibbles of a weight
  word are four consecutive K elements and its high nibbles the four ``CHUNK/2`` further on: each plane
  meets one int8 activation word as it lies in memory (a_mode 0), or as this kernel quantizes it
  (a_mode 2). Packed int4 activations (a_mode 1, b_mode 1, ``RUQUANT_W4A4_PACKED_ACT=1``) meet plane
  for plane. No weight copy: the kernel reads what ``TritonBackend.prepare`` keeps.
* Exactness: every product is 16 * w * a (256 * w * a for packed activations), at most 2^14 in
  magnitude (|w| <= 8, |a| <= 128, or 8 x 8 x 256), summed in int32: exact for K < 2^17 (``supports``
  checks it; Llama K <= 28672). A right shift removes the power of two exactly. The epilogue is the
  reference's, in its order, in fp32 with FMA contraction off: per channel ``float(acc) * w_scale``,
  or per group ``y += float(acc_g) * w_scale[:, g]`` from g = 0 up; then ``* x_scale``, ``+ bias``,
  one rounding to the output dtype. a_mode 2 computes ``qgemm``'s (and ``rotate_quant``'s) scales and
  integers: the absmax (exact in any order), the same IEEE division, ``rint``, clamp.
* Why at most 4 rows should pay, by instruction counts (``RUQUANT_GEMV_MAX_M``; the kernel holds up
  to 8; measured on the H200, only M = 1 did): each row costs two
  ``dp4a`` per weight word on top of ~3 unpack ops and its share of the cross-lane reduction. To stream
  4.8 TB/s an H200 SM must consume ~4.6 weight words a clock (18.4 B at 1.98 GHz). Offline sm_90 builds
  of the default tiles (Triton 3.6, the GPU machine's, and 3.9 give the same loop) run ~7-8.5 SASS
  instructions a word in the weight loop at M = 1, ~15-17 at M = 4 and ~29-37 at M = 8: ~35, ~75 and
  ~150 a clock against an issue limit of 128 (and 74 dp4a a clock at M = 8 against the ~64 the integer
  multiply-add pipes retire). M = 8 is compute-bound short of the bandwidth, where the tensor-core
  GEMM wastes only half its rows.
* Work split: a program owns one K slice (``BK``) and up to ``NBP`` blocks of ``BN`` channels. It loads
  (a_mode 2: quantizes) its activation slice once into registers (``MP * BK / LV`` words, kept <= 64),
  then streams weight tiles of int32 words: per lane group of a row a ``(1, BN, LV)`` tile, ``LV / 4``
  lanes of 16-byte loads along the row (coalesced), the other lanes and the warps along N; a row's
  ``A = BK / (8 LV)`` (1, 2 or 4) lane groups are joined into register dims (``_load_tree``). The next
  tile is loaded before the current one is reduced: one dp4a chain per lane through its words, then
  shuffles (or ``redux`` with a whole warp along K, LV = 128) across the ``LV / 4`` lanes. Tiles are
  3-D so that the products with the ``(MP, 1, LV)`` activations keep the weight load's layout (no
  shared-memory conversion in the loop). In-kernel quantization (~400-1700 instructions a thread) is
  repeated in every program of a K slice, so its tiles take short slices and >= 256 channels a program;
  integer activations take long slices and few splits (``default_config``).
* Split K, CUDA-graph safe: each program stores its int32 partial sums (per channel) or its fp32 group
  terms (grouped weights) to a workspace with plain stores; a per-block counter (acq_rel atomic) names
  the last program of a block, which reads the partials back (L2), adds the int32 ones (exact, any
  order) or the group terms in group order, applies the epilogue and resets the counter to zero.
  Nothing needs zeroing between calls and nothing is allocated per call (a workspace cached per device,
  grown only, outgrown buffers kept alive for graphs captured with them); one launch, no host sync.
  A program that holds the whole K (``ONE_SPLIT``: K <= BK, per-channel scales) skips all of that and
  applies the epilogue from registers: the workspace store, the acq_rel counter and the L2 read-back
  are a dependent round trip of a few microseconds, a third of a small decode linear's time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re

import torch
import triton
import triton.language as tl

from vllm_ruquant.kernels.rotate_quant import _rint

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
logger = logging.getLogger(__name__)

# Decode sizes that take this kernel in the backend. The module doc argues up to 4 from instruction
# counts; the H200 measured otherwise: per Llama-3-8B layer the GEMV beats qgemm at M = 1 (49.2 against
# 60.1 us) but not at M = 2 (67.3 / 60.1) or 4 (63.9 / 60.5) (benchmarks/results/gpu-2026-12-04d, -e).
GEMV_MAX_M = int(os.environ.get("RUQUANT_GEMV_MAX_M", "1"))
MAX_ROWS = 8  # the kernel holds up to 8 activation rows in registers
_LO_MASK = tl.constexpr(-252645136)  # 0xF0F0F0F0 as an int32


# ------------------------------------------------------------------------------ kernel


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """``c + sum_i int8(a >> 8i) * int8(b >> 8i)`` on int32 words (PTX ``dp4a.s32.s32``)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _plane_lo(w):
    """Low nibble of each byte moved to its top: bytes of 16 * v (int32 word of four int8)."""
    return (w << 4) & _LO_MASK


@triton.jit
def _plane_hi(w):
    """High nibble of each byte kept in place: bytes of 16 * v."""
    return w & _LO_MASK


@triton.jit
def _quads(x, D0: tl.constexpr, D1: tl.constexpr, LV: tl.constexpr):
    """``x (D0, D1, LV)`` -> its words 4i, 4i+1, 4i+2, 4i+3 along the last dim: four ``(D0, D1, LV/4)``
    tensors (a lane holds four consecutive words: no data moves)."""
    y = tl.reshape(x, (D0, D1, LV // 4, 2, 2))
    even, odd = tl.split(y)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _dot_words(w, a_lo, a_hi, acc, ASM: tl.constexpr):
    """``acc`` + the products of a weight word's two nibble planes with their activation words."""
    acc = _dp4a(_plane_lo(w), a_lo, acc, ASM)
    return _dp4a(_plane_hi(w), a_hi, acc, ASM)


@triton.jit
def _dot_group(w, lo, hi, acc, MP: tl.constexpr, BN: tl.constexpr, LV: tl.constexpr, ASM: tl.constexpr):
    """``acc (MP, BN, LV/4)`` + one lane group: weights ``(1, BN, LV)``, activation words ``(MP, 1, LV)``;
    one dp4a chain per lane through its four words."""
    w0, w1, w2, w3 = _quads(w, 1, BN, LV)
    l0, l1, l2, l3 = _quads(lo, MP, 1, LV)
    h0, h1, h2, h3 = _quads(hi, MP, 1, LV)
    acc = _dot_words(w0, l0, h0, acc, ASM)
    acc = _dot_words(w1, l1, h1, acc, ASM)
    acc = _dot_words(w2, l2, h2, acc, ASM)
    return _dot_words(w3, l3, h3, acc, ASM)


@triton.jit
def _dot_tree(w, lo, hi, acc, A: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, LV: tl.constexpr,
              ASM: tl.constexpr):
    """``_dot_group`` over the ``A`` lane groups of a row held as a join tree (see ``_load_tree``)."""
    if A == 1:
        acc = _dot_group(w, lo, hi, acc, MP, BN, LV, ASM)
    elif A == 2:
        w0, w1 = tl.split(w)
        l0, l1 = tl.split(lo)
        h0, h1 = tl.split(hi)
        acc = _dot_group(w0, l0, h0, acc, MP, BN, LV, ASM)
        acc = _dot_group(w1, l1, h1, acc, MP, BN, LV, ASM)
    else:
        w01, w23 = tl.split(w)
        l01, l23 = tl.split(lo)
        h01, h23 = tl.split(hi)
        w0, w1 = tl.split(w01)
        l0, l1 = tl.split(l01)
        h0, h1 = tl.split(h01)
        acc = _dot_group(w0, l0, h0, acc, MP, BN, LV, ASM)
        acc = _dot_group(w1, l1, h1, acc, MP, BN, LV, ASM)
        w2, w3 = tl.split(w23)
        l2, l3 = tl.split(l23)
        h2, h3 = tl.split(h23)
        acc = _dot_group(w2, l2, h2, acc, MP, BN, LV, ASM)
        acc = _dot_group(w3, l3, h3, acc, MP, BN, LV, ASM)
    return acc


@triton.jit
def _load_tree(p, STEP, mask, A: tl.constexpr):
    """The ``A`` (1, 2 or 4) tiles at ``p + a * STEP``, joined into trailing register dims.

    Why not one tile with an A dim: the coalescing pass orders dims of equal contiguity one way in
    Triton 3.6 and the other in 3.9, so such a dim would take lanes from the channels in one of them;
    each tile here has one such dim only, and ``tl.join`` adds register dims."""
    if A == 1:
        return tl.load(p, mask=mask)
    elif A == 2:
        return tl.join(tl.load(p, mask=mask), tl.load(p + STEP, mask=mask))
    else:
        return tl.join(tl.join(tl.load(p, mask=mask), tl.load(p + STEP, mask=mask)),
                       tl.join(tl.load(p + 2 * STEP, mask=mask), tl.load(p + 3 * STEP, mask=mask)))


@triton.jit
def _quantize_words(x_ptrs, scale, QMAX: tl.constexpr):
    """Quantize the float activations at ``x_ptrs (MP, 1, LV, 4)`` as ``gemm._quantize`` does
    (``clamp(rint(x / scale))``, IEEE division; ``scale`` broadcast to that shape) and pack each quad
    of the last dim into an int32 word (element 4w + b in byte b)."""
    x = tl.load(x_ptrs).to(tl.float32)
    q = _rint(tl.div_rn(x, scale))
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
    return tl.sum((q & 0xFF) << (8 * tl.arange(0, 4)), axis=3)  # disjoint bytes: the sum is an OR


@triton.jit
def _quantize_tree(x_ptrs, STEP: tl.constexpr, scale, QMAX: tl.constexpr, A: tl.constexpr):
    """``_quantize_words`` of the ``A`` lane groups at ``x_ptrs + a * STEP``, joined as ``_load_tree``."""
    if A == 1:
        return _quantize_words(x_ptrs, scale, QMAX)
    elif A == 2:
        return tl.join(_quantize_words(x_ptrs, scale, QMAX), _quantize_words(x_ptrs + STEP, scale, QMAX))
    else:
        return tl.join(tl.join(_quantize_words(x_ptrs, scale, QMAX), _quantize_words(x_ptrs + STEP, scale, QMAX)),
                       tl.join(_quantize_words(x_ptrs + 2 * STEP, scale, QMAX),
                               _quantize_words(x_ptrs + 3 * STEP, scale, QMAX)))


@triton.jit
def _int_act_words(act, ASTEP: tl.constexpr, HW: tl.constexpr, A_MODE: tl.constexpr, A: tl.constexpr):
    """Integer activation words at ``act`` meeting a K slice's low and high nibble planes (A_MODE 0: int8
    words, the high plane's ``HW`` words on; 1: packed int4, both planes from one word)."""
    if A_MODE == 1:
        a_w = _load_tree(act, ASTEP, None, A)
        return _plane_lo(a_w), _plane_hi(a_w)
    else:
        return _load_tree(act, ASTEP, None, A), _load_tree(act + HW, ASTEP, None, A)


@triton.jit
def _row_scales_wide(a_row, rm, K, clip, QMAX: tl.constexpr, MP: tl.constexpr, RB: tl.constexpr,
                     U: tl.constexpr):
    """``gemm._row_scales``' per-token scales (``max(absmax * clip / qmax, FLT_MIN)``, IEEE division;
    a max is exact in any order), reading ``U`` blocks of ``RB`` a step so their loads overlap."""
    amax = tl.zeros((MP,), tl.float32)
    cols = tl.arange(0, RB)[None, :]
    for k0 in range(0, K, RB * U):
        for u in tl.static_range(U):
            k = k0 + u * RB + cols
            x = tl.load(a_row + k, mask=(k < K) & (rm[:, None] >= 0), other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    return tl.maximum(tl.div_rn(amax * clip, QMAX * 1.0), 1.1754943508222875e-38)


@triton.jit(do_not_specialize=["M", "SPLIT_K", "NBP"])
def _qgemv_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, ws_ptr, wsf_ptr, cnt_ptr,
    M, N, K, stride_am, stride_bn, stride_bsn, stride_cm, SPLIT_K, NBP, clip,
    A_MODE: tl.constexpr,  # 0: int8 activations (words); 1: packed int4 (words); 2: float, quantized here
    QMAX: tl.constexpr,
    B_MODE: tl.constexpr,  # 1: packed int4 like A (A_MODE 1); 2: chunked int4
    CHUNK: tl.constexpr,
    GROUP: tl.constexpr,  # 0: one weight scale per channel; else the group size (== BK == 8 * LV)
    HAS_BIAS: tl.constexpr,
    MP: tl.constexpr,  # activation rows held (a power of two >= M; rows past M repeat row M - 1)
    BN: tl.constexpr, BK: tl.constexpr, LV: tl.constexpr,
    SC: tl.constexpr,  # partials (splits, or groups) the last program of a block reads per step
    RB: tl.constexpr,  # K block of the activation absmax pass (A_MODE 2)
    ASM: tl.constexpr,
    ONE_SPLIT: tl.constexpr,  # SPLIT_K == 1 and GROUP == 0: the epilogue straight from registers
    KSTEPS: tl.constexpr,  # K slices one program loops over (integer activations, ONE_SPLIT); else 1
):
    """``C[m, n] = epilogue(sum_k A[m, k] * B[n, k])``: one K slice (``pk``) of up to ``NBP`` channel blocks,
    or (``KSTEPS`` > 1) every K slice of them, one after the other."""
    SHIFT: tl.constexpr = 8 if A_MODE == 1 else 4
    KW: tl.constexpr = BK // 8  # weight words per row in this K slice
    A: tl.constexpr = KW // LV  # lane groups per row (1, 2 or 4), held in registers
    HW: tl.constexpr = CHUNK // 8  # weight words per chunk (B_MODE 2; LV is a multiple of it)
    if B_MODE == 2:
        ASTEP: tl.constexpr = 2 * LV  # activation words per lane group (both nibble planes' words)
    else:
        ASTEP: tl.constexpr = LV

    pid_g = tl.program_id(0)
    pk = tl.program_id(1)
    num_nb = tl.cdiv(N, BN)
    nb0 = pid_g * NBP
    nb1 = tl.minimum(nb0 + NBP, num_nb)

    # weight tiles (1, BN, LV) of int32 words, one per lane group: LV / 4 lanes of 16-byte loads along
    # a row, the other lanes and the warps along the channels; rows past N repeat the last (not stored)
    inn = tl.arange(0, BN)[None, :, None]
    cols = tl.arange(0, LV)[None, None, :]
    rows = tl.minimum(nb0 * BN + inn, N - 1).to(tl.int64)
    w_next = _load_tree(b_ptr + rows * stride_bn + pk * KW + cols, LV, None, A)  # before the activation work

    # activation words meeting lane group 0's low and high nibble planes: (MP, 1, LV)
    rm = tl.minimum(tl.arange(0, MP), M - 1)
    m3 = rm[:, None, None].to(tl.int64)
    c = tl.arange(0, LV)[None, None, :]
    if B_MODE == 2:
        lo_w = (c // HW) * (2 * HW) + c % HW  # activation word (four int8) of weight word c's low nibbles
    else:
        lo_w = c
    if A_MODE == 2:
        xs = _row_scales_wide(a_ptr + rm[:, None].to(tl.int64) * stride_am, rm, K, clip, QMAX, MP, RB, 4)
        x_ptrs = a_ptr + m3[:, :, :, None] * stride_am + pk * BK + (4 * lo_w)[:, :, :, None] \
            + tl.arange(0, 4)[None, None, None, :]
        s4 = xs[:, None, None, None]
        a_lo = _quantize_tree(x_ptrs, 4 * ASTEP, s4, QMAX, A)
        a_hi = _quantize_tree(x_ptrs + 4 * HW, 4 * ASTEP, s4, QMAX, A)
    else:
        xs = tl.load(as_ptr + rm)
        act = a_ptr + m3 * stride_am + lo_w
        if KSTEPS == 1:
            a_lo, a_hi = _int_act_words(act + pk * (A * ASTEP), ASTEP, HW, A_MODE, A)

    on = tl.arange(0, BN)
    om = tl.arange(0, MP)
    m_ok = (om < M)[:, None]
    acc = tl.zeros((MP, BN, LV // 4), tl.int32)
    # steps: (block, K slice) pairs in order, the next step's weight tile loaded before this one's work
    for it in range(nb0 * KSTEPS, nb1 * KSTEPS):
        nb = it // KSTEPS
        w = w_next
        nxt = it + 1
        rows = tl.minimum((nxt // KSTEPS) * BN + inn, N - 1).to(tl.int64)
        w_next = _load_tree(b_ptr + rows * stride_bn + (pk + nxt % KSTEPS) * KW + cols, LV,
                            rows * 0 + cols * 0 + (nb1 * KSTEPS - nxt) > 0, A)
        if KSTEPS == 1:
            acc = _dot_tree(w, a_lo, a_hi, tl.zeros((MP, BN, LV // 4), tl.int32), A, MP, BN, LV, ASM)
        else:  # this slice's activation words (L1 / L2 after the first block), added to the block's sums
            ks_lo, ks_hi = _int_act_words(act + (it % KSTEPS) * (A * ASTEP), ASTEP, HW, A_MODE, A)
            acc = _dot_tree(w, ks_lo, ks_hi, tl.where(it % KSTEPS == 0, 0, acc), A, MP, BN, LV, ASM)
        if it % KSTEPS == KSTEPS - 1:  # the block's last slice: its sums are whole (for this program)
            part = tl.sum(acc, axis=2)  # (MP, BN) int32, exact (across the LV / 4 lanes of a row)
            n_idx = nb * BN + on
            n_ok = (n_idx < N)[None, :]
            n_in = tl.minimum(n_idx, N - 1)
            if ONE_SPLIT:  # the whole K in this program: no workspace round trip, no counter
                y = (part >> SHIFT).to(tl.float32) * tl.load(bs_ptr + n_in * stride_bsn)[None, :]
                y = y * xs[:, None]
                if HAS_BIAS:
                    y = y + tl.load(bias_ptr + n_in).to(tl.float32)[None, :]
                tl.store(c_ptr + om[:, None].to(tl.int64) * stride_cm + n_idx[None, :],
                         y.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)
            else:  # store this slice's partials; the last program of the block reduces them
                if GROUP == 0:
                    tl.store(ws_ptr + (pk * M + om[:, None]) * N + n_idx[None, :], part, mask=m_ok & n_ok)
                else:
                    # the slice is one group: its fp32 term float(acc_g) * w_scale[:, g], g = pk
                    term = (part >> SHIFT).to(tl.float32) * tl.load(bs_ptr + n_in * stride_bsn + pk)[None, :]
                    tl.store(wsf_ptr + (pk * M + om[:, None]) * N + n_idx[None, :], term, mask=m_ok & n_ok)
                tl.debug_barrier()
                done = tl.atomic_add(cnt_ptr + nb, 1, sem="acq_rel")
                if done == SPLIT_K - 1:  # the last program of this block: reduce, epilogue, reset the counter
                    tl.debug_barrier()
                    mn_ok = m_ok & n_ok
                    if HAS_BIAS:
                        bias = tl.load(bias_ptr + n_in).to(tl.float32)
                    if GROUP == 0:
                        ws_n = tl.load(bs_ptr + n_in * stride_bsn)
                        tot = tl.zeros((MP, BN), tl.int32)
                        for s0 in range(0, SPLIT_K, SC):
                            s3 = s0 + tl.arange(0, SC)[:, None, None]
                            p = tl.load(ws_ptr + (s3 * M + om[None, :, None]) * N + n_idx[None, None, :],
                                        mask=(s3 < SPLIT_K) & mn_ok[None, :, :], other=0, cache_modifier=".cg")
                            tot += tl.sum(p, axis=0)  # int32: exact in any order
                        y = (tot >> SHIFT).to(tl.float32) * ws_n[None, :]
                    else:
                        # y = 0; y += term_g in group order (the reference's loop). Masked steps past the last
                        # group add +0.0, which changes no y (y starts at +0.0, so it is never -0.0).
                        y = tl.zeros((MP, BN), tl.float32)
                        for g0 in range(0, SPLIT_K, SC):
                            for u in tl.static_range(SC):
                                y += tl.load(wsf_ptr + ((g0 + u) * M + om[:, None]) * N + n_idx[None, :],
                                             mask=mn_ok & (om[:, None] * 0 + (SPLIT_K - g0 - u) > 0), other=0.0,
                                             cache_modifier=".cg")
                    y = y * xs[:, None]
                    if HAS_BIAS:
                        y = y + bias[None, :]
                    tl.store(c_ptr + om[:, None].to(tl.int64) * stride_cm + n_idx[None, :],
                             y.to(c_ptr.dtype.element_ty), mask=mn_ok)
                    tl.atomic_xchg(cnt_ptr + nb, 0, sem="relaxed")


# ------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tile of ``_qgemv_kernel``.

    ``BN`` channels x ``BK`` K elements per program and step; ``LV`` contiguous int32 words of a row
    per lane group (``LV / 4`` lanes of 16-byte loads along K: more lanes, fewer registers for the
    activations but more shuffle rounds to reduce); ``NBP`` channel blocks per program, 0 for as many
    as keep the grid within one wave of ``ctas_per_sm`` programs per SM (at most 8). ``BK`` is lowered
    to divide K and to keep the activation words within 64 registers (``MP * BK / LV``). ``k_loop``:
    where K is longer than a slice (down_proj's 14336 = 7 x 2048), one program walks every slice of its
    blocks instead of K being split over programs whose partial sums meet in a workspace (integer
    activations and per-channel scales only; elsewhere it is ignored).
    """

    BN: int = 64
    BK: int = 512
    LV: int = 16
    num_warps: int = 4
    NBP: int = 0
    ctas_per_sm: int = 4
    k_loop: bool = False  # integer activations, per-channel scales: a program loops over every K slice

    def short(self) -> str:
        ctas = "" if self.NBP or self.ctas_per_sm == 4 else f"-c{self.ctas_per_sm}"
        loop = "-kloop" if self.k_loop else ""
        return f"bn{self.BN}-bk{self.BK}-lv{self.LV}-w{self.num_warps}-nbp{self.NBP or 'auto'}{ctas}{loop}"

    @classmethod
    def parse(cls, name: str) -> GemvConfig:
        """The tile ``short()`` names (``bn16-bk4096-lv128-w4-nbp1-kloop``); ValueError for anything else."""
        m = re.fullmatch(r"bn(\d+)-bk(\d+)-lv(\d+)-w(\d+)-nbp(\d+|auto)(?:-c(\d+))?(-kloop)?", name.strip())
        if m is None:
            raise ValueError(f"not a GEMV tile name: {name!r} (e.g. {cls().short()!r})")
        bn, bk, lv, warps, nbp, ctas, loop = m.groups()
        return cls(BN=int(bn), BK=int(bk), LV=int(lv), num_warps=int(warps), NBP=0 if nbp == "auto" else int(nbp),
                   ctas_per_sm=int(ctas or 4), k_loop=loop is not None)


# The tile for one token on integer activations with K > 4096 (down_proj) in place of ``default_config``'s,
# from its ``GemvConfig.short()`` name in ``RUQUANT_GEMV_LONG_K_TILE``: how a sweep's best tile is timed in
# a served engine (``scripts/gpu_session.sh decode``) before it becomes the default. Parsed once, here (a bad
# name fails the import with the form a name takes), not at every launch.
LONG_K_TILE: GemvConfig | None = (GemvConfig.parse(os.environ["RUQUANT_GEMV_LONG_K_TILE"])
                                  if os.environ.get("RUQUANT_GEMV_LONG_K_TILE") else None)


def default_config(m: int, n: int, k: int, a_mode: int = 0) -> GemvConfig:
    """The tile per shape class (rows held, activation mode); offline sm_90 builds (Triton 3.6 and 3.9
    alike), no spills. Integer activations (a_mode 0 / 1): a warp along K (LV = 128, reduced with
    ``redux``), long K slices, few splits: ~7.0 SASS instructions per weight word at M = 1 (128
    registers), ~15.3 at M = 4 (158). Float activations (a_mode 2): each program quantizes its K slice
    (~400-700 instructions a thread), so short slices and many channels a program: ~8.5 at M = 1 (123),
    ~17.1 at M = 4 (201). The measured choice comes from ``decode_linears.py --gemv-sweep``."""
    if a_mode == 2:
        if m <= 1:  # H200 sweep (gpu-2026-12-04e, gemv_sweep.json): 10.5 / 8.4 / 25.5 us for qkv / o / gate_up
            if n >= 16384:  # against 10.7 / 9.6 / 32.1 with BN=128, BK=256, LV=16 (the tile before)
                return GemvConfig(BN=32, BK=2048, LV=128, num_warps=8, ctas_per_sm=1)
            return GemvConfig(BN=16, BK=4096, LV=128)
        return GemvConfig(BN=64, BK=512, LV=32, ctas_per_sm=2)
    if m <= 1:  # H200 sweep on int8 activations (gpu-2026-12-04g, decode_linears --gemv-int8): 5.1 / 4.3 /
        if k <= 4096:  # 15.5 us for qkv / o / gate_up (one K slice a program), against 5.6 / 4.5 / 17.8 at BN 16
            return GemvConfig(BN=8, BK=4096, LV=128)
        if LONG_K_TILE is not None:
            return LONG_K_TILE
        # down_proj: 8 channels a program, one block, the K slices in a loop: 9.4 us against 11.7 for the tile
        # before (16 channels, no loop) in the H200 sweep of gpu-2026-12-04h, where the served rows ran it
        return GemvConfig(BN=8, BK=4096, LV=128, NBP=1, k_loop=True)
    return GemvConfig(BN=16, BK=2048, LV=128, ctas_per_sm=3)


# Alternatives that ``benchmarks/decode_linears.py --gemv-sweep`` times (19); the first five are
# ``default_config``'s.
SWEEP: list[GemvConfig] = [
    GemvConfig(BN=128, BK=256, LV=16),
    GemvConfig(BN=64, BK=512, LV=32, ctas_per_sm=2),
    GemvConfig(BN=16, BK=4096, LV=128),
    GemvConfig(BN=16, BK=2048, LV=128, ctas_per_sm=3),
    GemvConfig(BN=64, BK=512, LV=16),
    GemvConfig(BN=32, BK=512, LV=16),
    GemvConfig(BN=64, BK=256, LV=32),
    GemvConfig(BN=8, BK=4096, LV=128),
    GemvConfig(BN=32, BK=2048, LV=128, num_warps=8, ctas_per_sm=1),
    GemvConfig(BN=64, BK=512, LV=16, num_warps=8, ctas_per_sm=2),
    GemvConfig(BN=128, BK=256, LV=16, NBP=8),
    GemvConfig(BN=32, BK=1024, LV=64),
    # integer activations at M = 1 (the quantization in the compiled graph): more programs in flight
    GemvConfig(BN=16, BK=4096, LV=128, ctas_per_sm=8),
    GemvConfig(BN=16, BK=4096, LV=128, NBP=1),
    GemvConfig(BN=32, BK=4096, LV=128, num_warps=8),
    GemvConfig(BN=8, BK=2048, LV=128, NBP=1),
    # down_proj (K = 14336) at M = 1 without split K: a program walks the 7 slices of its block
    GemvConfig(BN=8, BK=4096, LV=128, NBP=1, k_loop=True),
    GemvConfig(BN=16, BK=4096, LV=128, NBP=1, k_loop=True),
    GemvConfig(BN=32, BK=4096, LV=128, num_warps=8, NBP=1, k_loop=True),
]


def _fit(cfg: GemvConfig, k: int, group: int, mp: int, chunk: int) -> tuple[int, int]:
    """``(BK, LV)`` of ``cfg`` for this problem. Grouped weights: one group a slice (BK = group, LV =
    group / 8). Else LV at least a chunk's words (chunked layout), BK between one and four lane
    groups a row, at most 64 * LV / MP (activation registers), halved until it divides K."""
    if group:
        return group, group // 8
    lv = max(cfg.LV, chunk // 8)
    bk = max(min(cfg.BK, 32 * lv, 64 * lv // mp), 8 * lv)
    while k % bk:
        bk //= 2
    return bk, min(lv, bk // 8)


def kernel_constexprs(ls: dict, a_mode: int, b_mode: int, chunk: int, group: int, act_bits: int,
                      has_bias: bool) -> dict:
    """``_qgemv_kernel``'s constexprs (all but ``ASM``) for a ``launch_shape``: what ``qgemv`` launches and
    what ``benchmarks/gemv_compile_report.py`` builds offline."""
    return dict(A_MODE=a_mode, QMAX=(1 << (act_bits - 1)) - 1 if a_mode == 2 else 127, B_MODE=b_mode,
                CHUNK=chunk if b_mode == 2 else 128, GROUP=group, HAS_BIAS=has_bias, MP=ls["MP"], BN=ls["BN"],
                BK=ls["BK"], LV=ls["LV"], SC=ls["SC"], RB=ls["RB"], ONE_SPLIT=int(ls["SPLIT_K"] == 1 and not group),
                KSTEPS=ls["KSTEPS"])


def supports(m: int, k: int, group_size: int, a_mode: int, b_mode: int) -> bool:
    """Whether ``qgemv`` serves this problem (else ``qgemm`` does)."""
    group = 0 if group_size in (-1, k) else group_size
    if not 1 <= m <= MAX_ROWS or (a_mode, b_mode) not in ((0, 2), (2, 2), (1, 1)):
        return False
    if group and (group < 64 or group > 1024 or group & (group - 1)):
        return False  # a group is one lane group: a power of two of 8..128 words
    return k % 128 == 0 and _fits_int32(k, a_mode)


def _fits_int32(k: int, a_mode: int) -> bool:
    """Headroom of the int32 sums: |16 w a| <= 16 * 8 * 128 per element (256 * 8 * 8 packed), times K."""
    per = 256 * 8 * 8 if a_mode == 1 else 16 * 8 * 128
    return per * k < 2**31


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_shape(cfg: GemvConfig, m: int, n: int, k: int, group: int, chunk: int = 128,
                 sms: int = 132, a_mode: int = 0) -> dict[str, int]:
    """What one launch of ``cfg`` runs: rows held, tile, split, channel blocks per program, grid.

    ``NBP`` (unless the tile fixes it): enough blocks a program to keep the grid within one wave of
    ``ctas_per_sm`` programs per SM, at most 8; with in-kernel quantization at least 256 channels a
    program (its quantization is repeated in every program of a K slice) while that leaves one
    program per SM."""
    mp = triton.next_power_of_2(max(m, 1))
    bk, lv = _fit(cfg, k, group, mp, chunk)
    ksteps = k // bk if cfg.k_loop and not group and a_mode != 2 else 1
    split = k // bk // ksteps
    bn = cfg.BN
    if group:  # one group (LV words) a row: more channels, so that a thread loads >= 16 words a tile
        bn = max(bn, min(256, 16 * 32 * cfg.num_warps // lv))
    num_nb = triton.cdiv(n, bn)
    tiles = num_nb * split
    nbp = cfg.NBP
    if not nbp:
        nbp = min(8, max(1, triton.cdiv(tiles, sms * cfg.ctas_per_sm)))
        if a_mode == 2:
            nbp = max(nbp, min(triton.cdiv(256, bn), tiles // sms))
    nbp = max(1, min(nbp, num_nb))
    sc = 8 if group else min(triton.next_power_of_2(split), max(1, 64 // mp))
    assert bk // (8 * lv) in (1, 2, 4) and (not group or bk == group)
    return dict(MP=mp, BN=bn, BK=bk, LV=lv, SPLIT_K=split, KSTEPS=ksteps, NBP=nbp, SC=sc, RB=max(128, 1024 // mp),
                grid0=triton.cdiv(num_nb, nbp), blocks=num_nb)


# dp4a inline assembly: on by default on the GPU; off for the process (warned) if this Triton cannot
# build it.
_ASM = {"ok": not _INTERPRET and os.environ.get("RUQUANT_UNPACK_ASM", "1") != "0"}


# ------------------------------------------------------------------------------ workspace

_WORKSPACE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers that a captured CUDA graph may still point at


def _workspace(device: torch.device, numel: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4-byte workspace (partials; every call overwrites what it reads) and zeroed block counters
    (the kernel resets each to zero), cached per device; never shrinks, never freed."""
    key = (device.type, device.index or 0)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < blocks:
        if ws is not None:
            _RETIRED.extend((ws, cnt))
        ws = torch.empty(max(numel, 1 << 20), dtype=torch.int32, device=device)
        cnt = torch.zeros(max(blocks, 1 << 14), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


# ------------------------------------------------------------------------------ launcher


def qgemv(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, b_scale: torch.Tensor, *,
          a_mode: int, b_mode: int, K: int, group_size: int = -1, chunk: int = 128,
          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
          out: torch.Tensor | None = None, act_bits: int = 8, clip_ratio: float = 1.0,
          config: GemvConfig | None = None, asm: bool | None = None) -> torch.Tensor:
    """``qgemm``'s result (same arguments, same bits) for up to 8 rows, on CUDA cores.

    ``a``: int8 (M, K) (a_mode 0), packed uint8 (M, K/2) (a_mode 1), or the float activation itself
    (a_mode 2, quantized per token here to ``act_bits`` with ``clip_ratio``; ``a_scale`` unused).
    ``b``: chunked int4 (N, K/2) (b_mode 2), or packed like A (b_mode 1, with a_mode 1); ``b_scale``
    fp32 (N, G). ``config`` pins a tile (benchmarks, tests), else ``default_config``; ``asm`` pins
    the inline-assembly switch (tests), else it is on where it builds.
    """
    M = a.shape[0]
    N = b.shape[0]
    group = 0 if group_size in (-1, K) else group_size
    if not supports(max(M, 1), K, group_size, a_mode, b_mode):
        raise ValueError(f"qgemv does not serve M={M} K={K} group={group_size} a_mode={a_mode} b_mode={b_mode}")
    if a_mode == 2 and a.stride(-1) != 1:
        raise ValueError("a_mode 2 needs contiguous rows")
    if b_mode == 2 and (chunk not in (64, 128) or K % chunk or (group and group % chunk)):
        raise ValueError(f"chunk {chunk} does not tile K={K} / group {group_size}")
    c = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    if group == 0 and b_scale.dim() == 2:
        b_scale = b_scale[:, 0]
    cfg = config or default_config(M, N, K, a_mode)
    ls = launch_shape(cfg, M, N, K, group, chunk if b_mode == 2 else 8, _sm_count(a.device), a_mode)
    if a_mode == 2:
        a_arg, stride_am, a_scale = a, a.stride(0), b_scale  # a valid pointer; scales computed inside
    else:
        if a.stride(-1) != 1 or a.stride(0) % 4 or a.data_ptr() % 4:
            raise ValueError("int8 / packed activations must be 4-byte aligned rows")
        a_arg = a.view(torch.uint8).view(torch.int32) if a_mode == 1 else a.view(torch.int32)
        stride_am = a.stride(0) // 4
    if b.stride(-1) != 1 or b.stride(0) % 4 or b.data_ptr() % 4:
        raise ValueError("packed weights must be 4-byte aligned rows")
    b_arg = b.view(torch.uint8).view(torch.int32)
    ws, cnt = _workspace(a.device, ls["SPLIT_K"] * M * N, ls["blocks"])
    grid = (ls["grid0"], ls["SPLIT_K"])
    kwargs = dict(kernel_constexprs(ls, a_mode, b_mode, chunk, group, act_bits, bias is not None),
                  num_warps=cfg.num_warps, num_stages=1)
    if not _INTERPRET:
        kwargs["enable_fp_fusion"] = False
    args = (a_arg, b_arg, a_scale, b_scale, bias if bias is not None else b_scale, c, ws, ws.view(torch.float32),
            cnt, M, N, K, stride_am, b_arg.stride(0), b_scale.stride(0), c.stride(0), ls["SPLIT_K"], ls["NBP"],
            float(clip_ratio))
    while True:
        use_asm = _ASM["ok"] if asm is None else asm
        try:
            _qgemv_kernel[grid](*args, **kwargs, ASM=int(use_asm))
            return c
        except Exception as e:  # noqa: BLE001 - only the asm build may fail this way
            if not use_asm or asm is not None:
                raise
            logger.warning("ruquant: dp4a inline asm failed (%s); plain Triton products",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            _ASM["ok"] = False
