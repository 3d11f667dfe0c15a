"""Paged attention over vLLM's packed int4 KV cache, on bf16/fp16 tensor cores.

Why our own kernel: vLLM 0.26's ``_attn_packed`` (``int4_per_token_head``) upcasts the
nibbles and Q to fp32 and runs ``tl.dot`` in TF32 on 16-query-row tiles, also for
1024-token prefill chunks and long decodes; on an H200 the w4a4kv4 engine ran at 0.56x the
same linears with a bf16 cache (issue 3). Here:

* Q stays in the model dtype; the nibbles become exact small integers of that dtype (plus a
  bias, ``_unpack``), so ``Q . K`` is one bf16 MMA with fp32 accumulation. The zero point and
  the per-(token, head) scale are applied to the scores: ``s = (Q.Kq - zp_k * sum(Q)) * sk``.
* ``P . V`` likewise: ``P * sv`` is rounded to the model dtype (what FlashAttention does to
  P), and the same rounded value subtracts the zero point: ``sum_t p'_t (Vq_t - zp_t)``.
* GQA: one program serves all query heads of one KV head, ``BLOCK_Q`` queries x
  ``num_queries_per_kv`` heads = ``BLOCK_M`` rows, so every K/V tile is read once per tile.
* Two launches per step: decodes (at most ``BLOCK_Q`` queries) one program per sequence and
  KV head with small tiles, the keys split into segments when the batch would leave most
  SMs idle (``_combine_segments`` merges them); longer query runs in 64-128-row tiles.
* The packed cache is read as int32 words (vLLM's slots are 4- but not 16-byte aligned).
* Nibbles become floats by bit operations, not int-to-float conversions (``_unpack``).
* ``dequantize_sequences``: whole sequences' K/V to bf16, for prefill chunks attended by
  FlashAttention in the engine (``vllm_ruquant/attention.py``).

Cache layout (vLLM's): keys and values ``(blocks, page, kv_heads, >= head_dim / 2)`` uint8,
element ``2j`` in the low nibble; scales ``(blocks, page, kv_heads)`` fp32 whose low 4
mantissa bits hold the zero point (``reference.quantize_kv_int4``). Causal attention,
queries at the end of each sequence. Torch oracle: ``reference.paged_int4_attention``.
No vLLM import: the kernel runs under the Triton CPU interpreter in the tests. Measured:
``benchmarks/kv4_attention.py``, ``docs/kernels.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DECODE_PLAN_ENV = "RUQUANT_INT4_KV_DECODE_PLAN"
INT32_OFFSET_LIMIT = 2 ** 31  # cache storage (in 4-byte words) below which addresses use int32
# decode batches of fewer (sequence, KV head) pairs split each sequence's keys into segments,
# as many as give ~DECODE_PROGRAMS_TARGET programs (a power of two, 2..MAX_KEY_SEGMENTS)
SPLIT_KEYS_BELOW_PAIRS = 256
DECODE_PROGRAMS_TARGET = 1024
MAX_KEY_SEGMENTS = 64
_LOG2E = 1.4426950408889634


@triton.jit
def _mma_operand(x, dtype: tl.constexpr, FP32_DOTS: tl.constexpr):
    """``x`` rounded to the MMA dtype; under the interpreter carried as fp32.

    Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits, so there
    the dots run on the same (already rounded) values in fp32: equal products, only the
    summation order differs from the tensor cores.
    """
    x = x.to(dtype)
    if FP32_DOTS:
        x = x.to(tl.float32)
    return x


@triton.jit
def _find_sequence(cu_q_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The sequence whose q blocks contain global q block ``q_block``.

    Sequence ``i`` owns blocks ``[cu_q[i] // BLOCK_Q + i, cu_q[i+1] // BLOCK_Q + i + 1)``:
    the ``+ i`` leaves room for each sequence's partial last block.
    """
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_q_ptr + mid) // BLOCK_Q + mid
        if start <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _load_tile(words_ptr, scale_ptr, page, slot, kv_head, key_ok, words,
               stride_blk, stride_slot, stride_head, stride_s_blk, stride_s_slot, stride_s_head):
    """One tile of keys (or values): (TILE_N, d/8) int32 words, and per token scale and zero point.

    The packed rows are read as int32 words: a token's row is 4-byte aligned in vLLM's layout
    (K at byte 0, V at byte head_dim / 2 + 4 of a slot) but not 16-byte aligned, so byte
    pointers compile to one-byte loads; word pointers give 4-byte ones.
    """
    row = page * stride_blk + slot * stride_slot + kv_head * stride_head
    w = tl.load(words_ptr + row[:, None] + words[None, :], mask=key_ok[:, None], other=0)
    scale, zero = _split_scale(tl.load(scale_ptr + page * stride_s_blk + slot * stride_s_slot
                                       + kv_head * stride_s_head, mask=key_ok, other=0.0))
    return w, scale, zero


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, page, key_pos, key_ok, kv_head, words,
                  stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot, stride_vc_head,
                  stride_ks_blk, stride_ks_slot, stride_ks_head, stride_vs_blk, stride_vs_slot, stride_vs_head,
                  PAGE: tl.constexpr, CACHE_OFFSETS_INT32: tl.constexpr):
    """K and V words, scales and zero points of the keys ``key_pos`` (block-table ``page`` each)."""
    page = page if CACHE_OFFSETS_INT32 else page.to(tl.int64)
    slot = key_pos % PAGE
    k_words, k_scale, k_zero = _load_tile(k_cache_ptr, k_scale_ptr, page, slot, kv_head, key_ok, words,
                                          stride_kc_blk, stride_kc_slot, stride_kc_head,
                                          stride_ks_blk, stride_ks_slot, stride_ks_head)
    v_words, v_scale, v_zero = _load_tile(v_cache_ptr, v_scale_ptr, page, slot, kv_head, key_ok, words,
                                          stride_vc_blk, stride_vc_slot, stride_vc_head,
                                          stride_vs_blk, stride_vs_slot, stride_vs_head)
    return k_words, k_scale, k_zero, v_words, v_scale, v_zero


@triton.jit
def _unpack(w, dtype: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(TILE_N, d) ``dtype`` values ``_nibble_bias(dtype) + nibble`` of the words, in logical order.

    No int-to-float conversion (quarter-rate, it bounded the decode loop): a nibble OR'd into
    the mantissa of the bias is the float ``bias + nibble`` (bf16 0x4300 = 128, fp16 0x6400 =
    1024), and one 32-bit shift + mask + OR makes two of them, nibbles ``s`` and ``s + 4`` of a
    word. So a row comes out in logical order, position ``8w + 2s + h`` holding nibble
    ``s + 4h`` of word ``w`` = cache dim ``_cache_dim(position)``; Q is loaded and the output
    stored in that order too, so no nibble ever moves. fp32 has no bias (2^23 would swamp q
    in the products): its ``2^23 + n`` is brought back to ``n``.
    """
    shift = tl.arange(0, 4) * 4
    t = (w[:, :, None] >> shift[None, None, :]) & 0x000F000F
    if dtype == tl.bfloat16:
        t = t | 0x43004300
        lo = (t & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        t = t | 0x64006400
        lo = (t & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        lo = ((t & 0xFFFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((t >> 16) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return tl.reshape(tl.join(lo, hi), (TILE_N, HEAD_DIM))


@triton.jit
def _cache_dim(position):
    """The cache dim at logical ``position`` of an ``_unpack``-ed row (dim ``8w + i`` is nibble
    ``i`` of word ``w``: byte ``4w + i // 2``, low nibble for even ``i``)."""
    return (position // 8) * 8 + (position % 8) // 2 + 4 * (position % 2)


@triton.jit
def _nibble_bias(dtype: tl.constexpr):
    """What ``_unpack`` adds to every nibble of ``dtype``: folded into the zero points."""
    if dtype == tl.bfloat16:
        return 128.0
    elif dtype == tl.float16:
        return 1024.0
    else:
        return 0.0


@triton.jit
def _split_scale(raw):
    """fp32 scale with the zero point in its low 4 mantissa bits -> (scale, zero point)."""
    bits = raw.to(tl.int32, bitcast=True)
    return (bits & -16).to(tl.float32, bitcast=True), (bits & 0xF).to(tl.float32)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_sum, k_words, k_scale, k_zero, v_words, v_scale, v_zero,
                 key_pos, key_ok, q_abs, row_ok, bias, qk_scale_log2, dtype: tl.constexpr, TILE_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, FP32_DOTS: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over one tile of keys: the running (acc, max, sum) after it.

    ``MASKED``: keys past a row's position, past the sequence and rows of padding get no
    weight; unmasked, every score counts (the caller's tile lies below every row's causal
    edge; padding rows have q = 0, so finite scores, and are never stored).
    """
    k = _mma_operand(_unpack(k_words, dtype, TILE_N, HEAD_DIM), dtype, FP32_DOTS)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = (s - q_sum[:, None] * (k_zero + bias)[None, :]) * (k_scale * qk_scale_log2)[None, :]
    if MASKED:
        visible = (key_pos[None, :] <= q_abs[:, None]) & key_ok[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)

    pv = _mma_operand(p * v_scale[None, :], dtype, FP32_DOTS)
    pv_zero = tl.sum(pv.to(tl.float32) * (v_zero + bias)[None, :], axis=1)
    v = _mma_operand(_unpack(v_words, dtype, TILE_N, HEAD_DIM), dtype, FP32_DOTS)
    # accumulate in the MMA (one FFMA per element for the rescale and the zero point)
    acc = tl.dot(pv, v, acc * alpha[:, None] - pv_zero[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _int4_kv_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_table_ptr, seq_lens_ptr, cu_q_ptr,
    segm_acc_ptr, segm_max_ptr, segm_sum_ptr,
    num_seqs, qk_scale_log2,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_kc_blk, stride_kc_slot, stride_kc_head,
    stride_vc_blk, stride_vc_slot, stride_vc_head,
    stride_ks_blk, stride_ks_slot, stride_ks_head,
    stride_vs_blk, stride_vs_slot, stride_vs_head,
    stride_bt,
    NUM_Q_HEADS: tl.constexpr, QPKV: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, FP32_DOTS: tl.constexpr, PRECISION: tl.constexpr,
    PER_SEQUENCE: tl.constexpr, SKIP_Q_LEN_UPTO: tl.constexpr, CACHE_OFFSETS_INT32: tl.constexpr,
    PREFETCH_KV: tl.constexpr,
):
    """One (q block, KV head, key segment). ``PER_SEQUENCE``: program 0-axis = sequence, for
    sequences of at most ``BLOCK_Q`` queries (decodes); otherwise q blocks over all tokens,
    skipping sequences of at most ``SKIP_Q_LEN_UPTO`` queries (a per-sequence launch has them)."""
    WORDS: tl.constexpr = HEAD_DIM // 8  # the packed cache is read as int32: 8 nibbles per load lane
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    if PER_SEQUENCE:
        seq = tl.program_id(0)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        local_block = 0
        if (q_len == 0) | (q_len > BLOCK_Q):
            return
    else:
        q_block = tl.program_id(0)
        seq = _find_sequence(cu_q_ptr, num_seqs, q_block, BLOCK_Q)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        local_block = q_block - (q_start // BLOCK_Q + seq)
        if (local_block * BLOCK_Q >= q_len) | (q_len <= SKIP_Q_LEN_UPTO):
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_pos = local_block * BLOCK_Q + rows // QPKV  # position within this step's queries
    head = kv_head * QPKV + rows % QPKV
    row_ok = (q_pos < q_len) & (head < NUM_Q_HEADS)
    dims = _cache_dim(tl.arange(0, HEAD_DIM))  # Q, K, V and the output in _unpack's order
    q = tl.load(q_ptr + (q_start + q_pos)[:, None] * stride_q_tok + head[:, None] * stride_q_head
                + dims[None, :], mask=row_ok[:, None], other=0.0)
    dtype = q.dtype
    q_sum = tl.sum(q.to(tl.float32), axis=1)
    q = _mma_operand(q, dtype, FP32_DOTS)

    # causal: the last key any row of this block may see
    kv_stop = tl.minimum(context + local_block * BLOCK_Q + BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(kv_stop, TILE_N)
    tiles_per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
    tile_lo = segment * tiles_per_segment
    tile_hi = tl.minimum(tile_lo + tiles_per_segment, num_tiles)
    q_abs = context + q_pos  # each row's position in its sequence: it sees keys up to here
    # every key of tiles below this one is visible to every row (padding rows see finite junk)
    unmasked_hi = (context + local_block * BLOCK_Q + 1) // TILE_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    words = tl.arange(0, WORDS)
    bias = _nibble_bias(dtype)  # _unpack hands out bias + nibble: folded into the zero points
    cols = tl.arange(0, TILE_N)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    # the block-table entries of a tile are loaded one tile ahead and V is issued with K, so a
    # tile waits on one memory round trip, not three (offline sm_90: 255 regs + 32 B of stack ->
    # 237 regs for the 1-warp decode tile). PREFETCH_KV: a tile's K/V words and scales are
    # loaded one tile ahead too (the block table two ahead), so their round trip overlaps the
    # previous tile's math: a 1-warp program has few neighbours on its SM to hide it
    next_page = tl.load(bt_row + (tile_lo * TILE_N + cols) // PAGE, mask=tile_lo * TILE_N + cols < kv_stop,
                        other=0)
    if PREFETCH_KV:
        segment_stop = tl.minimum(kv_stop, tile_hi * TILE_N)  # no prefetch past this program's keys
        key_pos = tile_lo * TILE_N + cols
        (k_next, ks_next, kz_next, v_next, vs_next, vz_next) = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, next_page, key_pos, key_pos < segment_stop, kv_head,
            words, stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot, stride_vc_head,
            stride_ks_blk, stride_ks_slot, stride_ks_head, stride_vs_blk, stride_vs_slot, stride_vs_head,
            PAGE, CACHE_OFFSETS_INT32)
        next_page = tl.load(bt_row + (key_pos + TILE_N) // PAGE, mask=key_pos + TILE_N < segment_stop, other=0)
    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_N + cols
        key_ok = key_pos < kv_stop
        if PREFETCH_KV:
            k_words, k_scale, k_zero = k_next, ks_next, kz_next
            v_words, v_scale, v_zero = v_next, vs_next, vz_next
            ahead = key_pos + TILE_N
            (k_next, ks_next, kz_next, v_next, vs_next, vz_next) = _load_kv_tile(
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, next_page, ahead, ahead < segment_stop, kv_head,
                words, stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot,
                stride_vc_head, stride_ks_blk, stride_ks_slot, stride_ks_head, stride_vs_blk, stride_vs_slot,
                stride_vs_head, PAGE, CACHE_OFFSETS_INT32)
            next_page = tl.load(bt_row + (ahead + TILE_N) // PAGE, mask=ahead + TILE_N < segment_stop, other=0)
        else:
            (k_words, k_scale, k_zero, v_words, v_scale, v_zero) = _load_kv_tile(
                k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, next_page, key_pos, key_ok, kv_head,
                words, stride_kc_blk, stride_kc_slot, stride_kc_head, stride_vc_blk, stride_vc_slot,
                stride_vc_head, stride_ks_blk, stride_ks_slot, stride_ks_head, stride_vs_blk, stride_vs_slot,
                stride_vs_head, PAGE, CACHE_OFFSETS_INT32)
            next_page = tl.load(bt_row + (key_pos + TILE_N) // PAGE, mask=key_pos + TILE_N < kv_stop, other=0)
        # tiles below the causal edge of the block's first query (all but a decode's last) skip
        # the visibility mask: ~7% of the decode loop's instructions (offline sm_90)
        if PER_SEQUENCE and tile < unmasked_hi:  # (q-block launches: one body, half the JIT time)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_sum, k_words, k_scale, k_zero, v_words, v_scale, v_zero,
                                         key_pos, key_ok, q_abs, row_ok, bias, qk_scale_log2, dtype, TILE_N,
                                         HEAD_DIM, FP32_DOTS, PRECISION, False)
        else:
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_sum, k_words, k_scale, k_zero, v_words, v_scale, v_zero,
                                         key_pos, key_ok, q_abs, row_ok, bias, qk_scale_log2, dtype, TILE_N,
                                         HEAD_DIM, FP32_DOTS, PRECISION, True)

    token = (q_start + q_pos).to(tl.int64)
    if NUM_SEGMENTS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        at = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(segm_acc_ptr + at[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(segm_max_ptr + at, m_i, mask=row_ok)
        tl.store(segm_sum_ptr + at, l_i, mask=row_ok)


@triton.jit
def _combine_segments(out_ptr, segm_acc_ptr, segm_max_ptr, segm_sum_ptr, cu_q_ptr,
                      stride_o_tok, stride_o_head, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      NUM_SEGMENTS: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Merge the per-segment softmax partials of one sequence's (at most ``BLOCK_Q``) queries
    of one head; segments that saw no key carry m = -inf. Other sequences are not touched."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if q_len > BLOCK_Q:
        return
    segs = tl.arange(0, NUM_SEGMENTS)
    dims = tl.arange(0, HEAD_DIM)
    for i in range(q_len):
        token = (q_start + i).to(tl.int64)
        base = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS
        m = tl.load(segm_max_ptr + base + segs)
        m_all = tl.max(m, axis=0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_all))
        denom = tl.sum(tl.load(segm_sum_ptr + base + segs) * w, axis=0)
        acc = tl.load(segm_acc_ptr + (base + segs)[:, None] * HEAD_DIM + dims[None, :])
        out = tl.sum(acc * w[:, None], axis=0) / denom
        tl.store(out_ptr + token * stride_o_tok + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _dequantize_sequences_kernel(
    k_out_ptr, v_out_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
    block_table_ptr, seq_ids_ptr, cu_k_ptr,
    stride_out_tok, stride_out_head,
    stride_kc_blk, stride_kc_slot, stride_kc_head,
    stride_vc_blk, stride_vc_slot, stride_vc_head,
    stride_ks_blk, stride_ks_slot, stride_ks_head,
    stride_vs_blk, stride_vs_slot, stride_vs_head,
    stride_bt,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Keys and values ``BLOCK_T * pid(1) ..`` of KV head ``pid(2)`` of sequence ``seq_ids[pid(0)]``,
    dequantized (``(q - zp) * scale`` in fp32, then rounded) to rows ``cu_k[seq] ..`` of the outputs."""
    seq = tl.load(seq_ids_ptr + tl.program_id(0))
    kv_head = tl.program_id(2)
    start = tl.load(cu_k_ptr + seq)
    n = tl.load(cu_k_ptr + seq + 1) - start
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = pos < n
    page = tl.load(block_table_ptr + seq.to(tl.int64) * stride_bt + pos // PAGE, mask=ok, other=0).to(tl.int64)
    slot = pos % PAGE
    words = tl.arange(0, HEAD_DIM // 8)
    at = (start + pos).to(tl.int64)[:, None] * stride_out_tok + kv_head * stride_out_head \
        + tl.arange(0, HEAD_DIM)[None, :]
    _store_dequantized(k_out_ptr + at, k_cache_ptr, k_scale_ptr, page, slot, kv_head, ok, words,
                       stride_kc_blk, stride_kc_slot, stride_kc_head, stride_ks_blk, stride_ks_slot, stride_ks_head,
                       BLOCK_T, HEAD_DIM)
    _store_dequantized(v_out_ptr + at, v_cache_ptr, v_scale_ptr, page, slot, kv_head, ok, words,
                       stride_vc_blk, stride_vc_slot, stride_vc_head, stride_vs_blk, stride_vs_slot, stride_vs_head,
                       BLOCK_T, HEAD_DIM)


@triton.jit
def _store_dequantized(out_ptrs, words_ptr, scale_ptr, page, slot, kv_head, ok, words,
                       stride_blk, stride_slot, stride_head, stride_s_blk, stride_s_slot, stride_s_head,
                       BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    w, scale, zero = _load_tile(words_ptr, scale_ptr, page, slot, kv_head, ok, words,
                                stride_blk, stride_slot, stride_head, stride_s_blk, stride_s_slot, stride_s_head)
    # in cache order (dim 8w + i = bits 4i of word w), so each lane stores 8 consecutive dims
    # (_unpack's logical order scattered the stores: 0.26 ms for 8 x 1024 tokens on an H200)
    n = (w[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    x = (tl.reshape(n, (BLOCK_T, HEAD_DIM)).to(tl.float32) - zero[:, None]) * scale[:, None]
    tl.store(out_ptrs, x.to(out_ptrs.dtype.element_ty), mask=ok[:, None])


@dataclass(frozen=True)
class LaunchPlan:
    """Tile shape of one launch; chosen on the host from ints vLLM's metadata already holds.

    ``block_m`` rows (queries x query heads of one KV head) may be fewer than an MMA's 16:
    Triton pads the dot, and the softmax and accumulator then hold only the real rows (a
    1-token decode of 4 query heads: 4 rows; H200 decode of 512 sequences 0.407 ms vs 0.432
    with 16 rows). ``prefetch_kv``: the next tile's K/V loads are issued before the current
    tile's math (0.432 vs 0.636 ms at 16 rows), a register-resident alternative to Triton's
    cp.async staging (``num_stages`` > 1); the sweep does not combine the two.
    """

    block_m: int
    tile_n: int
    num_segments: int
    num_warps: int
    num_stages: int
    prefetch_kv: bool = False  # K/V loads one tile ahead, in registers (the kernel's PREFETCH_KV)

    def __post_init__(self) -> None:
        for name in ("block_m", "tile_n", "num_segments"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchPlan.{name} must be a power of two, got {v}")


@dataclass(frozen=True)
class AttentionPlan:
    """Two launches: ``decode`` per sequence for sequences of at most ``decode.block_m / qpkv``
    queries, ``prefill`` over q blocks for the longer ones (None: the step has none)."""

    decode: LaunchPlan
    prefill: LaunchPlan | None

    def decode_queries(self, qpkv: int) -> int:
        """Sequences with at most this many queries go to the per-sequence decode launch."""
        return self.decode.block_m // qpkv


def decode_plan_override() -> LaunchPlan | None:
    """``RUQUANT_INT4_KV_DECODE_PLAN=rows,keys,warps,stages[,prefetch]``: the big-batch decode tile.

    For timing a candidate from the kernel sweep inside the engine in the same GPU lease,
    without a code change (``scripts/gpu_session.sh kv4serve``); unset, the measured default.
    """
    raw = os.environ.get(DECODE_PLAN_ENV, "").strip()
    if not raw:
        return None
    try:
        fields = [int(x) for x in raw.split(",")]
        if len(fields) not in (4, 5):
            raise ValueError
    except ValueError:
        raise ValueError(f"{DECODE_PLAN_ENV}={raw!r}: expected rows,keys,warps,stages[,prefetch], "
                         "e.g. 16,32,1,1 or 4,32,2,1,1") from None
    rows, keys, warps, stages, *prefetch = fields
    return LaunchPlan(rows, keys, 1, warps, stages, prefetch_kv=bool(prefetch and prefetch[0]))


def _key_segments(pairs: int) -> int:
    """1 from ``SPLIT_KEYS_BELOW_PAIRS`` (sequence, KV head) pairs up; below, the power of two
    (2..``MAX_KEY_SEGMENTS``) of segments that gives at most ~``DECODE_PROGRAMS_TARGET`` programs."""
    if pairs >= SPLIT_KEYS_BELOW_PAIRS:
        return 1
    fill = 1 << ((DECODE_PROGRAMS_TARGET // max(pairs, 1)).bit_length() - 1)
    return min(MAX_KEY_SEGMENTS, max(2, fill))


def plan_launch(max_query_len: int, num_seqs: int, num_kv_heads: int, qpkv: int) -> AttentionPlan:
    """Decode tiles of all query heads of one KV head, 64-128 rows for prefill chunks.

    Decodes split the keys into segments when the batch has fewer than 256 (sequence, KV
    head) pairs. Only batch shape decides, never sequence lengths: a CUDA graph captured for a
    batch replays its plan, and every plan is correct for any lengths. ``max_query_len`` is
    part of that shape: vLLM captures uniform decode batches (one query, or one plus the
    speculative tokens) with it fixed.
    """
    # shapes: the fastest of sweeps on an H200 (benchmarks/kv4_attention.py, 2026-11-30): one
    # warp x 32 keys, one row per query head (Triton pads the MMA), K/V prefetched a tile ahead
    # (b256/b512: 0.189/0.407 ms vs 0.297/0.636 with 16 rows unprefetched; FA3 on a bf16 cache
    # 0.312/0.655). Small batches split the keys into enough segments for ~1024 programs
    # (CUDA-graph replay, b1 @2048: 0.008 ms at 64 segments vs 0.030 with the former 16-row,
    # 4-segment tile, FA3 0.012; b16 @1280: 0.019 at 8 segments vs 0.026, FA3 0.030)
    # rows: all query heads of a KV head for one query (4 at least); a step of speculative
    # decodes only (a few queries per sequence, up to 16 rows) keeps them per sequence too
    queries = max_query_len if max_query_len * qpkv <= 16 else 1
    rows = triton.next_power_of_2(max(4, qpkv * queries))
    pairs = num_seqs * num_kv_heads
    override = decode_plan_override()
    if pairs >= SPLIT_KEYS_BELOW_PAIRS and override is not None:
        decode = override
    else:  # one tile for every batch size; small batches split the keys
        decode = LaunchPlan(rows, 32, _key_segments(pairs), 1, 1, prefetch_kv=True)
    if max_query_len <= AttentionPlan(decode, None).decode_queries(qpkv):
        return AttentionPlan(decode, None)
    big = max(triton.next_power_of_2(max(qpkv, 16)), 128 if max_query_len * qpkv >= 512 else 64)
    return AttentionPlan(decode, LaunchPlan(big, 32, 1, 8 if big >= 128 else 4, 2))


def paged_int4_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         k_scales: torch.Tensor, v_scales: torch.Tensor, out: torch.Tensor, *,
                         cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                         max_query_len: int, softmax_scale: float, plan: AttentionPlan | None = None
                         ) -> torch.Tensor:
    """Causal attention of ``q`` (tokens, heads, d) over the int4 cache, written into ``out``.

    ``cu_seqlens_q`` (num_seqs + 1) int32 and ``seq_lens`` (num_seqs) give each sequence's
    queries and total length; its queries are the last ``q_len`` of its keys (already in the
    cache). Rows of ``out`` past ``cu_seqlens_q[-1]`` are left alone.
    """
    num_tokens, num_heads, d = q.shape
    num_kv_heads = key_cache.shape[2]
    # vLLM's K/V views are d/2 nibble bytes + 4 bytes of scale per slot: read the first d/2
    if key_cache.dtype != torch.uint8 or key_cache.shape[3] * 2 < d or d & (d - 1) or d < 32:
        raise ValueError(f"int4 KV attention: key cache {tuple(key_cache.shape)} {key_cache.dtype} "
                         f"does not hold packed nibbles of a power-of-two head_dim {d} >= 32")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("int4 KV attention needs head_dim contiguous in q and out")
    # int32 views: vLLM's slots are 4-byte aligned (d/2 data + 4 scale bytes per half); torch
    # refuses the view (with its reason) for a layout that is not
    k_words, v_words = key_cache.view(torch.int32), value_cache.view(torch.int32)
    qpkv = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    # cache addresses in 32-bit arithmetic when every word of the caches' storage is within
    # 2^31 of their start (64-bit page * stride math was ~15-35% of the decode loop's SASS)
    int32_offsets = all(c.untyped_storage().nbytes() // 4 < INT32_OFFSET_LIMIT for c in (key_cache, value_cache))
    plan = plan or plan_launch(max_query_len, num_seqs, num_kv_heads, qpkv)
    for lp in (plan.decode, plan.prefill):
        if lp is not None and lp.block_m < qpkv:
            raise ValueError(f"a {lp.block_m}-row tile cannot hold the {qpkv} query heads of a KV head")
    fp32 = q.dtype == torch.float32

    def launch(lp: LaunchPlan, num_q_programs: int, per_sequence: bool, skip_upto: int) -> None:
        block_q = lp.block_m // qpkv
        segments = lp.num_segments if per_sequence else 1  # q-block launches: whole key range each
        if segments > 1:
            segm_acc = torch.empty(num_tokens * num_heads * segments, d, dtype=torch.float32, device=q.device)
            segm_max = torch.empty(num_tokens * num_heads * segments, dtype=torch.float32, device=q.device)
            segm_sum = torch.empty_like(segm_max)
        else:
            segm_acc = segm_max = segm_sum = out
        _int4_kv_attention_kernel[(num_q_programs, num_kv_heads, segments)](
            out, q, k_words, v_words, k_scales, v_scales, block_table, seq_lens, cu_seqlens_q,
            segm_acc, segm_max, segm_sum, num_seqs, softmax_scale * _LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            *k_words.stride()[:3], *v_words.stride()[:3], *k_scales.stride(), *v_scales.stride(),
            block_table.stride(0),
            NUM_Q_HEADS=num_heads, QPKV=qpkv, HEAD_DIM=d, PAGE=key_cache.shape[1],
            BLOCK_Q=block_q, BLOCK_M=lp.block_m, TILE_N=lp.tile_n, NUM_SEGMENTS=segments,
            FP32_DOTS=_INTERPRET or fp32, PRECISION="ieee" if fp32 else None,
            PER_SEQUENCE=per_sequence, SKIP_Q_LEN_UPTO=skip_upto, CACHE_OFFSETS_INT32=int32_offsets,
            PREFETCH_KV=lp.prefetch_kv,
            num_warps=lp.num_warps, num_stages=lp.num_stages,
        )
        if segments > 1:
            _combine_segments[(num_seqs, num_heads)](
                out, segm_acc, segm_max, segm_sum, cu_seqlens_q, out.stride(0), out.stride(1),
                NUM_Q_HEADS=num_heads, HEAD_DIM=d, NUM_SEGMENTS=segments, BLOCK_Q=block_q)

    # decodes (<= the decode tile's queries): one program per sequence; the rest in q blocks
    launch(plan.decode, num_seqs, per_sequence=True, skip_upto=0)
    if plan.prefill is not None:
        launch(plan.prefill, num_tokens // (plan.prefill.block_m // qpkv) + num_seqs, per_sequence=False,
               skip_upto=plan.decode_queries(qpkv))
    return out


def dequantize_sequences(key_cache: torch.Tensor, value_cache: torch.Tensor, k_scales: torch.Tensor,
                         v_scales: torch.Tensor, *, block_table: torch.Tensor, seq_ids: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, total_keys: int, max_keys: int, head_dim: int,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of sequences ``seq_ids`` as contiguous ``(total_keys, kv_heads, d)`` tensors.

    Sequence ``s`` takes rows ``cu_seqlens_k[s] : cu_seqlens_k[s + 1]`` (its first keys, in
    order); rows of other sequences are left unwritten. Why: a prefill chunk attends to
    whole sequences, and FlashAttention on their dequantized K/V outruns any int4 prefill tile
    (``vllm_ruquant/attention.py``); the values are ``reference.dequantize_kv_int4``'s.
    """
    d, kv_heads = head_dim, key_cache.shape[2]
    k = torch.empty(total_keys, kv_heads, d, dtype=dtype, device=key_cache.device)
    v = torch.empty_like(k)
    if seq_ids.numel() == 0 or max_keys == 0:
        return k, v
    k_words, v_words = key_cache.view(torch.int32), value_cache.view(torch.int32)
    block_t = 64
    _dequantize_sequences_kernel[(seq_ids.numel(), triton.cdiv(max_keys, block_t), kv_heads)](
        k, v, k_words, v_words, k_scales, v_scales, block_table, seq_ids, cu_seqlens_k,
        k.stride(0), k.stride(1), *k_words.stride()[:3], *v_words.stride()[:3],
        *k_scales.stride(), *v_scales.stride(), block_table.stride(0),
        HEAD_DIM=d, PAGE=key_cache.shape[1], BLOCK_T=block_t,
    )
    return k, v
