"""GPTQ: column-by-column rounding with second-order error compensation.

For ``min ||X W^T - X Q^T||`` GPTQ quantizes one input column at a time and spreads its
rounding error over the not-yet-quantized columns through the inverse Hessian's Cholesky
factor (Frantar et al., 2022). Scales are fixed before the sweep (per channel, or per
group from the original weights of that group), so the result lies exactly on the grid
of ``vllm_ruquant.reference`` and the served kernel reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from convert.clip import static_scale
from convert.errors import ConvertError, ExitCode
from convert.hessian import float64_copy
from vllm_ruquant.reference import qmax_for


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float, perm: torch.Tensor | None = None,
                             device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 after damping, on ``device`` (default: the Hessian's); also the
    mask of dead input columns. ``perm`` (act order, on ``device``): of ``H[perm][:, perm]``.

    Memory: at a 70B down_proj (K = 28672) one fp64 K x K matrix is 6.6 GB. The damped copy is made once,
    a block of rows at a time from the caller's Hessian wherever it is (the host, in the converter), so
    no fp32 or permuted copy of the Hessian sits on the device beside it; it is freed as soon as its lower
    factor exists, and the lower factor once inverted: at most two fp64 matrices alive (the 35 GiB GPU
    peak of benchmarks/results/gpu-2026-12-04d/scale had ~6). Same values as adding ``damp * I``: the
    off-diagonal entries only ever had zeros added. A Hessian that is not positive definite after
    damping is damped harder (x1, x10, ... the mean diagonal) from a fresh copy.
    """
    device = hessian.device if device is None else device
    diag = torch.diag(hessian).to(device)
    dead = (diag if perm is None else diag[perm]) == 0
    extra = 0.0  # the harder damping of earlier failed attempts, in units of the damped mean diagonal
    for attempt in range(5):
        h = float64_copy(hessian, device, perm)
        h[dead, dead] = 1.0
        h.diagonal().add_(damp * torch.diag(h).mean())
        if extra:
            h.diagonal().add_(extra * torch.diag(h).mean())
        try:
            lower = torch.linalg.cholesky(h)
            del h
            hinv = torch.cholesky_inverse(lower)
            del lower
            return torch.linalg.cholesky(hinv, upper=True), dead
        except RuntimeError:  # not positive definite: damp harder
            extra += 10**attempt * damp
    raise ConvertError("GPTQ: the calibration Hessian is singular; use more calibration text",
                       ExitCode.NUMERICS)


ScaleColumns = Callable[[int, int], torch.Tensor]


def group_scale_columns(scale: torch.Tensor, group: int, perm: torch.Tensor | None = None) -> ScaleColumns:
    """Per-column fp64 scales of columns ``[b0, b1)`` (in sweep order, ``perm`` for act order) from the
    per-group ``scale (N, G)``: what ``scale.repeat_interleave(group, 1)[:, perm]`` holds, one block at a
    time instead of an (N, K) fp64 copy (1.9 GB at a 70B down_proj)."""
    scale_d = scale.double()
    order = perm if perm is not None else torch.arange(scale.shape[1] * group, device=scale.device)

    def cols(b0: int, b1: int) -> torch.Tensor:
        return scale_d[:, order[b0:b1] // group]
    return cols


def gptq_sweep(wq: torch.Tensor, u: torch.Tensor, scale_cols: ScaleColumns, qmax: int, block_size: int,
               fixed: torch.Tensor | None = None, fixed_mask: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column sweep: round each column on its scale, push the error to later columns.

    ``wq`` (N, K) float64 is updated in place; ``u`` is the upper Cholesky factor of H^-1;
    ``scale_cols(b0, b1)`` the (N, b1 - b0) per-element scales of a block of columns. Where
    ``fixed_mask`` is set, the integer is taken from ``fixed`` instead of rounded (SEPTQ's
    pre-quantized important elements), and its drift flows on as error like any other.
    Returns int8 (N, K).
    """
    n, k = wq.shape
    q = torch.zeros(n, k, dtype=torch.int8, device=wq.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        blk = wq[:, b0:b1].clone()
        err = torch.zeros_like(blk)
        ub = u[b0:b1, b0:b1]
        sblk = scale_cols(b0, b1)
        for j in range(b1 - b0):
            col, s = blk[:, j], sblk[:, j]
            qc = torch.clamp(torch.round(col / s), -qmax - 1, qmax)
            if fixed_mask is not None:
                qc = torch.where(fixed_mask[:, b0 + j], fixed[:, b0 + j], qc)
            q[:, b0 + j] = qc.to(torch.int8)
            e = (col - qc * s) / ub[j, j]
            blk[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            err[:, j] = e
        wq[:, b1:] -= err @ u[b0:b1, b1:]
    return q


class GPTQQuantizer:
    name = "gptq"
    needs_hessian = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, clip: str = "none", act_order: bool = False,
                 full_range: bool = False) -> None:
        self.block_size = block_size
        self.damp = damp
        self.clip = clip  # "gbs": static scales from per-channel clip ratios searched under H
        # sweep the input columns in decreasing order of the Hessian diagonal (GPTQ's "act order"):
        # the most active inputs are rounded first, while the most columns are left to absorb their
        # error. The scales are static (fixed before the sweep), so the result lies on the same grid.
        self.act_order = act_order
        self.full_range = full_range  # reference.weight_scale's full-range grid (scale signs per group)

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if hessian is None:
            raise ValueError("GPTQ needs the input Hessian")
        n, k = w.shape
        # static: from the original weights, before the sweep
        scale = static_scale(w, bits, group_size, hessian, self.clip, self.full_range)
        g = k if group_size == -1 else group_size
        qmax = qmax_for(bits)
        wq = w.double().clone()
        perm = None
        if self.act_order:
            perm = torch.argsort(torch.diag(hessian).to(w.device), descending=True)
            wq = wq[:, perm]
        u, dead = inverse_hessian_cholesky(hessian, self.damp, perm, w.device)
        wq[:, dead] = 0
        q = gptq_sweep(wq, u, group_scale_columns(scale, g, perm), qmax, self.block_size)
        if self.act_order:
            q = q[:, torch.argsort(perm)]
        return q, scale
