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

from convert.modeling import decoder_layer, dense_linear, rope_tables
from vllm_ruquant.checkpoint.format import RUQuantFormat
from vllm_ruquant.checkpoint.models import NORM_READERS, ModelDims
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
    calib_seq_len: int = 2048  # tokens of a calibration sequence (sizes a training step's memory)


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


# The first linear that reads each site's input (q / k / v share one input, gate / up another).
SITE_READERS: dict[str, str] = {"qkv": "q_proj", "o": "o_proj", "gate_up": "gate_proj", "down": "down_proj"}


@torch.no_grad()
def captured_site_inputs(ctx: RotationContext, max_tokens: int,
                         sites: tuple[str, ...] = tuple(SITE_READERS)) -> list[dict[str, torch.Tensor]]:
    """Per layer, the fp model's input (unrotated, norms folded) of each of ``sites``: (n_seq, seq, k) fp32
    on the CPU, from the first ``max_tokens`` tokens of the layer's input states, captured through the
    linear callback of one fp forward of the layer (``decoder_layer``), so no site's input is rebuilt by
    hand. Rotations are applied afterwards, so every stage sees the same tokens."""
    assert ctx.layer_states is not None and ctx.layer_tensors is not None
    readers = {SITE_READERS[s]: s for s in sites}
    out = []
    for i, h in enumerate(ctx.layer_states()):
        n = max(1, min(h.shape[0], max_tokens // h.shape[1]))
        h = h[:n].to(ctx.device).float()
        sd = ctx.layer_tensors(i)
        dense = dense_linear(sd.__getitem__)
        seen: dict[str, torch.Tensor] = {}
        # the gammas are folded into the readers: a context may leave the (all-ones) norm weights out
        folded = {f"{ctx.dims.layer_prefix(i)}.{norm}.weight" for norm in NORM_READERS}

        def get(name: str, sd=sd, folded=folded) -> torch.Tensor | None:  # noqa: ANN001
            return sd.get(name) if name in folded else sd[name]

        def capture(prefix: str, x: torch.Tensor, dense=dense, seen=seen) -> torch.Tensor:  # noqa: ANN001
            site = readers.get(prefix.rsplit(".", 1)[-1])
            if site is not None:
                seen[site] = x.float().cpu()
            return dense(prefix, x)

        decoder_layer(h, i, ctx.dims, capture, get, rope_tables(ctx.dims, h.shape[1], ctx.device))
        out.append(seen)
    return out


def site_inputs(ctx: RotationContext, max_tokens: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Unrotated fp inputs of the three sites the residual and down_proj rotations act on, per layer:
    {"qkv": (N, d), "gate_up": (N, d), "down": (N, I)} (``captured_site_inputs``, tokens flattened)."""
    return [{s: x.reshape(-1, x.shape[-1]) for s, x in layer.items()}
            for layer in captured_site_inputs(ctx, max_tokens, ("qkv", "gate_up", "down"))]
