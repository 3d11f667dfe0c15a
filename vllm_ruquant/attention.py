"""vLLM's int4 KV-cache attention for checkpoints whose V/O carry an offline per-head rotation.

vLLM 0.26's ``int4_per_token_head`` path (``TritonAttentionImpl`` + ``int4_per_token_head.py``)
rotates K and V by a randomized Hadamard on every cache write, Q before attention, and
un-rotates the attention output -- each a chain of dtype casts and a Hadamard kernel. For a
ruquant checkpoint with ``kv_cache.value_rotation == "offline"`` the converter has already
folded a per-head orthogonal R2 into v_proj / o_proj, so V needs no online rotation and the
output needs no inverse. What remains is Q and K, rotated here by one GEMM each with the
orthonormal ``H_d / sqrt(d)`` (so the softmax scale is unchanged).

The cache layout and the write kernel are vLLM's own (``_run_reshape_kernel``). Attention
reads the cache with ``int4_kv_attention.paged_int4_attention`` (bf16 tensor-core MMAs, split
keys for small decode batches) instead of vLLM's ``_launch_packed_attn`` (TF32 on 16-row
tiles, 0.56x a bf16 cache on an H200). Prefill chunks go to FlashAttention instead, on their
sequences' K/V dequantized once per step (``attend_int4_cache``): an int4 prefill tile
re-unpacks every K/V tile for every 32 queries and ran at 5-7x FA3's time on an H200, the
dequantization costs one pass over those sequences' cache. vLLM's kernel stays the fallback
for the features ours lacks (ALiBi, soft-capping, sinks, sliding window, multimodal prefix
ranges, fp8 output). Arithmetic oracle:
``reference.simulate_kv_cache(..., value_rotated_offline=True)``; kernel oracle
``reference.paged_int4_attention``. This module touches vLLM 0.26 internals (GPU only) and
is imported only on that path (``kv_cache``), and reaches vLLM through ``compat`` like every
plugin module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_ruquant import compat
from vllm_ruquant.kernels import int4_kv_attention
from vllm_ruquant.logs import log_once
from vllm_ruquant.reference import hadamard_transform

logger = compat.plugin_logger(__name__)
TritonAttentionImpl = compat.triton_attention_impl()
int4_ops = compat.int4_kv_cache_ops()
_INT4_PACKING = 2
_FLASH_ATTN = compat.flash_attn_varlen()  # None on the CPU: int4 prefill tiles there
ATTENTION_OURS, ATTENTION_VLLM = "attention:ruquant", "attention:vllm"  # logs.LOGGED keys
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
# dequantized prefill K/V above this many bytes: our int4 prefill tiles instead (no big scratch)
MAX_PREFILL_SCRATCH_BYTES = 2 << 30


def head_hadamard(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``H_d / sqrt(d)`` (symmetric, orthogonal), cached per dtype and device."""
    key = (d, dtype, device)
    if key not in _HADAMARD:
        _HADAMARD[key] = hadamard_transform(torch.eye(d)).to(device=device, dtype=dtype)
    return _HADAMARD[key]


@dataclass(frozen=True)
class PrefillSplit:
    """The prefill sequences of one step (more queries than a decode tile holds), on the host.

    ``cu_seqlens_k`` (num_seqs + 1, device) gives each prefill sequence its whole key range in
    the dequantized K/V and every other sequence none, so one FlashAttention call over the
    step's ``cu_seqlens_q`` attends exactly the prefill sequences.
    """

    seq_ids: torch.Tensor
    cu_seqlens_k: torch.Tensor
    total_keys: int
    max_keys: int

    @classmethod
    def of(cls, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, decode_queries: int) -> PrefillSplit | None:
        """None when no sequence has more than ``decode_queries`` queries. One device-to-host copy."""
        num_seqs = seq_lens.shape[0]
        host = torch.cat([cu_seqlens_q[:num_seqs + 1], seq_lens]).cpu()
        q_lens, lens = host[1:num_seqs + 1] - host[:num_seqs], host[num_seqs + 1:]
        prefill = q_lens > decode_queries
        if not bool(prefill.any()):
            return None
        keys = torch.where(prefill, lens, 0)
        cu_k = torch.zeros(num_seqs + 1, dtype=torch.int32)
        cu_k[1:] = keys.cumsum(0)
        device = seq_lens.device
        return cls(prefill.nonzero().flatten().to(device=device, dtype=torch.int32), cu_k.to(device),
                   int(cu_k[-1]), int(keys.max()))


def attend_int4_cache(flash_attn, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,  # noqa: ANN001
                      k_scales: torch.Tensor, v_scales: torch.Tensor, out: torch.Tensor, *,
                      plan: int4_kv_attention.AttentionPlan, split: PrefillSplit | None,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                      max_query_len: int, softmax_scale: float) -> None:
    """One layer's attention over the int4 cache into ``out``, as the engine runs it.

    With a ``split``: its prefill sequences by ``flash_attn`` on their dequantized K/V (rows of
    the other sequences get FlashAttention's output for an empty key range), then the decode
    launch of ``plan`` overwrites the decodes' rows. Without: ``plan`` takes every sequence.
    """
    if split is not None:
        k, v = int4_kv_attention.dequantize_sequences(
            key_cache, value_cache, k_scales, v_scales, block_table=block_table, seq_ids=split.seq_ids,
            cu_seqlens_k=split.cu_seqlens_k, total_keys=split.total_keys, max_keys=split.max_keys,
            head_dim=q.shape[-1], dtype=q.dtype)
        flash_attn(q=q, k=k, v=v, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q,
                   max_seqlen_k=split.max_keys, cu_seqlens_k=split.cu_seqlens_k, softmax_scale=softmax_scale,
                   causal=True, out=out)
        plan = int4_kv_attention.AttentionPlan(plan.decode, None)  # decodes only
    int4_kv_attention.paged_int4_attention(
        q, key_cache, value_cache, k_scales, v_scales, out, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens,
        block_table=block_table, max_query_len=max_query_len, softmax_scale=softmax_scale, plan=plan)


class OfflineValueInt4Impl(TritonAttentionImpl):
    """``TritonAttentionImpl`` for the int4 cache with Q/K rotated here and V rotated offline."""

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        super().process_weights_after_loading(act_dtype)
        # fill the cache now: a host-to-device copy is not allowed later, inside CUDA-graph capture
        head_hadamard(self.head_size, act_dtype, torch.device("cuda", torch.cuda.current_device()))
        if self._layer_fits_our_kernel():
            log_once(logger, ATTENTION_OURS, "ruquant: int4 KV attention by kernels/int4_kv_attention.py")
        else:
            log_once(logger, ATTENTION_VLLM, "ruquant: int4 KV attention by vLLM's _attn_packed (the layer uses "
                                     "ALiBi, sinks, soft-capping or a sliding window)")

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ head_hadamard(x.shape[-1], x.dtype, x.device)

    def _layer_fits_our_kernel(self) -> bool:
        """Plain causal softmax attention (fixed per layer): what ``paged_int4_attention`` implements."""
        return (self.alibi_slopes is None and self.sinks is None
                and not (self.logits_soft_cap and self.logits_soft_cap > 0)
                and (self.sliding_window is None or self.sliding_window[0] < 0))

    def _prefill_split(self, md, plan: int4_kv_attention.AttentionPlan, q: torch.Tensor,  # noqa: ANN001
                       kv_heads: int) -> PrefillSplit | None:
        """This step's prefill sequences for FlashAttention; None: the int4 kernel takes them all.

        Computed at the first layer of a step and kept on its metadata (shared by the layers
        of a KV-cache group), so a mixed step pays one device-to-host copy. Never while a
        CUDA graph is captured (full graphs hold decode-only batches, and no copy may happen).
        """
        if (plan.prefill is None or _FLASH_ATTN is None or q.dtype not in (torch.bfloat16, torch.float16)
                or (q.is_cuda and torch.cuda.is_current_stream_capturing())):
            return None
        split = getattr(md, "_ruquant_prefill_split", False)
        if split is False:
            split = PrefillSplit.of(md.query_start_loc, md.seq_lens, plan.decode_queries(q.shape[1] // kv_heads))
            md._ruquant_prefill_split = split
        scratch_bytes = 2 * (split.total_keys if split else 0) * kv_heads * q.shape[2] * q.element_size()
        return None if scratch_bytes > MAX_PREFILL_SCRATCH_BYTES else split

    def _our_kernel_covers(self, md, output_scale) -> bool:  # noqa: ANN001
        """This layer, this step: no fused fp8 output, no multimodal prefix ranges."""
        return (output_scale is None and self._layer_fits_our_kernel()
                and getattr(md, "mm_prefix_range_tensor", None) is None)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):  # noqa: ANN001, ANN201
        key_cache, value_cache = self._pth_key_value_caches(kv_cache)
        int4_ops._run_reshape_kernel(
            int4_ops._reshape_cache_int4_kernel,
            key=self._rotate(key), value=value, key_cache=key_cache, value_cache=value_cache,
            k_scale_cache=self._k_scale_cache, v_scale_cache=self._v_scale_cache,
            slot_mapping=slot_mapping, packing_factor=_INT4_PACKING,
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,  # noqa: ANN001, ANN201
                output_scale=None, output_block_scale=None):
        if attn_metadata is None or output_block_scale is not None:
            # profiling run / unsupported fused output quantization: vLLM's own handling
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        assert attn_metadata.use_cascade is False
        md = attn_metadata
        n = md.num_actual_tokens
        key_cache, value_cache = self._pth_key_value_caches(kv_cache)
        if self._our_kernel_covers(md, output_scale):
            q, out = self._rotate(query[:n]), output[:n]
            num_heads, kv_heads = q.shape[1], key_cache.shape[2]
            plan = int4_kv_attention.plan_launch(md.max_query_len, md.seq_lens.shape[0], kv_heads,
                                                 num_heads // kv_heads)
            attend_int4_cache(
                _FLASH_ATTN, q, key_cache, value_cache, self._k_scale_cache, self._v_scale_cache, out,
                plan=plan, split=self._prefill_split(md, plan, q, kv_heads), cu_seqlens_q=md.query_start_loc,
                seq_lens=md.seq_lens, block_table=md.block_table, max_query_len=md.max_query_len,
                softmax_scale=self.scale)
            return output
        int4_ops._launch_packed_attn(
            q=self._rotate(query[:n]), k_cache=key_cache, v_cache=value_cache, out=output[:n],
            cu_seqlens_q=md.query_start_loc, max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens,
            softmax_scale=self.scale, window_size=self.sliding_window, block_table=md.block_table,
            softcap=self.logits_soft_cap, sinks=self.sinks, alibi_slopes=self.alibi_slopes,
            use_alibi_sqrt=self.use_alibi_sqrt, qq_bias=None, output_scale=output_scale,
            mm_prefix_range=md.mm_prefix_range_tensor,
            k_scale_cache=self._k_scale_cache, v_scale_cache=self._v_scale_cache,
            seq_threshold_3D=md.seq_threshold_3D, num_par_softmax_segments=md.num_par_softmax_segments,
            softmax_segm_output=md.softmax_segm_output, softmax_segm_max=md.softmax_segm_max,
            softmax_segm_expsum=md.softmax_segm_expsum, packing_factor=_INT4_PACKING,
        )
        return output
