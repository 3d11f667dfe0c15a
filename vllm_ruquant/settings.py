"""Which ``RUQUANT_*`` environment switches a process runs under, as one fact.

Each switch is read by the module it steers (``kernels/backend.py`` reads ``RUQUANT_GRAPH_QUANT``,
``kernels/inductor_setup.py`` ``RUQUANT_PERSISTENT_ROW_MAX``, ...). This module only answers "which
were set", for two readers:

* vLLM's compile cache. vLLM keys its torch.compile artifacts (Inductor's and, in 0.26 and 0.32, the
  AOT-compiled model function, loaded with its guards off) on the vLLM config and on vLLM's own
  environment variables, not on ours. Several of ours change the compiled graph (whether the
  activation quantization is graph-visible, how Inductor reduces rows), so an engine started with
  another setting loaded the graph of the first: with ``RUQUANT_GRAPH_QUANT=0`` after a default run it
  failed at start (``KeyError: 'ruquant_qmax'``, H200, gpu-2026-12-04h), and a setting that only changes
  Inductor's code was silently ignored. ``register`` therefore adds ``COMPILE_FACTOR`` to the factors
  vLLM hashes (``compat.add_compile_cache_factor``).
* Benchmark rows, which record the switches they ran under.

``SWITCHES`` lists them all, for users (docs/ and ``python -m vllm_ruquant.settings``) and for a test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

PREFIX = "RUQUANT_"

# Every switch the plugin reads, with its default and what it changes (a test checks that the code reads
# no other). Each is read once, by the module named, mostly at import; set them before vLLM starts.
SWITCHES: dict[str, str] = {
    "RUQUANT_BACKEND": "ops: `reference` forces the torch reference on GPUs too (default: Triton on CUDA)",
    "RUQUANT_AUTOTUNE": "kernels.gemm / dequant_gemm: 0 = each M bucket's first config, no timing (default 1)",
    "RUQUANT_PRETUNE": "kernels.backend: 0 = autotune each GEMM bucket at its first use, not at load (default 1)",
    "RUQUANT_GRAPH_QUANT": "kernels.backend: 0 = activation quantization in our kernels, not fused by "
                           "Inductor under torch.compile (default 1)",
    "RUQUANT_EXACT_DIVISION": "kernels.inductor_setup: 0 = Inductor's approximate division in the fused "
                              "quantization (default 1: IEEE, the simulation's integers)",
    "RUQUANT_PERSISTENT_ROW_MAX": "kernels.inductor_setup: rows up to this many elements reduce in one pass "
                                  "(default 8192; 0 = Inductor's own limit)",
    "RUQUANT_GEMV": "kernels.backend: 0 = no CUDA-core GEMV at decode sizes (default 1)",
    "RUQUANT_GEMV_MAX_M": "kernels.gemv: most tokens the GEMV serves (default 1)",
    "RUQUANT_GEMV_LONG_K_TILE": "kernels.gemv: down_proj's decode tile by name, e.g. bn8-bk4096-lv128-w4-nbp1-kloop",
    "RUQUANT_FUSED_QUANT_MAX_M": "kernels.backend: most tokens quantized inside the GEMV when not in the graph",
    "RUQUANT_KRON_ROWS_MAX_M": "kernels.rotate_quant: most tokens whose Kronecker rotation spreads over "
                               "programs (default 64)",
    "RUQUANT_KRON_RB": "kernels.rotate_quant: rows of that rotation a program (default 0: by token count)",
    "RUQUANT_UNPACK_ASM": "kernels.gemm / gemv: 0 = plain Triton nibble unpacking, no inline asm (default 1)",
    "RUQUANT_W4A4_PACKED_ACT": "kernels.backend: 1 = W4A4 on packed int4 activations (default int8-held)",
    "RUQUANT_W4A4_MMA": "kernels.backend: fp8 = packed W4A4 on FP8 tensor cores (default int8)",
    "RUQUANT_INT4_KV_DECODE_PLAN": "kernels.int4_kv_attention: the int4-KV decode tile, rows,keys,warps,stages",
    "RUQUANT_SKIP_CHECKSUM": "checkpoint.validate: 1 = skip the shards' sha256 at load",
    "RUQUANT_SKIP_VALIDATE": "checkpoint.validate: 1 = skip the whole checkpoint validation at load",
}
# Set by the plugin itself once a checkpoint has been validated in a process tree (so the workers
# skip a second check); it names the checkpoint, which vLLM's key already covers.
VALIDATED_ENV = "RUQUANT_VALIDATED_CHECKPOINT"
BOOKKEEPING = frozenset({VALIDATED_ENV})
# The name under which the switches enter vLLM's compile-cache factors.
COMPILE_FACTOR = "RUQUANT_SETTINGS"


def active(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``RUQUANT_*`` switches set in ``environ`` (default: this process's), sorted by name."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in sorted(env) if k.startswith(PREFIX) and k not in BOOKKEEPING}


def describe(environ: Mapping[str, str] | None = None) -> str:
    """``active`` as ``NAME=value`` words ("" when none is set)."""
    return " ".join(f"{k}={v}" for k, v in active(environ).items())


def compile_factor() -> str:
    """``active`` as one canonical string, read each time vLLM computes a cache key."""
    return json.dumps(active(), sort_keys=True)


if __name__ == "__main__":
    for name, what in SWITCHES.items():
        print(f"{name:<28} {what}")

