"""The checkpoint's KV cache in vLLM: which cache dtype serves it, and per-layer checks.

A ruquant checkpoint converted with a ``kv4`` scheme was calibrated for a 4-bit KV cache
(``format.KVCacheSpec``, arithmetic in ``reference.simulate_kv_cache``). vLLM serves that as
its ``int4_per_token_head`` cache (TRITON_ATTN, CUDA). The user needs no flag:

* ``--kv-cache-dtype auto`` (the default) becomes ``int4_per_token_head`` when vLLM resolves
  the engine config (``resolve_cache_dtype``, installed by the plugin's ``register``).
* An explicit ``--kv-cache-dtype`` wins; serving a KV4 checkpoint with another cache is
  allowed and logged (a 16-bit cache is at least as accurate as the calibrated one).
* Where the int4 cache does not exist (the CPU backend) ``auto`` is refused with the reason
  and the way out, instead of silently serving something else than the converter measured.

When the checkpoint's V/O projections carry the converter's per-head rotation
(``value_rotation == "offline"``), each attention layer's ``TritonAttentionImpl`` is switched
to ``attention.OfflineValueInt4Impl``, which skips vLLM's online V rotation
and its inverse on the output, and rotates Q/K with one small GEMM each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vllm_ruquant import compat
from vllm_ruquant.checkpoint.format import QUANT_METHOD, FormatError, KVCacheSpec, RUQuantFormat, parse_format
from vllm_ruquant.logs import log_once

logger = compat.plugin_logger(__name__)

INT4_CACHE_DTYPE = "int4_per_token_head"


class KVCacheConfigError(ValueError):
    """The checkpoint's KV cache cannot be served as requested; the message says what to do."""


def checkpoint_kv_spec(hf_config: Any) -> KVCacheSpec | None:
    """The ``kv_cache`` section of a ruquant checkpoint's config, None for other models."""
    qcfg = getattr(compat.text_config(hf_config), "quantization_config", None)
    if qcfg is None:
        qcfg = getattr(hf_config, "quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        return None
    try:
        return parse_format(qcfg).kv_cache
    except FormatError:
        return None  # RUQuantConfig.from_config reports it with the full message


def resolve_cache_dtype(requested: str, spec: KVCacheSpec | None, int4_supported: bool) -> str:
    """The cache dtype to serve with: the checkpoint's 4-bit cache for ``auto`` where it exists."""
    if spec is None or spec.bits == 16 or requested != "auto":
        return requested
    if spec.bits == 4 and int4_supported:
        return INT4_CACHE_DTYPE
    return requested  # check_attention_layer refuses "auto" with the reason


def engine_cache_dtype_resolver(requested: str, model_config: Any,
                                vllm_default: Callable[[str, Any], str]) -> str:
    """``resolve_kv_cache_dtype_string`` with ruquant checkpoints first (see compat)."""
    spec = checkpoint_kv_spec(getattr(model_config, "hf_config", None))
    if spec is None:
        return vllm_default(requested, model_config)
    chosen = resolve_cache_dtype(requested, spec, compat.int4_kv_cache_supported())
    if chosen != requested:
        logger.info("ruquant: the checkpoint's KV cache is %d-bit: --kv-cache-dtype auto -> %s",
                    spec.bits, chosen)
    return chosen


def check_attention_layer(fmt: RUQuantFormat, layer: torch.nn.Module, prefix: str) -> None:
    """Check (and for the offline-V int4 path, specialise) one attention layer of the model.

    Called from ``RUQuantConfig.get_quant_method`` while vLLM builds the layer (after its
    attention implementation exists) and again after loading; idempotent.
    """
    bits, dtype = fmt.kv_cache.bits, getattr(layer, "kv_cache_dtype", "auto")
    if bits == 16:
        return
    if bits == 4 and dtype == INT4_CACHE_DTYPE:
        # AttentionType is a str enum: DECODER == "decoder"
        if fmt.kv_cache.value_rotation == "offline" and getattr(layer, "attn_type", "decoder") == "decoder":
            _use_offline_value_impl(layer, prefix)
        else:
            log_once(logger, "online", "ruquant: KV cache int4_per_token_head with vLLM's online Q/K/V rotation")
        return
    if dtype == "auto":
        where = ("this platform has no int4_per_token_head cache (vLLM serves it with TRITON_ATTN "
                 "on CUDA GPUs)" if bits == 4 else f"vLLM has no {bits}-bit KV cache this plugin can serve")
        raise KVCacheConfigError(
            f"this checkpoint was calibrated for a {bits}-bit KV cache, but {where}. Pass "
            "--kv-cache-dtype bfloat16 (or float16) to serve it with a 16-bit cache -- at least as "
            "accurate as the converter's KV simulation -- or convert with a scheme without 'kv'.")
    log_once(logger, f"override:{dtype}",
             f"ruquant: the checkpoint was calibrated for a {bits}-bit KV cache; serving with the "
             f"requested --kv-cache-dtype {dtype} instead")


def _use_offline_value_impl(layer: torch.nn.Module, prefix: str) -> None:
    from vllm_ruquant.attention import OfflineValueInt4Impl, TritonAttentionImpl  # noqa: PLC0415 (GPU only)

    impl = getattr(layer, "impl", None)
    if isinstance(impl, OfflineValueInt4Impl):
        return
    if type(impl) is not TritonAttentionImpl:
        raise KVCacheConfigError(
            f"{prefix}: the int4 KV cache needs vLLM's TritonAttentionImpl, got "
            f"{type(impl).__name__}; do not force another --attention-backend for a kv4 checkpoint")
    # Same state, same cache layout, same kernels: only the rotation around them differs
    # (see attention.py), so the instance is re-classed rather than rebuilt.
    impl.__class__ = OfflineValueInt4Impl
    log_once(logger, "offline", "ruquant: KV cache int4_per_token_head; Q/K rotated online by the head_dim "
                                "Hadamard, V rotated offline (R2): OfflineValueInt4Impl")
