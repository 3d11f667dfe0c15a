"""SEPTQ: element importance -> static global mask -> two-step quantize-and-update.

SEPTQ (Liu et al., KDD 2025) scores every element of the weight matrix, fixes a *static,
global* mask of the important locations once (no re-selection during the sweep), and then
quantizes column by column while updating the not-yet-quantized weights to compensate.
The paper keeps the masked elements in 16 bits; our served format stores every weight on
the integer grid (dequant = q * scale, no sparse fp side matrix), so here the mask decides
*when* an element is quantized instead of *whether*:

1. **Importance and mask.** Score ``s_ij = w_ij^2 / [H^-1]_jj``, the OBS saliency: the
   increase of the layer-output error ``dw H dw^T`` if ``w_ij`` is perturbed to zero while
   every other weight of its row re-adjusts optimally. Unlike ``w^2 diag(H)`` it accounts
   for input correlations (a weight whose input is well predicted by other inputs is
   cheap to disturb, because those can take over). The top ``fraction`` of all elements of
   the matrix (one global threshold, not per row) forms the mask.
2. **Step one: important elements first, exact compensation.** The masked elements of a
   row are rounded to the grid, and the *whole rest of the row* absorbs their error through
   the multi-element OBS update ``dw = -H^-1[:, S] (H^-1[S, S])^-1 e_S`` (a small
   ``|S| x |S|`` solve per row, batched). They are the ones whose error costs most, and at
   this point every other weight is still free to compensate for them.
3. **Step two: GPTQ-style sweep for the rest.** Columns are processed in order with the
   inverse-Hessian Cholesky update of GPTQ; masked elements keep their integers from step
   one (any drift from later compensation becomes error that flows to later columns).

Scales are fixed before step one (per channel / group, optionally GBS-clipped), so the
result lies exactly on the grid of ``vllm_ruquant.reference``. Cost: one GPTQ sweep plus
one batched ``|S| x |S|`` solve per row (``fraction`` = 2% keeps that small).
"""

from __future__ import annotations

import torch

from convert.clip import static_scale
from convert.quantizers.gptq import gptq_sweep, inverse_hessian_cholesky
from vllm_ruquant.reference import qmax_for

SCORES = ("obs", "diag")


def importance_scores(w: torch.Tensor, hessian: torch.Tensor, hinv_diag: torch.Tensor,
                      kind: str = "obs") -> torch.Tensor:
    """Element importance ``(N, K)``: OBS saliency ``w^2 / [H^-1]_jj`` or ``w^2 H_jj``."""
    if kind == "obs":
        return w.double().pow(2) / hinv_diag.unsqueeze(0)
    if kind == "diag":
        return w.double().pow(2) * torch.diag(hessian).double().unsqueeze(0)
    raise ValueError(f"unknown SEPTQ score {kind!r}; choose one of {SCORES}")


def global_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of all elements (one threshold for the matrix)."""
    count = int(round(fraction * scores.numel()))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.view(-1)[torch.topk(scores.reshape(-1), count).indices] = True
    return mask


def _quantize_important_first(wq: torch.Tensor, mask: torch.Tensor, scale_full: torch.Tensor,
                              hinv: torch.Tensor, qmax: int, max_elems: int = 1 << 24) -> torch.Tensor:
    """Step one, in place: round each row's masked set S, let the rest of the row compensate.

    With every other weight of the row free, the error of ``w_S`` costs
    ``e_S^T (H^-1[S, S])^-1 e_S``: the marginal problem on S has inverse Hessian
    ``A = H^-1[S, S]``. S is rounded in column order with GPTQ's update on that marginal
    (Cholesky of A), then the rest of the row moves by the multi-element OBS update
    ``dw = -H^-1[:, S] A^-1 e_S``, the exact minimiser of ``dw H dw^T`` given ``dw_S``.
    Rows are batched with their index sets padded (padding: identity block, zero error).
    Returns the integers of the masked elements (0 elsewhere).
    """
    n, k = wq.shape
    q_out = torch.zeros_like(wq)
    counts = mask.sum(1)
    m = int(counts.max()) if n else 0
    if m == 0:
        return q_out
    # each row's masked columns first, in column order; padding slots hold distinct unmasked columns
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=wq.device).unsqueeze(0) < counts.unsqueeze(1)
    chunk = max(1, max_elems // max(1, m * k))
    eye = torch.eye(m, dtype=wq.dtype, device=wq.device)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        idx, okf = order[r0:r1], valid[r0:r1].to(wq.dtype)
        pair = okf.unsqueeze(-1) * okf.unsqueeze(-2)
        a = hinv[idx.unsqueeze(-1), idx.unsqueeze(-2)] * pair + eye * (1 - pair)
        u = torch.linalg.cholesky(a, upper=True)
        w_s = wq[r0:r1].gather(1, idx) * okf
        s = scale_full[r0:r1].gather(1, idx)
        cur, qs = w_s.clone(), torch.zeros_like(w_s)
        for t in range(m):
            qt = torch.clamp(torch.round(cur[:, t] / s[:, t]), -qmax - 1, qmax) * okf[:, t]
            qs[:, t] = qt
            e = (cur[:, t] - qt * s[:, t]) / u[:, t, t]
            cur[:, t:] -= e.unsqueeze(1) * u[:, t, t:]
        e_s = (w_s - qs * s) * okf
        x = torch.linalg.solve(a, e_s.unsqueeze(-1)).squeeze(-1) * okf
        wq[r0:r1] -= torch.einsum("nm,nmk->nk", x, hinv[idx])
        q_out[r0:r1].scatter_(1, idx, qs)
    return q_out


class SEPTQQuantizer:
    name = "septq"
    needs_hessian = True

    def __init__(self, fraction: float = 0.02, score: str = "obs", block_size: int = 128,
                 damp: float = 0.01, clip: str = "none", full_range: bool = False) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"SEPTQ fraction must be in [0, 1], got {fraction}")
        if score not in SCORES:
            raise ValueError(f"unknown SEPTQ score {score!r}; choose one of {SCORES}")
        self.fraction, self.score, self.block_size, self.damp, self.clip = fraction, score, block_size, damp, clip
        self.full_range = full_range  # reference.weight_scale's full-range grid

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if hessian is None:
            raise ValueError("SEPTQ needs the input Hessian")
        n, k = w.shape
        g = k if group_size == -1 else group_size
        qmax = qmax_for(bits)
        hessian = hessian.to(w.device)
        scale = static_scale(w, bits, group_size, hessian, self.clip, self.full_range)
        scale_full = scale.double().repeat_interleave(g, dim=1)  # (N, K)
        u, dead = inverse_hessian_cholesky(hessian, self.damp)
        hinv = u.T @ u  # damped H^-1, consistent with the sweep's Cholesky factor

        wq = w.double().clone()
        wq[:, dead] = 0
        # step 0: importance scores and the static global mask
        mask = global_mask(importance_scores(wq, hessian, torch.diag(hinv), self.score), self.fraction)
        mask[:, dead] = False
        # step 1: important elements to the grid, the rest of each row compensates exactly
        q_fixed = _quantize_important_first(wq, mask, scale_full, hinv, qmax)

        # step 2: GPTQ sweep over the rest; masked elements keep their integers (their drift
        # under earlier columns' updates is treated as error and flows to later columns)
        q = gptq_sweep(wq, u, lambda b0, b1: scale_full[:, b0:b1], qmax, self.block_size, fixed=q_fixed,
                       fixed_mask=mask)
        return q, scale
