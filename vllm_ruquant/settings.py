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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

PREFIX = "RUQUANT_"
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
