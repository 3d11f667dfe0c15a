"""Straight-through fake quantization: what the optimising rotation methods train against.

RUQuant's stage 2 and OSTQuant minimise a layer's (or the model's) output error under
simulated quantization with gradient descent; rounding has no useful gradient, so it is
passed straight through (identity in the backward pass).
"""

from __future__ import annotations

from typing import Any

import torch


class _STERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return g


def fake_quant(x: torch.Tensor, bits: int, dim: int = -1, clip_ratio: float = 1.0) -> torch.Tensor:
    """Symmetric absmax fake quantization along ``dim`` with straight-through rounding
    (``clip_ratio`` < 1: the scale covers that share of the absmax, larger values saturate)."""
    if bits >= 16:
        return x
    qmax = (1 << (bits - 1)) - 1
    s = (x.abs().amax(dim, keepdim=True) * clip_ratio / qmax).clamp_min(1e-12)
    return torch.clamp(_STERound.apply(x / s), -qmax - 1, qmax) * s
