"""``kernels.int4_kv_attention`` against ``reference.paged_int4_attention``, in Triton's CPU interpreter.

The batches mix what a vLLM step holds: a fresh prefill, decodes, a chunked prefill whose
earlier chunks are already cached, sequences ending mid-page, pages scattered over the cache
and a padded tail of rows that must stay untouched. Every launch plan (decode tiles, prefill
tiles, split keys) must give the same answer. The ``gpu`` tests run the same comparison
compiled (bf16 tensor-core dots) on the Llama-3-8B head shape.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import int4_kv_attention as kernel

PAGE, KV_HEADS, D = 16, 2, 64


def _random_cache(generator: torch.Generator, num_blocks: int, kv_heads: int = KV_HEADS, d: int = D,
                  device: str = "cpu") -> tuple[torch.Tensor, ...]:
    def scales() -> torch.Tensor:
        s = torch.rand(num_blocks, PAGE, kv_heads, generator=generator) * 0.2 + 0.01
        zp = torch.randint(0, 16, (num_blocks, PAGE, kv_heads), generator=generator, dtype=torch.int32)
        return ((s.view(torch.int32) & -16) | zp).view(torch.float32).to(device)

    def nibbles() -> torch.Tensor:
        return torch.randint(0, 256, (num_blocks, PAGE, kv_heads, d // 2), dtype=torch.uint8,
                             generator=generator).to(device)

    return nibbles(), nibbles(), scales(), scales()


def _batch(generator: torch.Generator, specs: list[tuple[int, int]], num_blocks: int, device: str = "cpu") -> dict:
    """(cached context, new queries) per sequence -> vLLM-style metadata over shuffled pages."""
    pages = torch.randperm(num_blocks, generator=generator)
    width = max(-(-(c + n) // PAGE) for c, n in specs) + 2
    table = torch.full((len(specs), width), 10_000, dtype=torch.int32)  # garbage past each sequence
    used = 0
    for i, (c, n) in enumerate(specs):
        k = -(-(c + n) // PAGE)
        table[i, :k] = pages[used:used + k]
        used += k
    q_lens = torch.tensor([n for _, n in specs])
    return {"cu_seqlens_q": torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int().to(device),
            "seq_lens": torch.tensor([c + n for c, n in specs], dtype=torch.int32).to(device),
            "block_table": table.to(device)}


MIXED = [(0, 37), (50, 1), (5, 20), (130, 3), (0, 1), (16, 16)]

def _plan(decode: tuple[int, int, int], prefill: tuple[int, int, int]) -> kernel.AttentionPlan:
    return kernel.AttentionPlan(kernel.LaunchPlan(*decode, 4, 2),
                                kernel.LaunchPlan(*prefill, 4, 2))


# (rows, keys per tile, key segments): decodes per sequence, the rest in q blocks
PLANS = {"16-row tiles": _plan((16, 64, 1), (16, 64, 1)), "prefill tiles": _plan((16, 32, 1), (64, 32, 1)),
         "split keys": _plan((16, 16, 4), (32, 16, 1)), "32-row decodes": _plan((32, 64, 2), (64, 64, 1)),
         "4-row decodes (MMA padded by Triton)": _plan((4, 32, 1), (16, 32, 1)),
         # K/V one tile ahead; with split keys a segment must not read into the next one's keys
         "prefetched K/V, split keys": kernel.AttentionPlan(kernel.LaunchPlan(16, 16, 4, 4, 1, prefetch_kv=True),
                                                            kernel.LaunchPlan(32, 16, 1, 4, 1, prefetch_kv=True)),
         "prefetched K/V, 4-row decodes": kernel.AttentionPlan(kernel.LaunchPlan(4, 32, 1, 1, 1, prefetch_kv=True),
                                                               kernel.LaunchPlan(64, 32, 1, 4, 1, prefetch_kv=True)),
         # batch-1 decodes split the keys finely: short sequences leave segments without a key
         "more key segments than tiles": kernel.AttentionPlan(kernel.LaunchPlan(4, 16, 16, 1, 1, prefetch_kv=True),
                                                              kernel.LaunchPlan(16, 16, 1, 4, 1))}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_a_mixed_batch(triton_interpreter, dtype, plan) -> None:
    _mixed_batch_matches_reference(dtype, plan)


def test_64_bit_cache_addresses(triton_interpreter, monkeypatch) -> None:
    """Caches of 2^31 words or more address in int64 (here forced on a small cache)."""
    monkeypatch.setattr(kernel, "INT32_OFFSET_LIMIT", 0)
    _mixed_batch_matches_reference(torch.float32, PLANS["split keys"])


def _mixed_batch_matches_reference(dtype: torch.dtype, plan: kernel.AttentionPlan) -> None:
    g = torch.Generator().manual_seed(0)
    caches = _random_cache(g, 64)
    md = _batch(g, MIXED, 64)
    tokens, heads = int(md["cu_seqlens_q"][-1]), KV_HEADS * 4
    q = torch.randn(tokens + 3, heads, D, generator=g).to(dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype)  # 3 padding rows, poisoned
    kernel.paged_int4_attention(q, *caches, out, **md, max_query_len=37, softmax_scale=D ** -0.5, plan=plan)
    want = ref.paged_int4_attention(q[:tokens], *caches, **md, softmax_scale=D ** -0.5)
    # fp32: exact products, only summation order differs; bf16/fp16: P and the output rounded
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:tokens].float(), want, atol=tol, rtol=tol)
    assert torch.isnan(out[tokens:]).all()


def test_default_plans() -> None:
    plan = kernel.plan_launch
    assert plan(1024, 8, 8, 4).prefill.block_m == 128  # prefill chunk: big tiles
    assert plan(5, 8, 8, 4).prefill.block_m == 64
    assert plan(4, 8, 8, 4).prefill is None  # 4 queries x 4 heads fit the decode tile
    assert plan(1, 512, 8, 4).decode.num_segments == 1  # big decode batch: enough programs
    assert plan(1, 1, 8, 4).decode.num_segments > 1  # batch-1 decode: split the keys
    assert plan(1, 1, 8, 32).decode.block_m == 32  # all 32 query heads of one KV head in one tile
    for num_seqs in (1, 3, 16, 31):  # small batches: ~1024 programs, a power of two of segments
        lp = plan(1, num_seqs, 8, 4).decode
        programs = num_seqs * 8 * lp.num_segments
        assert lp.num_segments == kernel.MAX_KEY_SEGMENTS or 512 < programs <= 1024, (num_seqs, lp)
    # a step of speculative decodes (4 queries x 4 heads) stays per sequence, big batch or small
    assert plan(4, 512, 8, 4).prefill is None and plan(4, 512, 8, 4).decode.block_m == 16
    assert plan(4, 2, 8, 4).prefill is None
    # a prefill chunk in the step: the decode tile holds one query, the rest go to q blocks
    assert plan(1024, 512, 8, 4).decode.block_m == 4


def test_decode_plan_override_from_the_environment(monkeypatch) -> None:
    """``RUQUANT_INT4_KV_DECODE_PLAN`` swaps the big-batch decode tile (a sweep candidate timed in
    the engine); its rows set which steps are decode-only; small batches keep split keys."""
    monkeypatch.setenv(kernel.DECODE_PLAN_ENV, "4,32,2,1")
    plan = kernel.plan_launch
    assert plan(1, 512, 8, 4).decode == kernel.LaunchPlan(4, 32, 1, 2, 1)
    assert plan(1, 512, 8, 4).prefill is None
    assert plan(2, 512, 8, 4).prefill is not None  # 2 queries x 4 heads overflow a 4-row tile
    assert plan(1, 8, 8, 4).decode.num_segments > 1
    monkeypatch.setenv(kernel.DECODE_PLAN_ENV, "4,32,2,1,1")  # fifth field: K/V prefetched a tile ahead
    assert plan(1, 512, 8, 4).decode == kernel.LaunchPlan(4, 32, 1, 2, 1, prefetch_kv=True)
    for bad in ("4,32", "4,32,2,1,1,0", "4,32,two,1"):
        monkeypatch.setenv(kernel.DECODE_PLAN_ENV, bad)
        with pytest.raises(ValueError, match="rows,keys,warps,stages"):
            plan(1, 512, 8, 4)


def test_cache_written_by_the_reference_reads_back_as_the_simulation(triton_interpreter) -> None:
    """Keys quantized by ``reference.quantize_kv_int4`` into pages, attended by the kernel, equal
    attention over ``fake_quantize_kv_int4`` keys/values: the two halves agree on the format."""
    g = torch.Generator().manual_seed(1)
    t, heads = 40, 4
    k = torch.randn(t, KV_HEADS, D, generator=g)
    v = torch.randn(t, KV_HEADS, D, generator=g)
    q = torch.randn(t, heads, D, generator=g)
    blocks = torch.tensor([3, 0, 2], dtype=torch.int32)  # 40 tokens -> 3 pages, out of order
    kc = torch.zeros(4, PAGE, KV_HEADS, D // 2, dtype=torch.uint8)
    vc, ks, vs = kc.clone(), torch.zeros(4, PAGE, KV_HEADS), torch.zeros(4, PAGE, KV_HEADS)
    pos = torch.arange(t)
    for cache, scales, x in ((kc, ks, k), (vc, vs, v)):
        cache[blocks[pos // PAGE].long(), pos % PAGE], scales[blocks[pos // PAGE].long(), pos % PAGE] = \
            ref.quantize_kv_int4(x)
    out = torch.empty(t, heads, D)
    kernel.paged_int4_attention(q, kc, vc, ks, vs, out, cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32),
                                seq_lens=torch.tensor([t], dtype=torch.int32), block_table=blocks[None],
                                max_query_len=t, softmax_scale=D ** -0.5)
    want = ref.causal_gqa_attention(q, ref.fake_quantize_kv_int4(k), ref.fake_quantize_kv_int4(v), D ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_bad_caches_are_refused() -> None:
    q = torch.zeros(4, 4, D)
    cache = torch.zeros(2, PAGE, KV_HEADS, D // 2, dtype=torch.uint8)
    scales = torch.zeros(2, PAGE, KV_HEADS)
    md = {"cu_seqlens_q": torch.tensor([0, 4], dtype=torch.int32), "seq_lens": torch.tensor([4], dtype=torch.int32),
          "block_table": torch.zeros(1, 2, dtype=torch.int32), "max_query_len": 4, "softmax_scale": 1.0}
    with pytest.raises(ValueError, match="packed nibbles"):
        kernel.paged_int4_attention(q, cache.float(), cache, scales, scales, q.clone(), **md)
    with pytest.raises(ValueError, match="packed nibbles"):  # 16 bytes cannot hold 64 nibbles
        kernel.paged_int4_attention(q, cache[..., :16], cache, scales, scales, q.clone(), **md)
    one_row = kernel.AttentionPlan(kernel.LaunchPlan(1, 16, 1, 1, 1), None)
    with pytest.raises(ValueError, match="cannot hold the 2 query heads"):
        kernel.paged_int4_attention(q, cache, cache, scales, scales, q.clone(), **md, plan=one_row)
    with pytest.raises(ValueError, match="not a multiple"):
        kernel.paged_int4_attention(torch.zeros(4, 3, D), cache, cache, scales, scales, torch.zeros(4, 3, D), **md)


GPU_MIXED = [(0, 1024), (1151, 1), (700, 300), (0, 1), (2047, 1), (31, 17)] + [(400, 1)] * 40
GPU_BATCHES = {  # (cached keys, new queries) per sequence
    "mixed": GPU_MIXED,
    "decode": [s for s in GPU_MIXED if s[1] == 1],  # 43 x 8 KV heads: one key range per program
    "small decode": [(2047, 1), (0, 1), (1151, 1)],  # 24 pairs: keys split in 32 segments
    "speculative": [(2044, 4), (0, 4), (1148, 4), (13, 3)],  # 4 queries x 4 heads: 16-row decode tiles
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flip_prefetch", [False, True], ids=["default", "prefetch-flipped"])
@pytest.mark.parametrize("batch", GPU_BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_on_llama_heads(dtype, batch, flip_prefetch) -> None:
    """32 query / 8 KV heads of 128 dims; default plans, and the same with the K/V prefetch
    switched (on where the default has it off and off where on), so both loops run compiled."""
    g = torch.Generator().manual_seed(0)
    specs = GPU_BATCHES[batch]
    num_blocks = sum(-(-(c + n) // PAGE) for c, n in specs)
    caches = _random_cache(g, num_blocks, kv_heads=8, d=128, device="cuda")
    md = _batch(g, specs, num_blocks, device="cuda")
    tokens = int(md["cu_seqlens_q"][-1])
    q = torch.randn(tokens + 5, 32, 128, generator=g).to(dtype).cuda()
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    max_q = max(n for _, n in specs)
    plan = kernel.plan_launch(max_q, len(specs), 8, 4)
    if flip_prefetch:  # prefetching replaces cp.async staging: one stage
        plan = kernel.AttentionPlan(*(lp and dataclasses.replace(lp, prefetch_kv=not lp.prefetch_kv, num_stages=1)
                                      for lp in (plan.decode, plan.prefill)))
    kernel.paged_int4_attention(q, *caches, out, **md, max_query_len=max_q, softmax_scale=128 ** -0.5, plan=plan)
    want = ref.paged_int4_attention(q[:tokens].cpu(), *(c.cpu() for c in caches),
                                    **{k: v.cpu() for k, v in md.items()}, softmax_scale=128 ** -0.5)
    err = (out[:tokens].float().cpu() - want).abs()
    print(f"\n{dtype} {batch} {plan}: max |ours - reference| {err.max():.2e}, "
          f"median {err.median():.2e}")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:tokens].float().cpu(), want, atol=tol, rtol=tol)
    assert torch.isnan(out[tokens:]).all()


def test_vllm_slot_layout_with_scale_bytes(triton_interpreter) -> None:
    """vLLM's views: per slot ``d/2`` nibble bytes then the 4-byte scale, K and V interleaved
    in one ``(blocks, kv_heads, page, 2 (d/2 + 4))`` buffer; the kernel reads the nibbles only."""
    g = torch.Generator().manual_seed(2)
    half = D // 2
    raw = torch.zeros(8, KV_HEADS, PAGE, 2 * (half + 4), dtype=torch.uint8)
    k, v, ks, vs = ref.int4_cache_views(raw, D)
    dense = _random_cache(g, 8)
    k[..., :half], v[..., :half], ks[:], vs[:] = dense
    # the views address the bytes the layout says: K's nibbles at 0, K's scale at d/2, V's after
    slot = raw[3, 1, 5]
    assert torch.equal(slot[:half], dense[0][3, 5, 1]) and torch.equal(slot[half + 4:2 * half + 4], dense[1][3, 5, 1])
    assert slot[half:half + 4].view(torch.float32) == dense[2][3, 5, 1]
    assert slot[2 * half + 4:].view(torch.float32) == dense[3][3, 5, 1]
    with pytest.raises(ValueError, match="not an int4 page"):
        ref.int4_cache_views(raw[..., :-4], D)
    md = _batch(g, [(20, 5), (0, 9)], 8)
    q = torch.randn(14, 4 * KV_HEADS, D, generator=g)
    got = kernel.paged_int4_attention(q, k, v, ks, vs, torch.empty_like(q), **md, max_query_len=9,
                                      softmax_scale=D ** -0.5)
    want = ref.paged_int4_attention(q, *dense, **md, softmax_scale=D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_sequences_are_the_reference_values(triton_interpreter, dtype) -> None:
    """The FlashAttention prefill's K/V: chosen sequences' keys in order, ``dequantize_kv_int4``'s
    values rounded once to ``dtype`` (the interpreter's bf16 cast truncates: one ulp allowed)."""
    g = torch.Generator().manual_seed(3)
    caches = _random_cache(g, 24)
    specs = [(70, 3), (0, 1), (16, 20), (5, 1)]
    md = _batch(g, specs, 24)
    seq_ids = torch.tensor([0, 2], dtype=torch.int32)
    lens = [73, 0, 36, 0]  # the chosen sequences' keys; none for the others
    cu_k = torch.tensor([0, 73, 73, 109, 109], dtype=torch.int32)
    k, v = kernel.dequantize_sequences(*caches, block_table=md["block_table"], seq_ids=seq_ids, cu_seqlens_k=cu_k,
                                       total_keys=109, max_keys=73, head_dim=D, dtype=dtype)
    for got, (packed, scales) in ((k, caches[0::2]), (v, caches[1::2])):
        for i, n in enumerate(lens):
            pos = torch.arange(n)
            pages = md["block_table"][i, pos // PAGE].long()
            want = ref.dequantize_kv_int4(packed[pages, pos % PAGE], scales[pages, pos % PAGE]).to(dtype)
            torch.testing.assert_close(got[int(cu_k[i]):int(cu_k[i]) + n], want, atol=0,
                                       rtol=0 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_served_prefill_path_matches_reference_on_llama_heads() -> None:
    """What the engine runs for a mixed step on a GPU: the prefill sequences through vLLM's
    FlashAttention on their dequantized K/V, then the decode launch; bf16, Llama-3-8B heads."""
    from vllm_ruquant import attention
    if attention._FLASH_ATTN is None:
        pytest.fail("vLLM on this GPU offers no FlashAttention: the served prefill path is off")
    g = torch.Generator().manual_seed(0)
    num_blocks = sum(-(-(c + n) // PAGE) for c, n in GPU_MIXED)
    caches = _random_cache(g, num_blocks, kv_heads=8, d=128, device="cuda")
    md = _batch(g, GPU_MIXED, num_blocks, device="cuda")
    tokens, max_q = int(md["cu_seqlens_q"][-1]), max(n for _, n in GPU_MIXED)
    q = torch.randn(tokens, 32, 128, generator=g).to(torch.bfloat16).cuda()
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    plan = kernel.plan_launch(max_q, len(GPU_MIXED), 8, 4)
    split = attention.PrefillSplit.of(md["cu_seqlens_q"], md["seq_lens"], plan.decode_queries(4))
    attention.attend_int4_cache(attention._FLASH_ATTN, q, *caches, out, plan=plan, split=split, **md,
                                    max_query_len=max_q, softmax_scale=128 ** -0.5)
    want = ref.paged_int4_attention(q.cpu(), *(c.cpu() for c in caches), **{k: v.cpu() for k, v in md.items()},
                                    softmax_scale=128 ** -0.5)
    err = (out.float().cpu() - want).abs()
    print(f"\nserved (FlashAttention prefill + int4 decodes): {split.seq_ids.numel()} prefill sequences, "
          f"max |served - reference| {err.max():.2e}, median {err.median():.2e}")
    torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)
