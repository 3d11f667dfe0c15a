"""``OfflineValueInt4Impl``'s wiring on the CPU: vLLM's write kernel replaced by the reference
writer, our attention kernel run for real in Triton's CPU interpreter.

What is tested is our code: K rotated and V not on write, Q rotated on read, the softmax
scale left alone, the output written in place -- and that this equals the converter's
simulation; and that features our kernel lacks go to vLLM's own kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_ruquant import attention
from vllm_ruquant import reference as ref

PAGE = 16


class ReferenceCacheWriter:
    """Writes what vLLM's int4 write kernel writes (``reference.quantize_kv_int4``) into paged caches."""

    def __init__(self, num_blocks: int, kv_heads: int, d: int) -> None:
        self.k = torch.zeros(num_blocks, PAGE, kv_heads, d // 2, dtype=torch.uint8)
        self.v = torch.zeros_like(self.k)
        self.k_scales = torch.zeros(num_blocks, PAGE, kv_heads)
        self.v_scales = torch.zeros_like(self.k_scales)
        self.write_args: dict = {}

    def run_reshape_kernel(self, kernel, *, key, value, slot_mapping, packing_factor, **_: object) -> None:  # noqa: ANN001
        assert packing_factor == 2
        self.write_args = {"key": key, "value": value}
        blocks, slots = slot_mapping // PAGE, slot_mapping % PAGE
        self.k[blocks, slots], self.k_scales[blocks, slots] = ref.quantize_kv_int4(key)
        self.v[blocks, slots], self.v_scales[blocks, slots] = ref.quantize_kv_int4(value)


def _impl(head_size: int, writer: ReferenceCacheWriter) -> attention.OfflineValueInt4Impl:
    impl = attention.OfflineValueInt4Impl.__new__(attention.OfflineValueInt4Impl)
    impl.head_size, impl.scale = head_size, head_size ** -0.5
    impl.sliding_window, impl.logits_soft_cap, impl.sinks = (-1, -1), 0.0, None
    impl.alibi_slopes, impl.use_alibi_sqrt = None, False
    impl._k_scale_cache, impl._v_scale_cache = writer.k_scales, writer.v_scales
    impl._pth_key_value_caches = lambda kv_cache: (writer.k, writer.v)
    return impl


def _metadata(t: int, blocks: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(use_cascade=False, num_actual_tokens=t,
                           query_start_loc=torch.tensor([0, t], dtype=torch.int32), max_query_len=t,
                           seq_lens=torch.tensor([t], dtype=torch.int32), block_table=blocks[None],
                           mm_prefix_range_tensor=None, seq_threshold_3D=None, num_par_softmax_segments=None,
                           softmax_segm_output=None, softmax_segm_max=None, softmax_segm_expsum=None)


def test_offline_value_impl_equals_the_simulation(monkeypatch, triton_interpreter) -> None:
    g = torch.Generator().manual_seed(0)
    t, heads, kv_heads, d = 21, 4, 2, 64
    writer = ReferenceCacheWriter(4, kv_heads, d)
    monkeypatch.setattr(attention.int4_ops, "_run_reshape_kernel", writer.run_reshape_kernel)
    monkeypatch.setattr(attention.int4_ops, "_launch_packed_attn", None)  # must not be used
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, kv_heads, d, generator=g)
    k[..., 7] *= 25  # an outlier key channel
    v = torch.randn(t, kv_heads, d, generator=g)
    blocks = torch.tensor([2, 0], dtype=torch.int32)
    impl = _impl(d, writer)
    slots = blocks[torch.arange(t) // PAGE].long() * PAGE + torch.arange(t) % PAGE
    impl.do_kv_cache_update(None, k, v, None, slots)
    assert torch.equal(writer.write_args["value"], v)  # V is not rotated online...
    torch.testing.assert_close(writer.write_args["key"], ref.hadamard_transform(k))  # ...K is
    output = torch.full((t + 3, heads, d), float("nan"))  # padded batch, poisoned
    assert impl.forward(None, q, k, v, None, _metadata(t, blocks), output) is output
    assert torch.isnan(output[t:]).all()  # rows past num_actual_tokens untouched
    ks, vs = ref.simulate_kv_cache(k, v, 4, value_rotated_offline=True)
    want = ref.causal_gqa_attention(q, ks, vs, d ** -0.5)
    torch.testing.assert_close(output[:t], want, atol=1e-5, rtol=1e-5)


def test_features_our_kernel_lacks_go_to_vllms_kernel(monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(attention.int4_ops, "_launch_packed_attn", lambda **kw: calls.append(kw))
    monkeypatch.setattr(attention.int4_kv_attention, "paged_int4_attention", None)  # must not be used
    t, d = 4, 64
    writer = ReferenceCacheWriter(1, 2, d)
    q = torch.randn(t, 4, d)
    for feature in ("alibi_slopes", "sinks", "logits_soft_cap", "sliding_window"):
        impl = _impl(d, writer)
        setattr(impl, feature, {"alibi_slopes": torch.ones(4), "sinks": torch.zeros(4),
                                "logits_soft_cap": 30.0, "sliding_window": (8, 0)}[feature])
        md = _metadata(t, torch.tensor([0], dtype=torch.int32))
        impl.forward(None, q, None, None, None, md, torch.empty(t, 4, d))
        assert len(calls) == 1, feature
        torch.testing.assert_close(calls.pop()["q"], ref.hadamard_transform(q))  # Q still rotated


def _torch_flash_attention(calls: list[dict]):  # noqa: ANN202
    """Stand-in for vLLM's ``flash_attn_varlen_func``: causal, bottom-right aligned, per sequence."""
    def flash(*, q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, softmax_scale, causal, out):  # noqa: ANN001
        assert causal
        calls.append({"cu_seqlens_k": cu_seqlens_k.clone(), "max_seqlen_k": max_seqlen_k, "k": k.clone()})
        for i in range(cu_seqlens_q.shape[0] - 1):
            qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
            ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
            if ks.stop == ks.start:
                out[qs] = 0
                continue
            out[qs] = ref.causal_gqa_attention(q[qs], k[ks], v[ks], softmax_scale).to(out.dtype)
    return flash


def test_prefill_sequences_go_to_flash_attention_on_dequantized_kv(monkeypatch, triton_interpreter) -> None:
    """A step with a fresh prefill, a later prefill chunk and a decode: the two prefills are
    attended by FlashAttention over their whole dequantized key ranges, the decode by our
    kernel; together they equal the kernel oracle."""
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, d = 4, 2, 64
    specs = [(0, 20), (30, 10), (40, 1)]  # (cached context, new queries)
    writer = ReferenceCacheWriter(12, kv_heads, d)
    monkeypatch.setattr(attention.int4_ops, "_run_reshape_kernel", writer.run_reshape_kernel)
    monkeypatch.setattr(attention.int4_ops, "_launch_packed_attn", None)  # must not be used
    calls: list[dict] = []
    monkeypatch.setattr(attention, "_FLASH_ATTN", _torch_flash_attention(calls))
    splits, split_of = [], attention.PrefillSplit.of
    monkeypatch.setattr(attention.PrefillSplit, "of", lambda *a: splits.append(a) or split_of(*a))
    impl = _impl(d, writer)
    table = torch.tensor([[5, 1, 0, 0], [2, 7, 9, 0], [3, 11, 4, 0]], dtype=torch.int32)
    for i, (c, n) in enumerate(specs):  # every key of every sequence, as earlier steps + this one wrote them
        pos = torch.arange(c + n)
        impl.do_kv_cache_update(None, torch.randn(c + n, kv_heads, d, generator=g),
                                torch.randn(c + n, kv_heads, d, generator=g), None,
                                table[i, pos // PAGE].long() * PAGE + pos % PAGE)
    q_lens = torch.tensor([n for _, n in specs])
    tokens = int(q_lens.sum())
    md = _metadata(tokens, table[0])
    md.query_start_loc = torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int()
    md.seq_lens = torch.tensor([c + n for c, n in specs], dtype=torch.int32)
    md.block_table, md.max_query_len = table, 20
    q = torch.randn(tokens, heads, d, generator=g).to(torch.bfloat16)
    output = torch.full((tokens, heads, d), float("nan"), dtype=torch.bfloat16)
    impl.forward(None, q, None, None, None, md, output)

    assert len(calls) == 1
    assert calls[0]["cu_seqlens_k"].tolist() == [0, 20, 60, 60]  # the decode gets no keys there
    assert md._ruquant_prefill_split.seq_ids.tolist() == [0, 1]  # kept for the step's other layers
    want = ref.paged_int4_attention(ref.hadamard_transform(q.float()).to(torch.bfloat16).float(),
                                    writer.k, writer.v, writer.k_scales, writer.v_scales,
                                    cu_seqlens_q=md.query_start_loc, seq_lens=md.seq_lens, block_table=table,
                                    softmax_scale=d ** -0.5)
    torch.testing.assert_close(output.float(), want, atol=3e-2, rtol=3e-2)
    impl.forward(None, q, None, None, None, md, output)  # second layer of the step: same split, no new copy
    assert len(calls) == 2 and calls[1]["cu_seqlens_k"].tolist() == [0, 20, 60, 60]
    assert len(splits) == 1


def test_flash_attention_prefill_is_only_taken_where_it_applies(monkeypatch) -> None:
    """FlashAttention needs bf16/fp16 and a prefill in the step; a scratch over the cap, or no
    FlashAttention at all (vLLM's CPU wheels), keeps the step on our int4 tiles."""
    writer = ReferenceCacheWriter(4, 2, 64)
    impl = _impl(64, writer)
    monkeypatch.setattr(attention, "_FLASH_ATTN", object())

    def split(max_query_len: int, dtype: torch.dtype):  # noqa: ANN202
        md = _metadata(40, torch.tensor([0, 1, 2], dtype=torch.int32))
        md.max_query_len = max_query_len
        q = torch.zeros(40, 4, 64, dtype=dtype)
        plan = attention.int4_kv_attention.plan_launch(max_query_len, 1, 2, 2)
        return impl._prefill_split(md, plan, q, kv_heads=2)

    got = split(40, torch.bfloat16)
    assert got is not None and got.seq_ids.tolist() == [0] and (got.total_keys, got.max_keys) == (40, 40)
    assert split(40, torch.float32) is None  # fp32 models: FlashAttention has no fp32
    assert split(1, torch.bfloat16) is None  # decode-only step
    monkeypatch.setattr(attention, "MAX_PREFILL_SCRATCH_BYTES", 40 * 2 * 64 * 2 * 2 - 1)
    assert split(40, torch.bfloat16) is None  # the bf16 K/V of 40 keys would not fit
    monkeypatch.setattr(attention, "_FLASH_ATTN", None)
    monkeypatch.setattr(attention, "MAX_PREFILL_SCRATCH_BYTES", 1 << 30)
    assert split(40, torch.bfloat16) is None
