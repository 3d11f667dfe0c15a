"""Quantized GEMM (Triton): W4A4 / W4A8 / W8A8 on int8 (or FP8) tensor cores, bf16 out.

Why it looks like this:

* Hopper has no int4 MMA. Both operands stay 4-bit in device memory and are widened in
  registers. The widening is one AND (high nibble) or one shift (low nibble) per byte,
  because we keep each nibble in the *top* half of its int8: the int8 holds ``16 * v``.
  The product then carries a factor 16 (or 256 with both operands packed), which is a
  power of two: the int32 sum stays exact (|acc| <= 256 * K * 64 < 2^31 for K < 131072)
  and an arithmetic shift right removes it exactly before the epilogue.
* A dot product does not care in which order K is summed, as long as both operands use
  the same order. So a packed tile is never interleaved back: the low nibbles of A meet
  the low nibbles of B in one MMA and the high nibbles meet in a second.
  - W4A4: activations and weights both in the checkpoint's layout (element 2i low nibble).
  - W4A8: int8 activations have no nibbles, so the weights are repacked once (``prepare``)
    in a *chunked* layout: within each chunk of C elements along K, byte t holds element
    t (low) and element t + C/2 (high). The A tile is then two contiguous half-tiles.
* Epilogue in fp32 in the reference's order: per group ``y += float(acc_g) * w_scale``,
  then ``* x_scale``, then ``+ bias``, one rounding to the output dtype. FMA contraction
  is disabled so each step rounds as torch's separate ops do: outputs match the reference
  bit for bit given the same integers.
* Decode sizes (M <= 16) are bound by reading the weights. With few N tiles the grid
  cannot fill 132 SMs, so K is split across programs; partial int32 sums are added
  atomically into a workspace (exact, order-free), and the last program of a tile (a
  counter) applies the epilogue and zeroes the workspace and counter behind it, so no
  memset launch is needed and the kernel can be replayed in a CUDA graph.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

from vllm_ruquant.kernels.rotate_quant import _rint

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
logger = logging.getLogger(__name__)


def _autotune_enabled() -> bool:
    """Whether to autotune; else each call takes the first (heuristic) config of its M bucket.

    ``RUQUANT_AUTOTUNE=0`` turns it off (tests); read per call, so a test can flip it. Every M
    bucket tunes, the decode one (M <= 16) too: its first config lost 29% of the GEMM time at batch
    16 in the served H200 decode step (2194 against 1700 us a step, gpu-2026-12-04d vs 04b). The
    autotuner's noisy pick at M = 1 (a 2x slower gate_up config, 2026-12-04b) no longer matters:
    M <= 4 runs the GEMV (``gemv.py``).
    """
    return os.environ.get("RUQUANT_AUTOTUNE", "1") != "0" and not _INTERPRET


def m_bucket(m: int) -> int:
    """Autotune key for M: powers of two from 16 to 16384, so serving re-tunes rarely."""
    return min(16384, max(16, triton.next_power_of_2(max(m, 1))))


def buckets_up_to(max_rows: int) -> list[int]:
    """Every ``m_bucket`` a call of 1..``max_rows`` rows falls in: 16, 32, ..., ``m_bucket(max_rows)``."""
    out = [16]
    while out[-1] < m_bucket(max_rows):
        out.append(out[-1] * 2)
    return out


def autotunes() -> bool:
    """Whether ``qgemm`` (and ``dequant_gemm.w4a16_gemm``) pick their configs by timing them."""
    return _autotune_enabled()


# ------------------------------------------------------------------------------ kernel


@triton.jit
def _nib_lo(x, ASM: tl.constexpr):
    """Low nibble of each byte into the top of an int8: 16 * v (exact, two's complement).

    ``ASM``: two 32-bit instructions per four bytes (shift, mask), where the compiler
    otherwise works byte by byte.
    """
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [x],
            dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (x << 4).to(tl.int8, bitcast=True)


@triton.jit
def _nib_hi(x, ASM: tl.constexpr):
    """High nibble of each byte kept in place as an int8: 16 * v."""
    if ASM:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [x],
                                         dtype=tl.int8, is_pure=True, pack=4)
    else:
        return (x & 0xF0).to(tl.int8, bitcast=True)


@triton.jit
def _mma(a, b, acc, SWAP: tl.constexpr, FP8_ACC: tl.constexpr):
    """acc += a @ b^T, or its transpose (b @ a^T) when SWAP; FP8_ACC > 0 promotes fp8 sums."""
    # out_dtype explicit: Triton 3.6 defaults it to fp32 whatever the accumulator
    if FP8_ACC > 0:
        if SWAP:
            return tl.dot(b, tl.trans(a), acc, max_num_imprecise_acc=FP8_ACC, out_dtype=acc.dtype)
        else:
            return tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=FP8_ACC, out_dtype=acc.dtype)
    else:
        if SWAP:
            return tl.dot(b, tl.trans(a), acc, out_dtype=acc.dtype)
        else:
            return tl.dot(a, tl.trans(b), acc, out_dtype=acc.dtype)


@triton.jit
def _acc_f32(acc, SHIFT: tl.constexpr, IS_FLOAT: tl.constexpr):
    """Undo the 16x / 256x nibble scaling exactly and convert to fp32 as torch's .float() does."""
    if IS_FLOAT:
        return acc * (1.0 / (1 << SHIFT))  # power of two: exact
    else:
        return (acc >> SHIFT).to(tl.float32)


@triton.jit
def _epilogue(acc, xs, pid_m, pid_n, bs_ptr, bias_ptr, c_ptr, M, N, stride_bsn, stride_cm,
              SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FLOAT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """Per-channel epilogue: ``((acc >> SHIFT) * w_scale) * x_scale + bias`` -> out dtype (xs: (BM,))."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    accf = _acc_f32(acc, SHIFT, IS_FLOAT)
    ws = tl.load(bs_ptr + offs_n * stride_bsn, mask=nmask, other=0.0)
    y = accf * ws[None, :]
    y = y * xs[:, None]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _row_scales(a_row, K, clip, QMAX: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """Per-token activation scale of ``BM`` rows over all of K, as ``reference.quantize_activation``:
    ``max(absmax * clip / qmax, FLT_MIN)`` with an IEEE division (bit-identical to rotate_quant's)."""
    amax = tl.zeros((BM,), tl.float32)
    cols = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        amax = tl.maximum(amax, tl.max(tl.abs(tl.load(a_row + (k0 + cols)[None, :]).to(tl.float32)), axis=1))
    return tl.maximum(tl.div_rn(amax * clip, QMAX * 1.0), 1.1754943508222875e-38)


@triton.jit
def _quantize(x, scale, QMAX: tl.constexpr):
    """``clamp(rint(x / scale))`` as int8 (x: (BM, n) any float, scale: (BM,)): rotate_quant's rounding."""
    q = _rint(tl.div_rn(x.to(tl.float32), scale[:, None]))
    return tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int8)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _qgemm_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_am, stride_bn, stride_bsn, stride_cm, M_BUCKET, clip,
    A_MODE: tl.constexpr,  # 0: int8 per element; 1: int4 packed (element 2i low nibble);
    #                        2: float activations, quantized here per token (QMAX) with B_MODE 2
    QMAX: tl.constexpr,
    B_MODE: tl.constexpr,  # 0: int8 per element; 1: int4 packed like A; 2: int4 chunked
    CHUNK: tl.constexpr,  # chunk of the chunked layout (B_MODE 2)
    GROUP: tl.constexpr,  # weight group size along K; 0: one scale per output channel
    HAS_BIAS: tl.constexpr, USE_FP8: tl.constexpr, FP8_ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP: tl.constexpr, ASM: tl.constexpr,
):
    """C[m, n] = epilogue(sum_k A[m, k] * B[n, k]) for one (BM, BN) tile and one K split.

    ``SWAP`` computes the transposed tile (weights as the MMA's first operand): on Hopper
    the first operand may come from registers, so the unpacked weights skip the shared
    memory round trip that the second operand needs.
    """
    SHIFT: tl.constexpr = (4 if A_MODE == 1 else 0) + (4 if B_MODE != 0 else 0)
    PAIRED: tl.constexpr = B_MODE != 0
    H: tl.constexpr = CHUNK // 2
    KB: tl.constexpr = BK // 2 if PAIRED else BK  # bytes of B (and A-half) per row per step

    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz

    # Row indices wrap instead of masking: out-of-range rows compute garbage that is never stored.
    rm = ((pid_m * BM + tl.arange(0, BM)) % M).to(tl.int64)
    rn = ((pid_n * BN + tl.arange(0, BN)) % N).to(tl.int64)
    j = tl.arange(0, KB)

    k_per_split = K // SPLIT_K
    k_start = pid_k * k_per_split
    a_row = a_ptr + rm[:, None] * stride_am
    b_row = b_ptr + rn[:, None] * stride_bn
    if PAIRED:
        b_ptrs = b_row + (k_start // 2 + j)[None, :]
    else:
        b_ptrs = b_row + (k_start + j)[None, :]
    if A_MODE == 1:
        a_ptrs = a_row + (k_start // 2 + j)[None, :]
    elif PAIRED:  # int8 activations against chunked weights: two contiguous half-tiles
        a_ptrs = a_row + (k_start + (j // H) * CHUNK + j % H)[None, :]
    else:
        a_ptrs = a_row + (k_start + j)[None, :]

    if A_MODE == 2:
        xscale = _row_scales(a_row, K, clip, QMAX, BM, BK)
    else:
        offs_m0 = pid_m * BM + tl.arange(0, BM)
        xscale = tl.load(as_ptr + offs_m0, mask=offs_m0 < M, other=0.0)
    if GROUP == 0:
        KSTEP: tl.constexpr = BK
    else:
        KSTEP: tl.constexpr = GROUP
    INNER: tl.constexpr = KSTEP // BK
    if A_MODE == 1:
        A_STEP: tl.constexpr = KB
    else:
        A_STEP: tl.constexpr = BK
    if SWAP:
        TM: tl.constexpr = BN
        TN: tl.constexpr = BM
    else:
        TM: tl.constexpr = BM
        TN: tl.constexpr = BN
    if USE_FP8:
        acc = tl.zeros((TM, TN), tl.float32)
    else:
        acc = tl.zeros((TM, TN), tl.int32)
    yacc = tl.zeros((TM, TN), tl.float32)
    n_outer = k_per_split // KSTEP
    for g in range(n_outer):
        if GROUP != 0:
            acc = tl.zeros_like(acc)
        for _kk in tl.static_range(INNER):
            b = tl.load(b_ptrs)
            if PAIRED:
                if A_MODE == 1:
                    a = tl.load(a_ptrs)
                    a_lo = _nib_lo(a, ASM)
                    a_hi = _nib_hi(a, ASM)
                elif A_MODE == 2:
                    a_lo = _quantize(tl.load(a_ptrs), xscale, QMAX)
                    a_hi = _quantize(tl.load(a_ptrs + H), xscale, QMAX)
                else:
                    a_lo = tl.load(a_ptrs)
                    a_hi = tl.load(a_ptrs + H)
                b_lo = _nib_lo(b, ASM)
                b_hi = _nib_hi(b, ASM)
                if USE_FP8:
                    # 16*v is exact in e4m3; promote to fp32 every MMA (K=32): exact sums.
                    acc = _mma(a_lo.to(tl.float16).to(tl.float8e4nv),
                               b_lo.to(tl.float16).to(tl.float8e4nv), acc, SWAP, FP8_ACC)
                    acc = _mma(a_hi.to(tl.float16).to(tl.float8e4nv),
                               b_hi.to(tl.float16).to(tl.float8e4nv), acc, SWAP, FP8_ACC)
                else:
                    acc = _mma(a_lo, b_lo, acc, SWAP, 0)
                    acc = _mma(a_hi, b_hi, acc, SWAP, 0)
            else:
                a = tl.load(a_ptrs)
                acc = _mma(a, b, acc, SWAP, 0)
            a_ptrs += A_STEP
            b_ptrs += KB
        if GROUP != 0:
            # reference order: y += float(acc_g) * w_scale[:, g]  (fp32, two roundings)
            offs_n = pid_n * BN + tl.arange(0, BN)
            gs = tl.load(bs_ptr + offs_n * stride_bsn + (k_start // GROUP + g), mask=offs_n < N,
                         other=0.0)
            if SWAP:
                yacc = yacc + _acc_f32(acc, SHIFT, USE_FP8) * gs[:, None]
            else:
                yacc = yacc + _acc_f32(acc, SHIFT, USE_FP8) * gs[None, :]
    if SWAP:
        acc = tl.trans(acc)
        yacc = tl.trans(yacc)

    if GROUP != 0:
        # per-group: the weight scales are already in
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mmask = offs_m < M
        nmask = offs_n < N
        y = yacc * xscale[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    elif SPLIT_K == 1:
        _epilogue(acc, xscale, pid_m, pid_n, bs_ptr, bias_ptr, c_ptr, M, N, stride_bsn, stride_cm,
                  SHIFT, HAS_BIAS, USE_FP8, BM, BN)
    else:
        # exact int32 reduction across K splits in a self-cleaning workspace (see module doc)
        if USE_FP8:
            acci = acc.to(tl.int32)  # integer-valued and < 2^31: exact
        else:
            acci = acc
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        wmask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        w_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(w_ptrs, acci, mask=wmask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * num_pid_n + pid_n
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.atomic_xchg(w_ptrs, tl.zeros((BM, BN), tl.int32), mask=wmask, sem="acquire")
            _epilogue(total, xscale, pid_m, pid_n, bs_ptr, bias_ptr, c_ptr, M, N, stride_bsn,
                      stride_cm, SHIFT, HAS_BIAS, False, BM, BN)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")


# ------------------------------------------------------------------------------ configs


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, split: int = 1, swap: int = 0,
         gm: int = 8) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "GROUP_M": gm,
                          "SWAP": swap}, num_warps=warps, num_stages=stages)


# Per M bucket, best guess first (used alone when autotuning is off). Measured on H100
# (benchmarks/gemm_variants.py): SWAP (weights as wgmma's register operand) and split K
# win at M <= 16; see docs/kernels.md.
_CONFIGS: dict[str, list[triton.Config]] = {
    "small": [  # M <= 16: weight streaming; split K to fill the SMs; SWAP puts N on wgmma's M
        _cfg(16, 64, 256, 4, 4, 2, 1), _cfg(16, 64, 256, 4, 4, 4, 1), _cfg(16, 128, 256, 4, 4, 2, 1),
        _cfg(16, 64, 256, 4, 4, 1, 1),
        # 32 channels a tile: mma.sync instead of wgmma, so no wait after each MMA (Triton waits for every
        # integer wgmma: benchmarks/gemm_compile_report.py); for the autotuner to time against the above
        # (the 12-04g profile: 62 us a Llama-3-8B layer at M = 16 against a 34 us weight-read floor)
        _cfg(16, 32, 256, 2, 4, 2, 1), _cfg(16, 32, 256, 2, 4, 4, 1),
    ],
    "mid": [  # 32..128
        _cfg(64, 128, 128, 4, 4, 1, 1), _cfg(64, 128, 128, 4, 4), _cfg(32, 128, 256, 4, 3, 1, 1),
    ],
    "large": [  # >= 256
        _cfg(128, 128, 128, 8, 4, 1, 1), _cfg(128, 256, 128, 8, 3, 1, 1), _cfg(128, 128, 128, 8, 4),
        _cfg(256, 128, 128, 8, 3),
    ],
}


def _bucket_name(mb: int) -> str:
    return "small" if mb <= 16 else ("mid" if mb <= 128 else "large")


def _config_ok(c: triton.Config, K: int, group: int, chunk: int, paired: bool) -> bool:
    kw = c.kwargs
    bk, split = kw["BK"], kw["SPLIT_K"]
    if group:
        return split == 1 and group % bk == 0 and (chunk == 0 or bk % chunk == 0)
    if chunk and bk % chunk:
        return False
    return K % (bk * split) == 0


def _shape_key(c: triton.Config) -> tuple:
    kw = c.kwargs
    return (kw["BM"], kw["BN"], kw["BK"], kw["SPLIT_K"], kw["SWAP"], c.num_warps, c.num_stages)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs of this M bucket that tile K (and the weight groups) exactly.

    Filters the configs it is given (the autotuner's carry the ASM switch), by the shape
    keys of the bucket's list; the fallback inherits the switch.
    """
    args = {**named_args, **kwargs}
    mb, K = args["M_BUCKET"], args["K"]
    group, chunk = args["GROUP"], args["CHUNK"] if args["B_MODE"] == 2 else 0
    wanted = {_shape_key(c) for c in _CONFIGS[_bucket_name(mb)]}
    keep = [c for c in configs if _shape_key(c) in wanted
            and _config_ok(c, K, group, chunk, args["B_MODE"] != 0)]
    if keep:
        return keep
    fb = _fallback_config(K, group, chunk)
    extra = {"ASM": configs[0].kwargs["ASM"]} if configs and "ASM" in configs[0].kwargs else {}
    return [triton.Config(dict(fb.kwargs, **extra), num_warps=fb.num_warps, num_stages=fb.num_stages)]


def _fallback_config(K: int, group: int, chunk: int) -> triton.Config:
    bk = 64 if chunk != 128 else 128
    return _cfg(64, 64, bk, 4, 3)


def _all_configs() -> list[triton.Config]:
    seen, out = set(), []
    for cs in _CONFIGS.values():
        for c in cs:
            key = str(c)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


_KEY = ["M_BUCKET", "N", "K", "A_MODE", "QMAX", "B_MODE", "GROUP", "HAS_BIAS", "USE_FP8", "FP8_ACC"]


@functools.lru_cache(maxsize=2)
def _tuned_kernel(asm: bool):
    configs = []
    for c in _all_configs():
        kw = dict(c.kwargs, ASM=int(asm))
        configs.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _prune},
                           warmup=10, rep=40)(_qgemm_kernel)


# Packed-nibble inline assembly: on by default on the GPU; switched off for the process
# (with a warning) if this Triton cannot build it.
_ASM = {"ok": not _INTERPRET and os.environ.get("RUQUANT_UNPACK_ASM", "1") != "0"}


# ------------------------------------------------------------------------------ workspace

_WORKSPACE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int32 workspace and tile counters for split-K; kernels leave them zeroed."""
    key = (device.type, device.index or 0)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        ws = torch.zeros(max(numel, 1 << 20), dtype=torch.int32, device=device)
        cnt = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


# ------------------------------------------------------------------------------ launcher


def qgemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
          a_mode: int, b_mode: int, K: int, group_size: int = -1, chunk: int = 128,
          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
          use_fp8: bool = False, fp8_acc: int = 32, config: triton.Config | None = None,
          out: torch.Tensor | None = None, act_bits: int = 8, clip_ratio: float = 1.0) -> torch.Tensor:
    """``y = (A_int @ B_int^T) * b_scale * a_scale + bias`` for quantized A and B.

    ``a``: int8 (M, K) (a_mode 0) or packed uint8 (M, K/2) (a_mode 1); ``a_scale`` fp32 (M,).
    a_mode 2: ``a`` is the float activation (M, K) itself, quantized per token inside the kernel to
    ``act_bits`` with ``clip_ratio`` (the integers and scales of ``rotate_quant``, no rotation);
    ``a_scale`` is unused (None), and ``b`` must be chunked (b_mode 2). For decode sizes: one
    launch instead of two, at the price of each program reading its rows whole for the scale.
    ``b``: int8 (N, K) (b_mode 0), packed uint8 (N, K/2) in A's layout (1) or chunked (2);
    ``b_scale`` fp32 (N, G). ``config`` pins a kernel config (tests), else autotuned.
    ``out`` (M, N) receives the result (tests poison it first).
    """
    M = a.shape[0]
    N = b.shape[0]
    if b_mode == 1 and a_mode != 1:
        raise ValueError("b_mode 1 (interleaved nibbles) needs packed int4 activations")
    if a_mode == 1 and b_mode != 1:
        raise ValueError("packed int4 activations need b_mode 1 weights")
    if use_fp8 and not (a_mode == 1 and b_mode == 1):
        raise ValueError("the FP8 path is exact only for int4 x int4")
    if a_mode == 2 and b_mode != 2:
        raise ValueError("in-kernel activation quantization (a_mode 2) needs chunked weights (b_mode 2)")
    if a_mode == 2 and (a.stride(-1) != 1 or K % 128):
        raise ValueError("a_mode 2 needs contiguous rows and K a multiple of 128")
    group = 0 if group_size in (-1, K) else group_size
    c = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    if group == 0 and b_scale.dim() == 2:
        b_scale = b_scale[:, 0]
    bs_stride = b_scale.stride(0)
    mb = m_bucket(M)
    a = a.view(torch.uint8) if a_mode == 1 else a
    b = b.view(torch.uint8) if b_mode != 0 else b
    if a_mode == 2:
        a_scale = b_scale  # a valid pointer; the kernel computes the activation scales
    args = dict(A_MODE=a_mode, QMAX=(1 << (act_bits - 1)) - 1 if a_mode == 2 else 127,
                B_MODE=b_mode, CHUNK=chunk if b_mode == 2 else 128,
                GROUP=group, HAS_BIAS=bias is not None, USE_FP8=use_fp8,
                FP8_ACC=fp8_acc if use_fp8 else 0)
    if not _INTERPRET:
        args["enable_fp_fusion"] = False
    bias_arg = bias if bias is not None else b_scale
    # split-K configs exist only for M <= 128 (BM >= 16, BN >= 32)
    ws, cnt = _workspace(a.device, M * N if mb <= 128 else 1,
                         triton.cdiv(M, 16) * triton.cdiv(N, 32) if mb <= 128 else 1)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), meta["SPLIT_K"])

    common = (a, b, a_scale, b_scale, bias_arg, c, ws, cnt, M, N, K, a.stride(0), b.stride(0),
              bs_stride, c.stride(0))
    clip = float(clip_ratio)
    if config is None and not _autotune_enabled():
        config = _prune(_CONFIGS[_bucket_name(mb)], {"M_BUCKET": mb, "K": K, "GROUP": group,
                                                    "CHUNK": args["CHUNK"], "B_MODE": b_mode})[0]
    if config is not None and config.kwargs["SPLIT_K"] > 1 and mb > 128:
        raise ValueError("split-K configs are for M <= 128 (workspace size)")
    while True:
        asm = _ASM["ok"] if config is None or "ASM" not in config.kwargs else bool(config.kwargs["ASM"])
        try:
            if config is None:
                _tuned_kernel(asm)[grid](*common, mb, clip, **args)
            else:
                kw = dict(config.kwargs, ASM=int(asm))
                _qgemm_kernel[grid](*common, mb, clip, **args, **kw, num_warps=config.num_warps,
                                    num_stages=config.num_stages)
            return c
        except Exception as e:  # noqa: BLE001 - only the asm build may fail this way
            if not asm or (config is not None and "ASM" in config.kwargs):
                raise
            logger.warning("ruquant: nibble-unpack inline asm failed (%s); plain Triton unpack",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            _ASM["ok"] = False


def all_configs() -> list[triton.Config]:
    """Every config the autotuner may pick (tests run each once)."""
    return _all_configs()


def configs_for(m: int, K: int, group_size: int, b_mode: int, chunk: int = 128) -> list[triton.Config]:
    """The configs the autotuner considers for this problem (tests run each once)."""
    group = 0 if group_size in (-1, K) else group_size
    return _prune(_CONFIGS[_bucket_name(m_bucket(m))], {"M_BUCKET": m_bucket(m), "K": K,
                                                        "GROUP": group, "CHUNK": chunk,
                                                        "B_MODE": b_mode})
