"""Lloyd-Max and QSUR diagnostics of a rotation plan, per quantization site and per stage.

Why: RUQuant's argument is that a uniform quantizer is only Lloyd-Max optimal when the
values inside each quantization interval are spread uniformly; otherwise the optimal
(conditional-mean) reconstruction point drifts away from the interval midpoint that the
uniform quantizer uses. This module measures exactly that, on calibration activations,
before and after each transform of a plan, so a conversion report shows whether a
rotation moved the activations toward the uniform quantizer's assumption:

* ``shift``: mean |E[x/s | cell j] - j| over all quantized values, in quantization steps
  (``s`` the per-token scale, cell ``j`` = [j - 1/2, j + 1/2) in step units; 0 = every
  cell's conditional mean sits on its reconstruction point, i.e. Lloyd-Max optimal). The
  top cell is half a cell wide because ``absmax`` maps to ``qmax``; this biases every
  transform alike.
* ``mse``: relative quantization error ``|x - Q(x)|^2 / |x|^2`` of dynamic per-token
  symmetric quantization, the arithmetic of ``vllm_ruquant.reference.quantize_activation``.
* ``qsur_per_dim``: OSTQuant's quantization space utilisation rate, normalised per
  dimension: ``prod(lambda_i)^(1/2k) / sqrt(max_i C_ii)`` for the second-moment matrix C
  of the k-dimensional site (1 = the data ellipsoid fills the hypercube the quantizer
  spans, i.e. isotropic and balanced). ``qsur_log10`` is the full volume ratio
  ``vol(ellipsoid) / vol(bounding hypercube)`` in log10 (tiny for large k, hence the
  per-dimension figure).

Sites: ``qkv`` (input of q/k/v: the normed residual, rotated by R1), ``gate_up`` (input of
gate/up: the normed residual after attention, R1) and ``down`` (input of down_proj, R4).
The o_proj input (R2 only) is not analysed. With 16-bit activations (W4A16) nothing is
quantized at serving time; the report then shows the 4-bit figures as a reference.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch

from convert.rotations.base import RotationContext, RotationPlan, site_inputs

PLOT_NAME = "ruquant_lloyd_max.png"
SITES = ("qkv", "gate_up", "down")


def lloyd_max_stats(x: torch.Tensor, bits: int) -> dict[str, float]:
    """Midpoint shift (in steps) and relative MSE of per-token symmetric quantization of ``x (N, k)``."""
    x = x.double()
    qmax = (1 << (bits - 1)) - 1
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-30)
    u = x / scale
    q = torch.round(u).clamp(-qmax - 1, qmax)
    err = u - q  # position inside the cell, in steps, relative to its reconstruction point
    idx = (q + qmax + 1).long().reshape(-1)
    sums = torch.zeros(2 * qmax + 2, dtype=torch.float64).index_add_(0, idx, err.reshape(-1))
    # sum_j count_j |mean_j| / N  ==  sum_j |sum_j| / N
    shift = float(sums.abs().sum() / err.numel())
    mse = float(((err * scale) ** 2).sum() / (x**2).sum().clamp_min(1e-30))
    return {"shift": shift, "mse": mse}


def qsur(x: torch.Tensor) -> dict[str, float]:
    """OSTQuant's QSUR of ``x (N, k)`` from its second moment (symmetric quantization is about 0)."""
    x = x.double()
    n, k = x.shape
    diag_max = float((x * x).sum(0).max()) / n  # max_i C_ii
    if n < k:
        # C = X^T X / n has rank <= n and the same nonzero eigenvalues as X X^T / n (the rest are
        # zero): an n x n problem instead of k x k -- 1024^3 instead of 28672^3 for a 70B down_proj,
        # seconds instead of hours on a CPU. Both are clamped to the same floor below.
        lam = torch.linalg.eigvalsh(x @ x.T / n)
        lam = torch.cat([lam, lam.new_zeros(k - n)])
    else:
        lam = torch.linalg.eigvalsh(x.T @ x / n)
    lam = lam.clamp_min(diag_max * 1e-9)
    half_log_det = 0.5 * float(lam.log().sum())
    half_log_max = 0.5 * math.log(diag_max)
    log_ball = (k / 2) * math.log(math.pi) - math.lgamma(k / 2 + 1)
    log_ratio = log_ball + half_log_det - k * (math.log(2.0) + half_log_max)
    return {"qsur_per_dim": math.exp(half_log_det / k - half_log_max), "qsur_log10": log_ratio / math.log(10)}


def transformed(x: dict[str, torch.Tensor], plan: RotationPlan, i: int) -> dict[str, torch.Tensor]:
    """The site inputs of layer ``i`` as the served model quantizes them under ``plan``."""
    r1 = plan.residual
    scales = plan.norm_scales.get(i, {})
    out = {}
    for site, norm in (("qkv", "input_layernorm"), ("gate_up", "post_attention_layernorm")):
        v = x[site].double() @ r1 if r1 is not None else x[site].double()
        if norm in scales:
            v = v / scales[norm].double()
        out[site] = v
    r4 = plan.down_proj.get(i)
    out["down"] = r4.apply(x["down"]).double() if r4 is not None else x["down"].double()
    for site, reader in (("qkv", "q_proj"), ("gate_up", "gate_proj"), ("down", "down_proj")):
        blocks = plan.linear_blocks.get(i, {}).get(reader)  # ruquant-online's blocks after R1 / R4
        if blocks is not None:
            nb, b, _ = blocks.shape
            v = out[site]
            out[site] = torch.einsum("nka,kab->nkb", v.reshape(-1, nb, b), blocks.to(v)).reshape(v.shape)
    return out


def plan_diagnostics(ctx: RotationContext, plan: RotationPlan, max_tokens: int = 1024) -> dict[str, Any]:
    """Per site, per stage (``none``, the plan's intermediate stages, ``final``), per layer metrics."""
    if ctx.layer_states is None or ctx.layer_tensors is None:
        return {}
    bits = ctx.fmt.activation.bits if ctx.fmt.activation.bits <= 8 else 4
    stages = {"none": RotationPlan(), **plan.stages, "final": plan}
    inputs = site_inputs(ctx, max_tokens)
    per: dict[str, dict[str, dict[str, list[float]]]] = {s: {} for s in SITES}
    for name, st in stages.items():
        for site in SITES:
            per[site][name] = {"shift": [], "mse": [], "qsur_per_dim": [], "qsur_log10": []}
        for i, x in enumerate(inputs):
            for site, v in transformed(x, st, i).items():
                rec = per[site][name]
                for k, val in {**lloyd_max_stats(v, bits), **qsur(v)}.items():
                    rec[k].append(val)
    summary = {site: {name: {k: sum(v) / len(v) for k, v in rec.items()} for name, rec in per[site].items()}
               for site in SITES}
    return {"bits": bits, "tokens_per_layer": int(inputs[0]["qkv"].shape[0]) if inputs else 0,
            "stages": list(stages), "summary": summary, "per_layer": per}


def plot_png(diag: dict[str, Any] | None, title: str) -> bytes | None:
    """A 2 x 3 figure (MSE and midpoint shift per layer, per site; one line per stage), or None."""
    if not diag or not diag.get("per_layer"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a [test] extra; the report has the numbers anyway
        return None
    fig, axes = plt.subplots(2, len(SITES), figsize=(4.2 * len(SITES), 6.5), squeeze=False)
    for col, site in enumerate(SITES):
        for row, metric in enumerate(("mse", "shift")):
            ax = axes[row][col]
            for stage in diag["stages"]:
                ys = diag["per_layer"][site][stage][metric]
                ax.plot(range(len(ys)), ys, marker="o", ms=3, label=stage)
            ax.set_yscale("log")
            ax.set_title(f"{site}: {'relative quant. MSE' if metric == 'mse' else 'Lloyd-Max midpoint shift'}")
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title}: A{diag['bits']} per-token quantization, before/after each transform")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
