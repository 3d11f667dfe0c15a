"""QuaRot-style rotations: randomised Hadamard R1/R2, Hadamard R4 online (and "none").

R1 = diag(s) H_d / sqrt(d) with random signs s (any orthogonal R1 preserves the model;
the Hadamard spreads outlier channels evenly, the signs make it a random member of the
family). When d has no Hadamard construction, R1 falls back to a Haar-random orthogonal
matrix, which is equally valid offline. R4 must be executed online by the plugin, so it is
the plain Hadamard of the intermediate size (no signs: signs would need another op).
"""

from __future__ import annotations

import math

import torch

from convert.rotations.base import RotationContext, RotationPlan, random_orthogonal, random_signs
from vllm_ruquant.hadamard import hadamard_matrix, is_hadamard_size
from vllm_ruquant.reference import OnlineRotation


def randomized_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    if not is_hadamard_size(n):
        return random_orthogonal(n, generator)
    return random_signs(n, generator).unsqueeze(1) * hadamard_matrix(n).double() / math.sqrt(n)


class HadamardRotation:
    name = "hadamard"

    def plan(self, ctx: RotationContext) -> RotationPlan:
        d = ctx.dims
        r4 = OnlineRotation("hadamard", d.intermediate_size) if is_hadamard_size(d.intermediate_size) else None
        return RotationPlan(
            residual=randomized_hadamard(d.hidden_size, ctx.generator),
            head=randomized_hadamard(d.head_dim, ctx.generator),
            down_proj={i: r4 for i in range(d.num_layers)} if r4 else {},
            report={"residual": "randomized_hadamard" if is_hadamard_size(d.hidden_size) else "random_orthogonal",
                    "down_proj_online": "hadamard" if r4 else "none"},
        )


class NoRotation:
    """Quantize the model as it is (RTN/GPTQ baselines)."""

    name = "none"

    def plan(self, ctx: RotationContext) -> RotationPlan:
        return RotationPlan(report={"residual": "none"})
