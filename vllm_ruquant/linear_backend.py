"""The interface of a ruquant linear-layer backend, and the torch reference backend.

A *backend* turns a layer's stored tensors into whatever layout its kernels want, once,
at ``process_weights_after_loading`` (``prepare``), and then runs the layer (``apply``).
The reference backend is the CPU serving path and the oracle; GPU backends live in
``vllm_ruquant.kernels`` and must produce the same integers (see ``reference.py``).
``ops.select_backend`` picks one per device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_ruquant import reference as ref


@dataclass(frozen=True)
class LinearSpec:
    """Everything a backend needs to know about one quantized linear layer."""

    in_features: int
    out_features: int
    weight_bits: int
    group_size: int  # -1: per output channel
    act_bits: int  # >= 16: weight-only
    clip_ratio: float = 1.0
    rotation: ref.OnlineRotation | None = None


class LinearBackend(Protocol):
    name: str

    def prepare(self, spec: LinearSpec, qweight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Repack the checkpoint's tensors (format.py layout) into this backend's layout."""
        ...

    def apply(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        ...

    def quantizes_in_graph(self, spec: LinearSpec) -> bool:
        """Whether a compiled model should quantize this layer's activations with torch ops
        (``reference.quantize_activation``) and hand the integers to ``apply_quantized``."""
        ...

    def apply_quantized(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], q: torch.Tensor,
                        scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer on given per-token integers ``q (..., K)`` and scales ``(..., 1)``."""
        ...

    def warm_up(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], *, max_tokens: int,
                dtype: torch.dtype, bias: torch.Tensor | None = None) -> int:
        """Whatever the layer's kernels would otherwise do at their first call of each size (autotuning),
        done at load time for steps of up to ``max_tokens`` tokens; returns the sizes run."""
        ...


class ReferenceBackend:
    """Plain torch: unpacks the weights to int8 once and runs ``reference.quantized_linear``."""

    name = "reference"

    def prepare(self, spec: LinearSpec, qweight: torch.Tensor, weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"w_q": ref.unpack_weight(qweight, spec.weight_bits), "w_scale": weight_scale.float()}
        if spec.rotation is not None and spec.rotation.blocks is not None:
            # a plain tensor (the layer's loaded parameter is a vLLM parameter subclass)
            out["rot_blocks"] = spec.rotation.blocks.data.to(qweight.device, torch.float32).clone()
        return out

    def apply(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        rotation = spec.rotation
        if "rot_blocks" in prepared:  # this layer's blocks (the shared spec has none)
            rotation = dataclasses.replace(rotation, blocks=prepared["rot_blocks"])
        return ref.quantized_linear(
            x, prepared["w_q"], prepared["w_scale"], act_bits=spec.act_bits,
            group_size=spec.group_size, clip_ratio=spec.clip_ratio, rotation=rotation,
            bias=bias, out_dtype=x.dtype,
        )

    def quantizes_in_graph(self, spec: LinearSpec) -> bool:
        return False  # one op, as the simulation runs it

    def apply_quantized(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], q: torch.Tensor,
                        scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        y = ref.int_linear(q.reshape(-1, q.shape[-1]), scale.reshape(-1), prepared["w_q"], prepared["w_scale"],
                           spec.group_size, bias, out_dtype)
        return y.reshape(*q.shape[:-1], spec.out_features)

    def warm_up(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], *, max_tokens: int,
                dtype: torch.dtype, bias: torch.Tensor | None = None) -> int:
        return 0  # torch picks its kernels per call
