"""The interface every weight quantizer implements (``convert.quantizers`` registers them).

A quantizer turns one fp weight ``(N, K)`` (rotations already absorbed) into integers on
the symmetric grid of ``vllm_ruquant.reference`` plus fp32 scales ``(N, G)``. Quantizers
that minimise the layer's output error get the input Hessian ``H = X^T X / n`` of the
calibration activations (as the served layer sees them: after any online rotation).
"""

from __future__ import annotations

from typing import Protocol

import torch


class WeightQuantizer(Protocol):
    name: str
    needs_hessian: bool

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(q int8 (N, K), scale fp32 (N, G))``."""
        ...
