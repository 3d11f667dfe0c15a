"""The interface every rotation method implements, and the registry the CLI picks from.

A method returns a ``RotationPlan``: the residual rotation R1 (absorbed offline into
embeddings, every linear and lm_head), the per-head V/O rotation R2 (absorbed offline),
and for each layer the online rotation R4 of down_proj's input (executed by the plugin,
absorbed into down_proj's weight offline). All matrices act on row vectors: x -> x @ Q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from convert.errors import ConvertError, ExitCode
from vllm_ruquant.checkpoint.format import RUQuantFormat
from vllm_ruquant.checkpoint.models import ModelDims
from vllm_ruquant.reference import OnlineRotation


@dataclass
class RotationPlan:
    residual: torch.Tensor | None = None  # R1 (d, d), float64, orthogonal
    head: torch.Tensor | None = None  # R2 (head_dim, head_dim), float64, orthogonal
    down_proj: dict[int, OnlineRotation] = field(default_factory=dict)  # layer -> R4
    report: dict = field(default_factory=dict)  # method-specific facts for ruquant_report.json
    # layer -> {norm name: s (d,)}: the norm weight becomes 1/s and its readers' input columns
    # are multiplied by s (OSTQuant-style smoothing in the rotated basis; function preserved)
    norm_scales: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    # intermediate plans (e.g. "hadamard", "stage1"), for the Lloyd-Max / QSUR diagnostics
    stages: dict[str, RotationPlan] = field(default_factory=dict)


@dataclass
class RotationContext:
    """What a data-driven method may use: dims, a seeded generator, calibration access.

    ``residual_samples()`` yields fp32 (tokens, d) residual-stream inputs of the linears
    (RMSNorm applied, gamma folded), unrotated, for the first layers of the calibration
    set; data-free methods ignore it. ``layer_states`` / ``layer_tensors`` / ``head`` let
    optimising methods (RUQuant stage 2, OSTQuant) run fp and simulated-quant layers.
    """

    dims: ModelDims
    generator: torch.Generator
    device: torch.device
    residual_samples: Callable[[], torch.Tensor] | None = None
    # fp32 hidden states (n_seq, seq, d) entering each decoder layer of the unrotated fp model
    layer_states: Callable[[], list[torch.Tensor]] | None = None
    # one layer's tensors (fp32, RMSNorm gammas folded into the readers, unrotated)
    layer_tensors: Callable[[int], dict[str, torch.Tensor]] | None = None
    # the fp model's final norm (folded) and lm_head as (vocab, d), for logit-level losses
    head: Callable[[], torch.Tensor] | None = None
    # the scheme being converted to (weight / activation / KV-cache bits), for methods that
    # simulate the served quantization
    fmt: RUQuantFormat = field(default_factory=RUQuantFormat)
    finetune: bool = False  # the method's slower, fine-tuned variant (``--finetune``)


class RotationMethod(Protocol):
    name: str

    def plan(self, ctx: RotationContext) -> RotationPlan: ...


_REGISTRY: dict[str, Callable[[], RotationMethod]] = {}


def register_rotation(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def get_rotation_method(name: str) -> RotationMethod:
    import convert.rotations.hadamard  # noqa: F401  (registers methods)
    import convert.rotations.ostquant  # noqa: F401
    import convert.rotations.ruquant  # noqa: F401
    if name not in _REGISTRY:
        raise ConvertError(f"unknown rotation {name!r}; choose one of {', '.join(sorted(_REGISTRY))}",
                           ExitCode.UNSUPPORTED)
    return _REGISTRY[name]()


def available_rotations() -> list[str]:
    get_rotation_method("none")
    return sorted(_REGISTRY)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with sign correction), float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
