"""LRQ: rounding learned through a low-rank per-weight scaling matrix, folded to grid scales.

LRQ (Lee et al., 2024) builds on FlexRound: a weight is rounded as
``q = round(W / (s * S))`` with a per-weight scaling matrix ``S``, but dequantized as
``s * q`` on the common grid ``s``. ``S`` therefore only decides *which integer* each weight
gets, never the served value's scale, so the served format (per-channel / per-group
scales, dequant = q * scale) needs nothing new. LRQ makes ``S`` low-rank to learn it from
little calibration data without overfitting::

    S = exp(L @ U + r + c)      L (N, rank), U (rank, K), r (N, 1), c (1, K)

``L`` starts at zero (``S = 1``: plain RTN) and ``U`` small random (seeded), so the first
gradient step is informative and the start is exactly RTN. ``s`` (per channel / group, log
parametrised) is learned jointly. Rounding uses the straight-through estimator.

**Objective.** The paper reconstructs each decoder block's output. Our quantizer
interface sees one linear at a time with its input Hessian ``H = X^T X / n``, and
``||X W^T - X Wq^T||^2 / n = tr(dW H dW^T)`` exactly, so LRQ here minimises the
per-linear output reconstruction error (not the block's: interactions between the linears
of a block, e.g. through softmax, are not modelled).

**Folding.** After learning, the integers ``q`` are frozen and every row's scales are
refit by least squares under H (``min_s (s q - w) H (s q - w)^T``, a G x G solve per row),
which can only lower the error for those integers. The best of {RTN, learned} is returned,
so LRQ never does worse than RTN on the objective. Cost: ``steps`` x (one N x K x K matmul)
per linear: seconds on a GPU per linear of a 7B model, fine on a CPU for small models.
"""

from __future__ import annotations

import torch

from convert.clip import hessian_row_errors, static_scale
from vllm_ruquant.reference import nonzero_scale, qmax_for


def refit_scales(w: torch.Tensor, q: torch.Tensor, group_size: int, hessian: torch.Tensor) -> torch.Tensor:
    """Least-squares scales ``(N, G)`` for fixed integers under H: per row ``A s = b``.

    ``A[g, h] = q_g H_gh q_h^T`` and ``b[g] = q_g H_g: w^T`` with ``q_g`` the row's
    integers restricted to group g (a block-diagonal design over the groups).
    """
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    ng = k // gs
    qd, wd, hd = q.double(), w.double(), hessian.double()
    qg = qd.reshape(n, ng, gs)
    hb = hd.reshape(ng, gs, ng, gs)
    a = torch.einsum("nga,gahb,nhb->ngh", qg, hb, qg)
    b = torch.einsum("nga,gak,nk->ng", qg, hd.reshape(ng, gs, k), wd)
    a = a + 1e-12 * torch.diagonal(a, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None] * torch.eye(
        ng, dtype=a.dtype, device=a.device)
    s = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    return nonzero_scale(s.float())  # keeps the grid's sign (negative on the full-range grid)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LRQQuantizer:
    name = "lrq"
    needs_hessian = True

    def __init__(self, rank: int = 4, steps: int = 200, lr: float = 5e-3, seed: int = 0,
                 clip: str = "none", full_range: bool = False) -> None:
        if rank < 1 or steps < 0:
            raise ValueError(f"LRQ needs rank >= 1 and steps >= 0, got rank={rank}, steps={steps}")
        self.rank, self.steps, self.lr, self.seed, self.clip = rank, steps, lr, seed, clip
        self.full_range = full_range  # reference.weight_scale's full-range grid: the sign is kept, |s| is trained

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if hessian is None:
            raise ValueError("LRQ needs the input Hessian")
        n, k = w.shape
        g = k if group_size == -1 else group_size
        qmax = qmax_for(bits)
        dev = w.device
        h = hessian.to(dev).float()
        w = w.float()
        norm = float(hessian_row_errors(w.double(), h.double()).sum().clamp_min(1e-30))
        scale0 = static_scale(w, bits, group_size, h, self.clip, self.full_range)
        sign = scale0.sign().repeat_interleave(g, dim=1)

        def integers(log_s: torch.Tensor, lmat: torch.Tensor, umat: torch.Tensor, r: torch.Tensor,
                     c: torch.Tensor, ste: bool) -> tuple[torch.Tensor, torch.Tensor]:
            s_full = sign * log_s.exp().repeat_interleave(g, dim=1)
            z = w / (s_full * torch.exp(lmat @ umat + r + c))
            q = torch.clamp(_round_ste(z) if ste else torch.round(z), -qmax - 1, qmax)
            return q, s_full

        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        log_s = scale0.abs().log().clone().requires_grad_(True)
        lmat = torch.zeros(n, self.rank, device=dev, requires_grad=True)
        umat = (torch.randn(self.rank, k, generator=gen) * 0.01).to(dev).requires_grad_(True)
        r = torch.zeros(n, 1, device=dev, requires_grad=True)
        c = torch.zeros(1, k, device=dev, requires_grad=True)
        params = [log_s, lmat, umat, r, c]
        opt = torch.optim.Adam(params, lr=self.lr)
        best_loss, best_q = float("inf"), None
        for _ in range(self.steps):
            q, s_full = integers(*params, ste=True)
            dw = q * s_full - w
            loss = ((dw @ h) * dw).sum() / norm
            if float(loss.detach()) < best_loss:  # the forward is exact (STE only changes the backward)
                best_loss, best_q = float(loss.detach()), q.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        candidates = []
        with torch.no_grad():
            q_rtn = torch.clamp(torch.round(w / scale0.repeat_interleave(g, dim=1)), -qmax - 1, qmax)
            tries = [(q_rtn, scale0), (integers(*params, ste=False)[0], None)]
            if best_q is not None:
                tries.append((best_q, None))
            for q_try, s_try in tries:
                s_fit = refit_scales(w, q_try, group_size, h)
                for s in (s_try, s_fit) if s_try is not None else (s_fit,):
                    dw = q_try.double() * s.double().repeat_interleave(g, dim=1) - w.double()
                    candidates.append((float(hessian_row_errors(dw, h.double()).sum()), q_try, s))
        _, q_best, s_best = min(candidates, key=lambda t: t[0])
        return q_best.to(torch.int8), s_best.float().contiguous()
