"""Dispatch for the ruquant linear layer: which backend runs it, behind one graph-opaque op.

``select_backend`` is the one place a backend is chosen: the Triton kernels
(``kernels.backend.TritonBackend``) on CUDA, the torch reference
(``linear_backend.ReferenceBackend``) otherwise. The interface both implement is
``linear_backend.LinearBackend``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from vllm_ruquant.linear_backend import LinearBackend, LinearSpec, ReferenceBackend

logger = logging.getLogger(__name__)


def select_backend(device: torch.device) -> LinearBackend:
    """The fastest backend that runs on ``device``; ``RUQUANT_BACKEND=reference`` forces torch."""
    forced = os.environ.get("RUQUANT_BACKEND", "").lower()
    if device.type == "cuda" and forced != "reference":
        try:
            from vllm_ruquant.kernels.backend import TritonBackend  # noqa: PLC0415 (GPU only)

            return TritonBackend()
        except ImportError as e:  # kernels not built for this install
            logger.warning("ruquant: Triton kernels unavailable (%s); using the torch reference", e)
    return ReferenceBackend()


# ----------------------------------------------------------------- the graph-opaque op
#
# vLLM runs models under torch.compile and CUDA graphs. The backends are plain Python
# (the reference loops over weight groups and sizes its accumulator with ``.item()``; the
# Triton backend launches autotuned kernels), which Dynamo should not trace. So the layer
# calls one registered custom op, ``ruquant::linear``, that Dynamo and Inductor treat as
# opaque. Its inputs are the activation, the layer's prepared tensors and an integer naming
# the layer's *kind* (backend + spec), shared by every layer of the same shape: the 32
# decoder layers of a Llama then lower to isometric piecewise graphs, which vLLM compiles
# once and reuses (its artifacts are keyed on the graph's structure). A per-layer integer
# made every layer's graph distinct; with it, the 8B ruquant model's Inductor compile took
# 66 s on an H100 against 12 s for bf16 (not yet re-measured with the shared id).


@dataclass(frozen=True)
class _Kind:
    backend: LinearBackend
    spec: LinearSpec  # rotation without its per-layer blocks (those are in the prepared tensors)
    keys: tuple[str, ...]  # names of the prepared tensors, in the op's argument order


_KINDS: list[_Kind] = []
_KIND_IDS: dict[tuple, int] = {}
# one entry per registered layer (backend name): engines log and tests check what served them
LAYER_BACKENDS: list[str] = []


def _spec_key(backend: LinearBackend, spec: LinearSpec, keys: tuple[str, ...]) -> tuple:
    rot = spec.rotation
    rot_key = None if rot is None else (rot.kind, rot.size, rot.block_size, rot.padded_from)
    # backends are stateless apart from the Triton one's MMA choice: equal names, equal kernels
    return (backend.name, getattr(backend, "w4a4_fp8", None), spec.in_features, spec.out_features,
            spec.weight_bits, spec.group_size, spec.act_bits, spec.clip_ratio, rot_key, keys)


def register_layer(backend: LinearBackend, spec: LinearSpec, prepared: dict[str, torch.Tensor]) -> int:
    """The layer's kind id for ``ruquant::linear``; the op takes ``prepared``'s tensors in its order.

    A block-diagonal rotation's blocks differ per layer: the backend's ``prepare`` must have put
    them in ``prepared`` (``rot_blocks``), and the shared spec drops them, so a backend reading
    ``spec.rotation.blocks`` at run time fails loudly instead of using another layer's blocks.
    """
    keys = tuple(prepared)
    if spec.rotation is not None and spec.rotation.blocks is not None:
        if "rot_blocks" not in prepared:
            raise ValueError(f"backend {backend.name!r} must prepare 'rot_blocks' for a block-diagonal rotation")
        spec = dataclasses.replace(spec, rotation=dataclasses.replace(spec.rotation, blocks=None))
    key = _spec_key(backend, spec, keys)
    if key not in _KIND_IDS:
        _KIND_IDS[key] = len(_KINDS)
        _KINDS.append(_Kind(backend, spec, keys))
    LAYER_BACKENDS.append(backend.name)
    return _KIND_IDS[key]


@torch.library.custom_op("ruquant::linear", mutates_args=())
def linear_op(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None, kind_id: int) -> torch.Tensor:
    kind = _KINDS[kind_id]
    return kind.backend.apply(kind.spec, dict(zip(kind.keys, weights, strict=True)), x, bias)


@linear_op.register_fake
def _linear_op_fake(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                    kind_id: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _KINDS[kind_id].spec.out_features)


# --------------------------------------------- the same layer on integers quantized in the graph
#
# Under torch.compile a layer whose backend allows it (``quantizes_in_graph``) quantizes its
# activations with torch ops (``reference.quantize_activation``) in front of this op: Inductor then
# fuses the per-token absmax, division and rounding into the kernel that produces the activation
# (the fused residual-add + RMSNorm before qkv and gate_up), so no separate quantization launch runs
# and the matrix kernel reads int8. The op itself stays opaque, like ``ruquant::linear``.


@torch.library.custom_op("ruquant::int_linear", mutates_args=())
def int_linear_op(q: torch.Tensor, scale: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None,
                  kind_id: int, out_dtype: torch.dtype) -> torch.Tensor:
    kind = _KINDS[kind_id]
    return kind.backend.apply_quantized(kind.spec, dict(zip(kind.keys, weights, strict=True)), q, scale, bias,
                                        out_dtype)


@int_linear_op.register_fake
def _int_linear_op_fake(q: torch.Tensor, scale: torch.Tensor, weights: list[torch.Tensor],
                        bias: torch.Tensor | None, kind_id: int, out_dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], _KINDS[kind_id].spec.out_features, dtype=out_dtype)
