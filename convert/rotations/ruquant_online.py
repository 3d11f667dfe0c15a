"""RUQuant stage 1 per layer and per linear input, online (issue 24 item 1): ``ruquant-online``.

``ruquant`` pools stage 1 over all layers into one absorbed R1, so on a real model it reduces
to a Hadamard plus random signs and one reflection. The paper (and DuQuant, whose code RUQuant
builds on) fits its block transforms per linear input, where each layer's own activations are
seen, and applies them online. This method does that on top of the QuaRot rotations:

* R1 / R2 / R4: the base plan -- ``hadamard`` (randomized Hadamard R1 and per-head R2, the
  Hadamard R4 of down_proj's input) for ``ruquant-online``; RUQuant stage 1+2 (pooled R1 and
  the reflection, its R4) for ``ruquant-online-pooled``. With the same seed, ``ruquant-online``
  draws the very R1 / R2 signs ``hadamard`` draws, so the two differ by the online blocks alone.
* Per layer and per linear input -- ``qkv`` (q/k/v share one), ``o`` (o_proj), ``gate_up``
  (gate/up share one), ``down`` (down_proj, after R4) -- a block-diagonal orthogonal ``B``
  (block 128, or the largest divisor <= 128 of the input size: 96 for 576), fitted by stage 1
  (``ruquant.stage1_blocks``: greedy Householder + Givens steps mapping the worst rows onto
  uniform targets) on the fp model's inputs of that linear, in the basis the served model
  quantizes them (after R1 / R2 / R4). Candidates per site: identity, the stage-1 blocks, a
  block Hadamard, and the block Hadamard followed by stage-1 blocks fitted after it; the one
  with the lowest per-token quantization MSE (the served quantizer: one scale per token over
  the whole row) on HELD-OUT calibration tokens (the last quarter of the sequences; stage 1
  fits on the rest) is kept, so a site keeps its blocks only where they generalise.
* Serving: ``x -> quantize(B(R4(x)))``, the inverse absorbed into the linear (``W -> W diag(B)``,
  ``convert.pipeline``). o_proj's blocks are the format's ``block_diagonal`` online rotation of
  o_proj (``<prefix>.online_rotation``, identity blocks in layers whose fit kept none): the plugin
  serves them, rotating and quantizing in one kernel on the GPU (``kernels.rotate_quant``), within
  each tensor-parallel shard (blocks are fitted to divide the shard). The other sites' blocks --
  q/k/v and gate/up (merged layers in vLLM) and down_proj's after R4 (a second rotation at one
  site) -- are ``<prefix>.online_blocks`` (``convert.simulate``), which the format does not carry:
  ``ruquant-online`` / ``-pooled`` checkpoints are simulation-only (``ruquant-eval``,
  ``examples/quality.py``) and ``ruquant-validate`` and the plugin refuse them;
  ``ruquant-online-o`` checkpoints are served.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from convert.rotations.base import RotationContext, RotationPlan, captured_site_inputs
from convert.rotations.hadamard import HadamardRotation
from convert.rotations.ruquant import STAGE1, RUQuantStage12, Stage1Config, pick_block, row_quant_mse, stage1_blocks
from vllm_ruquant.hadamard import hadamard_matrix, is_hadamard_size

# site -> the linears (last names) that read it; the first one's input is the one captured
SITES: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
BLOCK = 128
MAX_TOKENS = 2048  # calibration tokens per layer (as ``ruquant``'s stage 1)
HOLDOUT = 0.25  # fraction of the calibration sequences that only choose among the candidates


def linear_inputs(ctx: RotationContext, max_tokens: int = MAX_TOKENS) -> list[dict[str, torch.Tensor]]:
    """The fp model's (unrotated, norms folded) input of every site, per layer: {site: (n_seq, seq, k)} fp32
    on the CPU (``base.captured_site_inputs`` over all of ``SITES``)."""
    return captured_site_inputs(ctx, max_tokens, tuple(SITES))


def served_basis(x: dict[str, torch.Tensor], plan: RotationPlan, i: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s site inputs in the basis the served model quantizes them under ``plan`` (before any
    online blocks): qkv / gate_up times R1, o per head times R2, down through R4. float64 (N, k)."""
    out = {}
    r1 = plan.residual
    for site in ("qkv", "gate_up"):
        v = x[site].reshape(-1, x[site].shape[-1]).double()
        out[site] = v @ r1.double() if r1 is not None else v
    o = x["o"].reshape(-1, x["o"].shape[-1]).double()
    if plan.head is not None:
        o = (o.view(o.shape[0], -1, head_dim) @ plan.head.double()).reshape(o.shape)
    out["o"] = o
    d = x["down"].reshape(-1, x["down"].shape[-1])
    r4 = plan.down_proj.get(i)
    out["down"] = r4.apply(d.float()).double() if r4 is not None else d.double()
    return out


def block_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ diag(blocks)`` in float64: x (N, nb * b), blocks (nb, b, b)."""
    nb, b, _ = blocks.shape
    return torch.einsum("nka,kab->nkb", x.reshape(-1, nb, b), blocks.to(x)).reshape(x.shape)


def fit_site(x: torch.Tensor, n_fit: int, bits: int, cfg: Stage1Config, gen: torch.Generator,
             block: int = BLOCK, shards: int = 1) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The best online blocks for one site's served inputs ``x (N, k)`` float64: rows ``[:n_fit]`` fit stage 1,
    the rest choose among identity / blocks / block Hadamard / block Hadamard + blocks by per-token MSE.
    Returns (blocks (nb, b, b) float64 or None for identity, facts)."""
    k = x.shape[1]
    b = pick_block(k // shards, block, need_hadamard=False)  # a row-parallel input: blocks within a shard
    nb = k // b
    fit, held = x[:n_fit], x[n_fit:] if x.shape[0] > n_fit else x[:n_fit]
    cands: dict[str, torch.Tensor | None] = {"identity": None}
    blocks, acc = stage1_blocks(fit, b, bits, cfg, gen)
    cands["blocks"] = blocks
    accepted = {"blocks": acc}
    if is_hadamard_size(b) and b > 1:
        hb = (hadamard_matrix(b).to(fit.device, torch.float64) / math.sqrt(b)).expand(nb, b, b).contiguous()
        blocks_h, acc_h = stage1_blocks(block_apply(fit, hb), b, bits, cfg, gen)
        cands["block_hadamard"] = hb
        cands["block_hadamard+blocks"] = hb @ blocks_h
        accepted["block_hadamard+blocks"] = acc_h
    errs = {name: row_quant_mse(block_apply(held, m) if m is not None else held, bits) for name, m in cands.items()}
    choice = min(errs, key=errs.__getitem__)
    return cands[choice], {"block": b, "choice": choice, "held_out_row_mse": errs, "accepted_steps": accepted}


class RUQuantOnline:
    """``base`` plan (Hadamard) + stage-1 online blocks per layer and linear input."""

    name = "ruquant-online"
    sites: tuple[str, ...] = tuple(SITES)  # the inputs that get online blocks

    def __init__(self, stage1: Stage1Config | None = None, block: int = BLOCK) -> None:
        self.cfg1 = stage1 or STAGE1
        self.block = block

    def base_plan(self, ctx: RotationContext) -> RotationPlan:
        return HadamardRotation().plan(ctx)

    def plan(self, ctx: RotationContext) -> RotationPlan:
        if ctx.layer_states is None or ctx.layer_tensors is None:
            raise ValueError("ruquant-online needs calibration access (RotationContext.layer_states / layer_tensors)")
        t0 = time.perf_counter()
        base = self.base_plan(ctx)
        t_base = time.perf_counter()
        bits = ctx.fmt.activation.bits if ctx.fmt.activation.bits <= 8 else 4
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        inputs = linear_inputs(ctx)
        t_inputs = time.perf_counter()
        blocks: dict[int, dict[str, torch.Tensor]] = {}
        per_layer: list[dict[str, Any]] = []
        for i, x in enumerate(inputs):
            n_seq, seq = x["qkv"].shape[:2]
            n_held = min(n_seq - 1, max(1, round(HOLDOUT * n_seq))) if n_seq > 1 else 0
            n_fit = (n_seq - n_held) * seq
            rep: dict[str, Any] = {}
            for site, v in served_basis(x, base, i, ctx.dims.head_dim).items():
                if site not in self.sites:
                    continue
                shards = ctx.fmt.act_shards(SITES[site][0])  # row-parallel inputs: blocks within a TP shard
                m, facts = fit_site(v.to(ctx.device), n_fit, bits, self.cfg1, gen, self.block, shards)
                rep[site] = facts
                if m is not None:
                    mc = m.cpu().contiguous()
                    for name in SITES[site]:  # readers of one input share one tensor
                        blocks.setdefault(i, {})[name] = mc
            per_layer.append(rep)
        choices = {site: {} for site in self.sites}
        gain = {site: [] for site in self.sites}
        for rep in per_layer:
            for site, f in rep.items():
                choices[site][f["choice"]] = choices[site].get(f["choice"], 0) + 1
                e = f["held_out_row_mse"]
                gain[site].append(e[f["choice"]] / max(e["identity"], 1e-30))
        report = dict(base.report)
        report["online_blocks"] = {
            "method": self.name, "sites": list(self.sites), "act_bits_proxy": bits, "holdout": HOLDOUT,
            "choices": choices,
            "mean_held_out_mse_ratio_vs_identity": {s: sum(g) / len(g) for s, g in gain.items() if g},
            "layers": per_layer,
            "timings": {"base_s": t_base - t0, "inputs_s": t_inputs - t_base,
                        "fit_s": time.perf_counter() - t_inputs},
        }
        report["seconds"] = time.perf_counter() - t0
        return RotationPlan(residual=base.residual, head=base.head, down_proj=base.down_proj, report=report,
                            norm_scales=base.norm_scales, stages={**base.stages, "base": base},
                            linear_blocks=blocks)


class RUQuantOnlinePooled(RUQuantOnline):
    """The online blocks on top of RUQuant stage 1+2 (pooled R1 + reflection, its R4)."""

    name = "ruquant-online-pooled"

    def base_plan(self, ctx: RotationContext) -> RotationPlan:
        return RUQuantStage12().plan(ctx)


class RUQuantOnlineO(RUQuantOnline):
    """Online blocks on o_proj's input only (the one input without an online rotation across heads; on
    SmolLM2-135M the only site whose held-out gain carried over to another text)."""

    name = "ruquant-online-o"
    sites = ("o",)
