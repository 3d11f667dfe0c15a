"""``OfflineValueInt4Impl``'s wiring on the CPU, around torch stand-ins for vLLM's two int4 kernels.

The Triton kernels themselves run only on CUDA (``test_kv4_gpu.py`` checks them against the
reference); here each is replaced by a torch double with the same keyword interface, so what
is tested is our code: K rotated and V not on write, Q rotated on read, the softmax scale
left alone, the output written in place -- and that this equals the converter's simulation.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_ruquant import reference as ref

kv4_attention = pytest.importorskip("vllm_ruquant.kernels.kv4_attention")


class FakeInt4Kernels:
    """Stores what the write kernel would (dequantized), attends over it like the read kernel."""

    def __init__(self) -> None:
        self.cache: dict[str, torch.Tensor] = {}
        self.write_args: dict = {}

    def run_reshape_kernel(self, kernel, *, key, value, slot_mapping, packing_factor, **caches) -> None:  # noqa: ANN001
        assert packing_factor == 2
        self.write_args = {"key": key, "value": value}
        self.cache["k"] = ref.fake_quantize_kv_int4(key.float())[slot_mapping]
        self.cache["v"] = ref.fake_quantize_kv_int4(value.float())[slot_mapping]

    def launch_packed_attn(self, *, q, out, softmax_scale, seqused_k, **_: object) -> None:  # noqa: ANN001
        k, v = self.cache["k"], self.cache["v"]  # (T, kv_heads, d): one sequence, slots 0..T-1
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * softmax_scale
        t = q.shape[0]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out.copy_(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype))


def _impl(head_size: int) -> kv4_attention.OfflineValueInt4Impl:
    impl = kv4_attention.OfflineValueInt4Impl.__new__(kv4_attention.OfflineValueInt4Impl)
    impl.head_size, impl.scale = head_size, head_size ** -0.5
    impl.sliding_window, impl.logits_soft_cap, impl.sinks = (-1, -1), 0.0, None
    impl.alibi_slopes, impl.use_alibi_sqrt = None, False
    impl._k_scale_cache = impl._v_scale_cache = torch.empty(0)
    impl._pth_key_value_caches = lambda kv_cache: (torch.empty(0), torch.empty(0))
    return impl


def test_offline_value_impl_equals_the_simulation(monkeypatch) -> None:
    fake = FakeInt4Kernels()
    monkeypatch.setattr(kv4_attention.int4_ops, "_run_reshape_kernel", fake.run_reshape_kernel)
    monkeypatch.setattr(kv4_attention.int4_ops, "_launch_packed_attn", fake.launch_packed_attn)
    g = torch.Generator().manual_seed(0)
    t, heads, kv_heads, d = 12, 4, 2, 64
    q = torch.randn(t, heads, d, generator=g)
    k = torch.randn(t, kv_heads, d, generator=g)
    k[..., 7] *= 25  # an outlier key channel
    v = torch.randn(t, kv_heads, d, generator=g)
    impl = _impl(d)
    impl.do_kv_cache_update(None, k, v, None, torch.arange(t))
    assert torch.equal(fake.write_args["value"], v)  # V is not rotated online...
    torch.testing.assert_close(fake.write_args["key"], ref.hadamard_transform(k))  # ...K is
    md = SimpleNamespace(use_cascade=False, num_actual_tokens=t, query_start_loc=torch.tensor([0, t]),
                         max_query_len=t, seq_lens=torch.tensor([t]), block_table=None,
                         mm_prefix_range_tensor=None, seq_threshold_3D=None, num_par_softmax_segments=None,
                         softmax_segm_output=None, softmax_segm_max=None, softmax_segm_expsum=None)
    output = torch.full((t + 3, heads, d), float("nan"))  # padded batch, poisoned
    assert impl.forward(None, q, k, v, None, md, output) is output
    assert torch.isnan(output[t:]).all()  # rows past num_actual_tokens untouched
    ks, vs = ref.simulate_kv_cache(k, v, 4, value_rotated_offline=True)
    rep = heads // kv_heads
    scores = torch.einsum("qhd,khd->hqk", q, ks.repeat_interleave(rep, 1)) * d ** -0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs.repeat_interleave(rep, 1))
    torch.testing.assert_close(output[:t], want, atol=1e-5, rtol=1e-5)
