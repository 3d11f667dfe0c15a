"""``RUQuantConfig``: the vLLM ``QuantizationConfig`` for ruquant checkpoints.

vLLM builds it from the checkpoint's ``config.json`` ``quantization_config`` (whether the
user passed ``--quantization ruquant`` or not: ``quant_method: ruquant`` is enough) and
asks it, layer by layer, which method quantizes that layer.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_ruquant import compat, settings
from vllm_ruquant.checkpoint.format import QUANT_METHOD, FormatError, RUQuantFormat, parse_format
from vllm_ruquant.checkpoint.validate import validate_for_serving
from vllm_ruquant.kv_cache import check_attention_layer, engine_cache_dtype_resolver
from vllm_ruquant.linear import RUQuantLinearMethod

logger = compat.plugin_logger(__name__)


class RUQuantConfigError(ValueError):
    """The checkpoint cannot be served as it is; the message says why and what to do."""


class RUQuantConfig(compat.QuantizationConfig):
    """Holds the parsed checkpoint format; hands out ``RUQuantLinearMethod`` per layer."""

    def __init__(self, fmt: RUQuantFormat | None = None) -> None:
        super().__init__()
        if fmt is None:
            # vLLM constructs the class without arguments when config.json has no
            # quantization_config: the checkpoint is not a ruquant checkpoint.
            raise RUQuantConfigError(
                "--quantization ruquant needs a checkpoint written by ruquant-convert: its "
                "config.json must carry quantization_config with quant_method 'ruquant'"
            )
        self.fmt = fmt

    def __repr__(self) -> str:
        f = self.fmt
        return f"RUQuantConfig({f.scheme}, group_size={f.weight.group_size}, rotations={sorted(f.online_rotations)})"

    # ------------------------------------------------------------ vLLM interface

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Only consulted on GPUs (the CPU reports no capability). 80 = Ampere: bf16 and
        # int8 tensor cores; the torch reference fallback would run anywhere, but slowly.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        # The format lives in config.json's quantization_config, nowhere else.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RUQuantConfig:
        try:
            return cls(parse_format(config))
        except FormatError as e:
            raise RUQuantConfigError(f"cannot serve this ruquant checkpoint: {e}") from None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> compat.QuantizeMethodBase | None:
        """Linear layers get the ruquant method unless ignored (lm_head); others are left as is.

        Attention layers get no method (no KV scales to load) but are checked against the
        checkpoint's KV cache (``kv_cache.check_attention_layer``).
        """
        if isinstance(layer, compat.Attention):
            check_attention_layer(self.fmt, layer, prefix)
            return None
        if not isinstance(layer, compat.LinearBase):
            return None  # embeddings, lm_head (ParallelLMHead), attention: unquantized
        if self.fmt.is_ignored(prefix):
            return compat.UnquantizedLinearMethod()
        return RUQuantLinearMethod(self, prefix)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, **kwargs: Any) -> None:
        """Check the config's shapes against the model's, then validate the checkpoint directory.

        This is the earliest hook that receives the model path, in vLLM 0.26 and 0.32 alike
        (``VllmConfig._get_quantization_config``, run when the engine config is built, before
        any process allocates weights or KV cache); ``validate_for_serving`` runs once per
        process tree, from headers only (+ shard sha256 unless RUQUANT_SKIP_CHECKSUM=1).
        """
        cfg = compat.text_config(hf_config)
        hidden = getattr(cfg, "hidden_size", None)
        inter = getattr(cfg, "intermediate_size", None)
        heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "head_dim", None)
        if hidden is not None and inter is not None:
            try:  # no head_dim: o_proj reads hidden_size, check_model's default
                self.fmt.check_model(hidden, inter, heads * head_dim if heads and head_dim else None)
            except FormatError as e:
                raise RUQuantConfigError(f"ruquant checkpoint {model_name} does not match its model: {e}") from None
        validate_for_serving(str(model_name), log=logger.info)


def register_with_vllm() -> None:
    """Register ``RUQuantConfig`` as quantization method "ruquant" (idempotent)."""
    if compat.registered_config(QUANT_METHOD) is RUQuantConfig:
        return
    compat.register_quantization_config(QUANT_METHOD)(RUQuantConfig)
    compat.install_kv_cache_dtype_resolver(engine_cache_dtype_resolver)
    # RUQUANT_* switches that shape the compiled graph must key vLLM's compile cache (settings.py)
    compat.add_compile_cache_factor(settings.COMPILE_FACTOR, settings.compile_factor)
    logger.debug("ruquant: registered quantization method %r (vLLM %s)", QUANT_METHOD, compat.VLLM_VERSION)
