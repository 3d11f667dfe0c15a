"""The interface every rotation method implements (``convert.rotations`` registers them).

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
import torch.nn.functional as F

from convert.modeling import attention_block, dense_linear, rms_norm, rope_tables
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
    # layer -> {linear's last name (q_proj ... down_proj): B (nb, b, b) float64}: an online
    # block-diagonal rotation of that linear's input, applied after R1 / R2 / R4 (the served
    # input is ``blocks(R4(x))``); the converter absorbs it (W -> W diag(B)) and stores B
    # (``convert.simulate.ONLINE_BLOCKS``). ``ruquant-online`` fits one per layer and input.
    linear_blocks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


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
    # fp32 hidden states (n_seq, seq, d) entering each decoder layer of the unrotated fp model;
    # called with no argument: at most 2048 calibration tokens; ``layer_states(max_tokens)``: more
    layer_states: Callable[..., list[torch.Tensor]] | None = None
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


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with sign correction), float64."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


@torch.no_grad()
def site_inputs(ctx: RotationContext, max_tokens: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Unrotated fp inputs of every site, per layer: {"qkv": (N, d), "gate_up": (N, d), "down": (N, I)}.

    Computed once from the fp model's layer input states (attention is run to get the MLP
    input); rotations are applied afterwards, so every stage sees the same tokens.
    """
    assert ctx.layer_states is not None and ctx.layer_tensors is not None
    dims = ctx.dims
    out = []
    for i, h in enumerate(ctx.layer_states()):
        n = max(1, min(h.shape[0], max_tokens // h.shape[1]))
        h = h[:n].to(ctx.device).float()
        sd = ctx.layer_tensors(i)
        lin = dense_linear(sd.__getitem__)
        p = dims.layer_prefix(i)
        rope = rope_tables(dims, h.shape[1], ctx.device)
        x_attn = rms_norm(h, None, dims.rms_norm_eps)
        h_mid = h + attention_block(h, p, dims, lin, sd.__getitem__, rope)
        x_mlp = rms_norm(h_mid, None, dims.rms_norm_eps)
        x_down = F.silu(lin(f"{p}.mlp.gate_proj", x_mlp)) * lin(f"{p}.mlp.up_proj", x_mlp)
        out.append({"qkv": x_attn.reshape(-1, dims.hidden_size).cpu(),
                    "gate_up": x_mlp.reshape(-1, dims.hidden_size).cpu(),
                    "down": x_down.reshape(-1, dims.intermediate_size).cpu()})
    return out
