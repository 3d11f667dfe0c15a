"""Dimension expansion (GBS+DE): pad a dimension to a Hadamard size, then rotate.

A Hadamard rotation spreads outliers best (it is the orthogonal matrix whose entries are
all of equal magnitude), but only exists for some sizes; ``vllm_ruquant.hadamard``
already covers 2^k * m for the Paley / Kronecker factors m. For any other size n, DE
appends ``m - n`` zero channels (m the next constructible size) and applies the m x m
Hadamard: ``x -> [x, 0] @ H_m / sqrt(m)``. The weight reading that input becomes
``[W, 0] @ H_m / sqrt(m)`` of shape ``(N, m)``, so ``x W^T`` is unchanged (the padding
meets zero weights) while both sides are quantized in the rotated m-dim space.

**Serving.** ``ruquant-convert --dimension-expansion`` applies this to down_proj's input
(``pipeline._expand_dimensions``): the format records ``{"kind": "hadamard", "size": m,
"padded_from": n}`` and a ``(N, m)`` ``qweight``, ``reference.OnlineRotation`` zero-pads
before its Hadamard, and the Triton backend pads before its fused rotate+quantize kernel.
Cost at run time: ``(m - n) / n`` more weight memory and GEMM work on that site. Every size
our target models have (11008, 14336, 18944, ...) is already constructible; the helpers
below measure what DE buys on one site (``expanded_linear_error``).
"""

from __future__ import annotations

import math

import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.hadamard import hadamard_matrix, is_hadamard_size


def expanded_size(n: int, limit: float = 1.25) -> int:
    """Smallest Hadamard-constructible size ``m >= n`` (at most ``limit * n``)."""
    if is_hadamard_size(n):
        return n
    m = n + (-n) % 4  # every Hadamard order above 2 is a multiple of 4
    while m <= limit * n:
        if is_hadamard_size(m):
            return m
        m += 4
    raise ValueError(f"no Hadamard size within {limit}x of {n}")


def expansion_matrix(n: int) -> torch.Tensor:
    """``P (n, m)``: the first n rows of ``H_m / sqrt(m)``; ``P P^T = I_n`` (semi-orthogonal)."""
    m = expanded_size(n)
    return hadamard_matrix(m)[:n].double() / math.sqrt(m)


def expand_activation(x: torch.Tensor) -> torch.Tensor:
    """``[x, 0] @ H_m / sqrt(m)`` over the last dim (what the plugin would do online)."""
    return x.double() @ expansion_matrix(x.shape[-1]).to(x.device)


def expand_weight(w: torch.Tensor) -> torch.Tensor:
    """``[W, 0] @ H_m / sqrt(m)``: ``expand_activation(x) @ expand_weight(W)^T == x @ W^T``."""
    return w.double() @ expansion_matrix(w.shape[-1]).to(w.device)


def expanded_linear_error(x: torch.Tensor, w: torch.Tensor, w_bits: int, a_bits: int,
                          clip_ratio: float = 1.0) -> dict[str, float]:
    """Relative output error of a W/A-quantized linear (RTN) without and with DE.

    Simulation of what serving DE would give on one site: quantize activations per token and
    weights per channel, in the original basis and in the expanded, Hadamard-rotated one.
    """
    y = x.double() @ w.double().T

    def rel(xs: torch.Tensor, ws: torch.Tensor) -> float:
        q, s = ref.quantize_weight(ws.float(), w_bits)
        yq = ref.quantized_linear(xs.float(), q, s, act_bits=a_bits, clip_ratio=clip_ratio)
        return float((yq.double() - y).norm() / y.norm().clamp_min(1e-30))

    return {"plain": rel(x, w), "expanded": rel(expand_activation(x), expand_weight(w)),
            "size": float(expanded_size(x.shape[-1]))}
