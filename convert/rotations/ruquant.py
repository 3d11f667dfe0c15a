"""RUQuant rotations (seed 000): block-wise Householder + Givens maps (stage 1) and a
fine-tuned global Householder reflection (stage 2), adapted to an absorbed residual R1.

Why: a uniform quantizer is Lloyd-Max optimal only when the values in every quantization
interval are spread uniformly (the conditional mean then sits on the interval midpoint).
RUQuant therefore maps activation vectors, block by block, onto vectors whose entries are
uniformly distributed, using orthogonal matrices that the model absorbs.

What is built (``RotationPlan``)
--------------------------------
* R1 (residual, absorbed offline): ``R1 = Hd @ diag(B_0..B_nb-1) @ Hv`` where ``Hd`` is a
  randomized Hadamard (QuaRot's), ``B_k`` the stage-1 block matrices built on the
  Hadamard-rotated calibration activations, and ``Hv = I - 2 v v^T / |v|^2`` the stage-2
  reflection. The official code builds per-linear online transforms (DuQuant-style); an
  absorbed R1 costs nothing at run time, so stage 1 runs once on the residual-stream inputs
  of q/k/v and gate/up pooled over all layers (docs/research-notes.md, section 3).
* R4 (down_proj input, online, per layer): ``block_diagonal`` with blocks ``H_b @ B_k``
  (block Hadamard then the stage-1 map), executed by the plugin's block-diagonal op -- unless
  the full Hadamard of the intermediate size has a lower quantization MSE summed over the
  layers (blocks <= 256 cannot mix across blocks), then every layer gets the Hadamard.
* R2 (per head V/O, absorbed): the randomized Hadamard, as in QuaRot.

Stage 1, per block (``_composite_blocks``), greedy, deterministic under the seed
-------------------------------------------------------------------------------
K Householder steps: pick the calibration row with the largest |entry| in the block (the
current worst outlier), draw a target ``t ~ U(-1, 1)^b`` rescaled to the row's norm, and
reflect with ``u = x - t`` (maps x exactly onto t). After each reflection, ``givens_rounds``
Givens rounds: a seeded random pairing of the block's coordinates; every pair of the
current worst row is rotated onto a uniformly drawn target pair of the same norm (a
block-diagonal product of b/2 Givens rotations). A step is kept only if it lowers the
block's per-token-per-block quantization MSE on the calibration rows (so stage 1 never
makes the proxy worse). Finally the composition is chosen by measurement: among
{identity, Hadamard, blocks, Hadamard then blocks} the one with the lowest full-row
per-token quantization MSE on the calibration rows (reported as ``r1_choice``).
``Stage1Config.full_row`` (default off) instead keeps an R1 step only if it lowers the
*full-row* per-token MSE (one scale per token, as served), blocks applied in place; off by
default because on the model we measured it changed nothing but the conversion time.

Choices (open in the abstract), and why
---------------------------------------
* Block size 128 for R1 (the official default; for d not divisible by 128, the largest
  divisor <= 128). For R4 the largest divisor of the intermediate size <= 256 that has a
  Hadamard matrix (1536 -> 256, 11008 -> 256, 14336 -> 256, 344 -> 172), so the block Hadamard can be
  folded into each block and the plugin's block op stays small.
* Targets symmetric U(-1, 1) (the official code draws U[0, 1); a symmetric quantizer wants
  sign-symmetric values; both have E[t^2] = 1/3 so the range after rescaling is equal).
* K = 16 Householder steps, 3 Givens rounds each (official defaults: max_rotation_step 16,
  random_permutation_times 3). Greedy acceptance makes larger K safe, only slower.
* Proxy bits: the scheme's activation bits (4 for A16 schemes, for which the choice
  barely matters).

Stage 2 (``_stage2``): one global reflection ``Hv`` appended to R1, ``v`` initialised as in
the official code (worst row after stage 1 minus a uniform target of its norm) and trained
with Adam (lr 2e-3, seeded minibatches) to minimise the relative MSE between the fp
decoder layer's output and the same layer run in the R1 basis with straight-through
simulated quantization (per-token activations at the scheme's bits, RTN per-channel
weights, R4 and the per-head R2 on o_proj's input included, and -- when the context carries
``kv_bits`` < 16 -- the KV cache quantized per token and head with keys Hadamard-rotated,
a straight-through twin of ``convert.simulate.kv_cache_quantizer``). Layer inputs are the
fp model's. Default: 8 layers evenly spaced, 30 steps, 4 sequences per step drawn from a
seeded 75% of the calibration sequences; the other 25% are held out and decide what is kept:
no reflection (stage 1 alone), the initial ``v`` or the trained ``v``, whichever has the
lowest held-out loss, so stage 2 never keeps a reflection that does worse on sequences it
did not train on. ``simulate_weights=False`` (fp weights in the loss, leaving weight error to
GPTQ) is offered as a knob. The pipeline passes the scheme's ``kv_bits`` in
``RotationContext``.

Measurements of these choices (R4 blocks vs Hadamard, ``full_row``, stage 2's keep/drop) and
of RUQuant against Hadamard on a real model: ``docs/methods.md``.

``--finetune`` (the paper's fine-tuned variant): a product of 4 reflections, every layer,
120 steps. Rotation names: ``ruquant-stage1`` (stage 1 only), ``ruquant`` (1 + 2).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from convert.modeling import decoder_layer, rope_tables
from convert.rotations.base import RotationContext, RotationPlan, site_inputs
from convert.rotations.fake_quant import fake_quant
from convert.rotations.hadamard import randomized_hadamard
from convert.simulate import kv_cache_quantizer
from vllm_ruquant.checkpoint.format import KVCacheSpec
from vllm_ruquant.checkpoint.models import READERS, WRITERS
from vllm_ruquant.hadamard import hadamard_matrix, is_hadamard_size
from vllm_ruquant.reference import OnlineRotation

# ----------------------------------------------------------------------------- math


def householder(u: torch.Tensor) -> torch.Tensor:
    """``I - 2 u u^T / |u|^2`` (float64): the reflection that swaps x and t for u = x - t."""
    u = u.double()
    return torch.eye(u.numel(), dtype=torch.float64) - 2.0 * torch.outer(u, u) / (u @ u)


def uniform_target(norm: float, b: int, gen: torch.Generator) -> torch.Tensor:
    """A vector with i.i.d. U(-1, 1) entries rescaled to ``norm`` (float64)."""
    t = torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1
    return t * (norm / t.norm().clamp_min(1e-30))


def reflect(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``y @ householder(u)`` in O(N b) (a rank-1 update) instead of a dense product."""
    return y - (2.0 / (u @ u)) * torch.outer(y @ u, u)


def givens_angles(x: torch.Tensor, perm: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of coordinates (from ``perm``) and the angle turning each pair of ``x`` onto a uniform target pair."""
    b = x.numel()
    pairs = perm[: b - b % 2].view(-1, 2)
    tgt = (torch.rand(pairs.shape[0], 2, generator=gen, dtype=torch.float64) * 2 - 1).to(x.device)
    theta = torch.atan2(tgt[:, 1], tgt[:, 0]) - torch.atan2(x[pairs[:, 1]], x[pairs[:, 0]])
    return pairs, theta


def rotate_pairs(y: torch.Tensor, pairs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``y @ G`` for the block-diagonal Givens product G, in O(N b): (ya, yb) -> (c ya - s yb, s ya + c yb)."""
    c, s = torch.cos(theta), torch.sin(theta)
    ya, yb = y[:, pairs[:, 0]], y[:, pairs[:, 1]]
    out = y.clone()
    out[:, pairs[:, 0]] = c * ya - s * yb
    out[:, pairs[:, 1]] = s * ya + c * yb
    return out


def givens_pairs(x: torch.Tensor, perm: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Dense block-diagonal product of Givens rotations turning each pair of ``x`` onto a uniform target pair."""
    pairs, theta = givens_angles(x, perm, gen)
    return rotate_pairs(torch.eye(x.numel(), dtype=torch.float64), pairs, theta)


def _block_mse(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Relative error of dynamic per-row symmetric quantization of every block of ``y (nb, N, b)``: (nb,)."""
    qmax = (1 << (bits - 1)) - 1
    s = (y.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-30)
    err = y - torch.round(y / s).clamp(-qmax - 1, qmax) * s
    return (err**2).sum((1, 2)) / (y**2).sum((1, 2)).clamp_min(1e-30)


def row_quant_mse(x: torch.Tensor, bits: int) -> float:
    """Relative error of dynamic per-row symmetric quantization (the served activation quantizer)."""
    return float(_block_mse(x.unsqueeze(0), bits)[0])


def block_diag(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


def pick_block(n: int, limit: int, need_hadamard: bool) -> int:
    """The largest divisor of n that is <= limit (and has a Hadamard matrix, when possible)."""
    divs = [b for b in range(min(n, limit), 0, -1) if n % b == 0]
    if need_hadamard:
        had = [b for b in divs if is_hadamard_size(b) and b > 1]
        if had:
            return had[0]
    return divs[0]


# -------------------------------------------------------------------------- stage 1


@dataclass
class Stage1Config:
    steps: int = 16  # Householder steps per block
    givens_rounds: int = 3  # Givens rounds after each Householder step
    max_rows: int = 4096  # calibration rows per block (the worst 1/16 always included)
    full_row: bool = False  # R1: accept a step by the full-row per-token MSE (measured: no gain, see above)


def _sample_rows(x: torch.Tensor, max_rows: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        return x
    worst = x.abs().amax(-1).topk(max_rows // 16).indices
    rand = torch.randperm(x.shape[0], generator=gen)[: max_rows - worst.numel()].to(x.device)
    return x[torch.unique(torch.cat([worst, rand]))]


CPU_BATCH_VALUES = 1 << 20  # stage-1 blocks searched together on the CPU: ~8 MB per temporary


@dataclass
class _BlockDraws:
    """Every random number stage 1 draws for ``nb`` blocks, in the order a block-by-block loop
    draws them (block, step, then the step's Givens rounds): the draws do not depend on the
    data, so the blocks can then be searched in one batch and still give what a sequential
    search with the same generator gives."""

    targets: torch.Tensor  # (nb, steps, b) U(-1, 1) Householder targets
    perms: torch.Tensor  # (nb, steps, rounds, b) Givens pairings
    pair_targets: torch.Tensor  # (nb, steps, rounds, b // 2, 2) U(-1, 1) Givens target pairs

    def select(self, start: int, stop: int) -> _BlockDraws:
        return _BlockDraws(self.targets[start:stop], self.perms[start:stop], self.pair_targets[start:stop])

    @staticmethod
    def draw(nb: int, b: int, cfg: Stage1Config, gen: torch.Generator) -> _BlockDraws:
        t, p, g = [], [], []
        for _ in range(nb * cfg.steps):
            t.append(torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1)
            for _ in range(cfg.givens_rounds):
                p.append(torch.randperm(b, generator=gen))
                g.append(torch.rand(b // 2, 2, generator=gen, dtype=torch.float64) * 2 - 1)
        r = cfg.givens_rounds
        return _BlockDraws(torch.stack(t).view(nb, cfg.steps, b),
                           torch.stack(p).view(nb, cfg.steps, r, b) if r else torch.empty(nb, cfg.steps, 0, b),
                           torch.stack(g).view(nb, cfg.steps, r, b // 2, 2) if r
                           else torch.empty(nb, cfg.steps, 0, b // 2, 2, dtype=torch.float64))


def _worst_rows(y: torch.Tensor) -> torch.Tensor:
    """The row with the largest |entry| of every block: (nb, b)."""
    return y[torch.arange(y.shape[0], device=y.device), y.abs().amax(-1).argmax(-1)]


def _reflect_blocks(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``reflect`` per block: y (nb, M, b), u (nb, b)."""
    return y - (2.0 / (u * u).sum(-1))[:, None, None] * (y @ u[:, :, None]) * u[:, None, :]


def _rotate_pairs_blocks(y: torch.Tensor, pairs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``rotate_pairs`` per block: y (nb, M, b), pairs (nb, b/2, 2), theta (nb, b/2)."""
    i0 = pairs[..., 0][:, None, :].expand(-1, y.shape[1], -1)
    i1 = pairs[..., 1][:, None, :].expand(-1, y.shape[1], -1)
    ya, yb = y.gather(2, i0), y.gather(2, i1)
    c, s = torch.cos(theta)[:, None, :], torch.sin(theta)[:, None, :]
    return y.scatter(2, i0, c * ya - s * yb).scatter(2, i1, s * ya + c * yb)


def _composite_blocks(y: torch.Tensor, bits: int, cfg: Stage1Config,
                      draws: _BlockDraws) -> tuple[torch.Tensor, int]:
    """Greedy Householder + Givens composite of every block of ``y (nb, N, b)``, searched as one
    batch (one kernel launch per step for all blocks, instead of one per block) with the
    blocks' pre-made ``draws``: returns
    (Q (nb, b, b), accepted steps summed over the blocks). Per block: K Householder steps,
    each reflecting the worst row onto a uniform target of its norm, then ``givens_rounds``
    Givens rounds; a step is kept only if it lowers the block's per-token quantization MSE."""
    nb, _, b = y.shape
    dev = y.device
    q = torch.eye(b, dtype=torch.float64, device=dev).repeat(nb, 1, 1)
    cur = y.double()
    best = _block_mse(cur, bits)
    accepted = torch.zeros(nb, dtype=torch.int64, device=dev)

    def keep(ok: torch.Tensor, cand: torch.Tensor, new_q: torch.Tensor, err: torch.Tensor) -> None:
        nonlocal cur, q, best, accepted
        m = ok[:, None, None]
        cur, q = torch.where(m, cand, cur), torch.where(m, new_q, q)
        best, accepted = torch.where(ok, err, best), accepted + ok.long()

    pairs_all = draws.perms[..., : b - b % 2].reshape(nb, cfg.steps, cfg.givens_rounds, b // 2, 2).to(dev)
    for step in range(cfg.steps):
        x = _worst_rows(cur)
        xn = x.norm(dim=-1)
        t = draws.targets[:, step].to(dev)
        u = x - t * (xn / t.norm(dim=-1).clamp_min(1e-30))[:, None]
        valid = u.norm(dim=-1) > 1e-12 * xn.clamp_min(1e-30)
        u = torch.where(valid[:, None], u, torch.ones_like(u))  # a harmless stand-in where x == t
        cand = _reflect_blocks(cur, u)
        err = _block_mse(cand, bits)
        keep(valid & (err < best), cand, _reflect_blocks(q, u), err)
        for rnd in range(cfg.givens_rounds):
            pairs = pairs_all[:, step, rnd]
            tgt = draws.pair_targets[:, step, rnd].to(dev)
            x = _worst_rows(cur)
            theta = (torch.atan2(tgt[..., 1], tgt[..., 0])
                     - torch.atan2(x.gather(1, pairs[..., 1]), x.gather(1, pairs[..., 0])))
            cand = _rotate_pairs_blocks(cur, pairs, theta)
            err = _block_mse(cand, bits)
            keep(err < best, cand, _rotate_pairs_blocks(q, pairs, theta), err)
    return q, int(accepted.sum())


def _composite_block_full_row(x: torch.Tensor, k: int, b: int, bits: int, cfg: Stage1Config,
                              gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """As ``_composite_block`` on block ``k`` of ``x (N, n)`` (modified in place), but a step is kept
    only if it lowers the per-token MSE of the *whole row* (one scale per token, as served)."""
    sl = slice(k * b, (k + 1) * b)
    dev = x.device
    q = torch.eye(b, dtype=torch.float64, device=dev)
    best = row_quant_mse(x, bits)
    accepted = 0

    def trial(new: torch.Tensor) -> float:
        old = x[:, sl].clone()
        x[:, sl] = new
        err = row_quant_mse(x, bits)
        x[:, sl] = old
        return err

    for _ in range(cfg.steps):
        cur = x[:, sl]
        xr = cur[cur.abs().amax(-1).argmax()]
        u = xr - uniform_target(float(xr.norm()), b, gen).to(dev)
        if float(u.norm()) > 1e-12 * max(float(xr.norm()), 1e-30):
            cand = reflect(cur, u)
            err = trial(cand)
            if err < best:
                q, best, accepted = reflect(q, u), err, accepted + 1
                x[:, sl] = cand
        for _ in range(cfg.givens_rounds):
            cur = x[:, sl]
            perm = torch.randperm(b, generator=gen).to(dev)
            pairs, theta = givens_angles(cur[cur.abs().amax(-1).argmax()], perm, gen)
            cand = rotate_pairs(cur, pairs, theta)
            err = trial(cand)
            if err < best:
                q, best, accepted = rotate_pairs(q, pairs, theta), err, accepted + 1
                x[:, sl] = cand
    return q, accepted


def stage1_blocks(x: torch.Tensor, block: int, bits: int, cfg: Stage1Config,
                  gen: torch.Generator, full_row: bool = False) -> tuple[torch.Tensor, int]:
    """Stage-1 matrices for every block of ``x (N, n)``: (nb, b, b) float64, and accepted steps."""
    x = _sample_rows(x.double(), cfg.max_rows, gen)
    nb = x.shape[1] // block
    if not full_row:  # (N, nb * b) -> (nb, N, b): blocks searched in batches
        draws = _BlockDraws.draw(nb, block, cfg, gen)
        y = x.reshape(x.shape[0], nb, block).transpose(0, 1)
        # on the GPU one batch: the block-by-block search was launch- and sync-bound there (8B
        # shape on an H100: R4 113 s for 32 x 56 blocks, batched 53 s, stage 1 in all 131 -> 67 s).
        # On the CPU batches of ~1M values keep temporaries in cache: measured on
        # 4096 x 4096 rows, 128-blocks, 2 busy cores: 18.7 s vs 15.3 s block by block (one
        # 134 MB batch: 27 s), the price of one code path for both devices
        per = nb if y.is_cuda else max(1, CPU_BATCH_VALUES // (y.shape[1] * block))
        parts = [_composite_blocks(y[i:i + per], bits, cfg, draws.select(i, i + per)) for i in range(0, nb, per)]
        return torch.cat([q for q, _ in parts]), sum(a for _, a in parts)
    x = x.clone()
    blocks, acc = [], 0
    for k in range(nb):
        q, a = _composite_block_full_row(x, k, block, bits, cfg, gen)
        blocks.append(q)
        acc += a
    return torch.stack(blocks), acc


def choose_composition(x: torch.Tensor, candidates: dict[str, torch.Tensor], bits: int) -> tuple[str, dict]:
    """The candidate orthogonal matrix with the lowest per-token quantization MSE on ``x``."""
    errs = {name: row_quant_mse(x.double() @ m, bits) for name, m in candidates.items()}
    return min(errs, key=errs.__getitem__), errs


# -------------------------------------------------------------------------- stage 2


@dataclass
class Stage2Config:
    reflections: int = 1
    steps: int = 30
    layers: int = 8  # evenly spaced layers used for the loss (all when <= 0)
    seqs_per_step: int = 4
    lr: float = 2e-3
    holdout: float = 0.25  # fraction of calibration sequences held out for the keep/drop decision
    simulate_kv: bool = True  # KV-cache quantization (keys Hadamard-rotated, as served) in the loss
    simulate_r2: bool = True  # the per-head R2 on o_proj's input in the loss
    simulate_weights: bool = True  # RTN weights in the loss (False: fp weights, GPTQ is left to fix them)


STAGE1 = Stage1Config()
STAGE2 = Stage2Config()
STAGE2_FINETUNE = Stage2Config(reflections=4, steps=120, layers=0)


class _LayerSim:
    """One decoder layer in the stage-1 basis, run fp or with simulated quantization under extra reflections."""

    def __init__(self, ctx: RotationContext, i: int, r1: torch.Tensor, r4: OnlineRotation | None,
                 h_in: torch.Tensor, h_out: torch.Tensor, r2: torch.Tensor | None = None,
                 kv: KVCacheSpec | None = None) -> None:
        dims, dev = ctx.dims, ctx.device
        assert ctx.layer_tensors is not None
        sd = ctx.layer_tensors(i)
        p = dims.layer_prefix(i)
        self.prefix, self.i, self.dims, self.ctx = p, i, dims, ctx
        r = r1.float().to(dev)
        self.w: dict[str, torch.Tensor] = {}
        for name in READERS:
            self.w[f"{p}.{name}"] = sd[f"{p}.{name}.weight"] @ r
        for name in WRITERS:
            self.w[f"{p}.{name}"] = r.T @ sd[f"{p}.{name}.weight"]
        self.bias = {k[: -len(".bias")]: v for k, v in sd.items() if k.endswith(".bias")}
        for name in WRITERS:
            if f"{p}.{name}" in self.bias:
                self.bias[f"{p}.{name}"] = self.bias[f"{p}.{name}"] @ r
        self.r4 = r4
        if r4 is not None:
            self.w[f"{p}.mlp.down_proj"] = self.w[f"{p}.mlp.down_proj"] @ r4.matrix().to(dev)
        # R2 (per head, absorbed into V and O): o_proj sees its input rotated per head
        self.r2 = None if r2 is None else r2.float().to(dev)
        if self.r2 is not None:
            o = self.w[f"{p}.self_attn.o_proj"]
            hd = self.r2.shape[0]
            self.w[f"{p}.self_attn.o_proj"] = (o.view(o.shape[0], -1, hd) @ self.r2).reshape(o.shape)
        self.kv_quant = kv_cache_quantizer(kv or KVCacheSpec(), straight_through=True)
        self.norms = {k: v for k, v in sd.items() if "norm" in k}
        self.h_in = (h_in.to(dev).float() @ r)
        self.h_out = (h_out.to(dev).float() @ r)

    def loss(self, vs: list[torch.Tensor], seqs: torch.Tensor, wbits: int, abits: int) -> torch.Tensor:
        """Relative output MSE of the quantized layer vs fp, all in the basis R1_stage1 @ H(v_1) ... H(v_m)."""
        dims, p = self.dims, self.prefix
        units = [v / v.norm() for v in vs]

        def reflect_rows(x: torch.Tensor) -> torch.Tensor:  # x @ H(v) for each v in order
            for u in units:
                x = x - 2 * (x @ u).unsqueeze(-1) * u
            return x

        w = {}
        for name in READERS:  # W @ H
            w[f"{p}.{name}"] = reflect_rows(self.w[f"{p}.{name}"])
        for name in WRITERS:  # H^T @ W == (W^T @ H)^T
            w[f"{p}.{name}"] = reflect_rows(self.w[f"{p}.{name}"].T).T
        bias = dict(self.bias)
        for name in WRITERS:
            if f"{p}.{name}" in bias:
                bias[f"{p}.{name}"] = reflect_rows(bias[f"{p}.{name}"])

        def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
            xx = x.float()
            if prefix.endswith("down_proj") and self.r4 is not None:
                xx = self.r4.apply(xx)
            if prefix.endswith("o_proj") and self.r2 is not None:
                xx = (xx.view(*xx.shape[:-1], -1, self.r2.shape[0]) @ self.r2).reshape(xx.shape)
            y = fake_quant(xx, abits) @ fake_quant(w[prefix], wbits).T
            return y + bias[prefix] if prefix in bias else y

        h = reflect_rows(self.h_in[seqs])
        target = reflect_rows(self.h_out[seqs])
        rope = rope_tables(dims, h.shape[1], h.device)
        out = decoder_layer(h, self.i, dims, linear, self.norms.__getitem__, rope, self.kv_quant)
        # compare the layer's update (out - h): the residual passes through exactly
        return ((out - target) ** 2).sum() / ((target - h) ** 2).sum().clamp_min(1e-30)


def _stage2(ctx: RotationContext, r1: torch.Tensor, r4s: dict[int, OnlineRotation], v0: torch.Tensor,
            cfg: Stage2Config, r2: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train the reflection vector(s); returns the product of reflections (d, d) float64 and facts."""
    assert ctx.layer_states is not None
    states = ctx.layer_states()
    dims = ctx.dims
    n_layers = dims.num_layers
    pick = list(range(n_layers)) if cfg.layers <= 0 or cfg.layers >= n_layers else \
        sorted({round(j * (n_layers - 1) / (cfg.layers - 1)) for j in range(cfg.layers)}) if cfg.layers > 1 else [0]
    sims = []
    for i in pick:
        if i + 1 < n_layers:
            h_out = states[i + 1]
        else:
            from convert.modeling import dense_linear  # noqa: PLC0415

            assert ctx.layer_tensors is not None
            sd = ctx.layer_tensors(i)
            h = states[i].to(ctx.device).float()
            with torch.no_grad():
                h_out = decoder_layer(h, i, dims, dense_linear(sd.__getitem__), sd.__getitem__,
                                      rope_tables(dims, h.shape[1], ctx.device)).cpu()
        # V is unrotated in this simulation (R2 acts on o_proj's input): the KV quantizer rotates it
        # by the online RHT ("online"), a random Hadamard like the served R2
        kv = dataclasses.replace(ctx.fmt.kv_cache, value_rotation="online") if cfg.simulate_kv else KVCacheSpec()
        sims.append(_LayerSim(ctx, i, r1, r4s.get(i), states[i], h_out,
                              r2 if cfg.simulate_r2 else None, kv))
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
    n_seq = states[0].shape[0]
    abits = ctx.fmt.activation.bits
    # a seeded split: training minibatches come from ``train``, the keep/drop decision from ``held``
    order = torch.randperm(n_seq, generator=gen)
    n_held = min(n_seq - 1, max(1, round(cfg.holdout * n_seq))) if n_seq > 1 else 0
    held, train = (order[:n_held], order[n_held:]) if n_held else (order, order)

    def total_loss(vs: list[torch.Tensor], seqs: torch.Tensor | None = None) -> torch.Tensor:
        seqs = held if seqs is None else seqs
        wbits = ctx.fmt.weight.bits if cfg.simulate_weights else 16
        return sum(s.loss(vs, seqs, wbits, abits) for s in sims) / len(sims)

    # extra reflections start as small perturbations of v0's direction family (seeded)
    init = [v0.float().to(ctx.device)]
    for _ in range(cfg.reflections - 1):
        init.append(torch.randn(dims.hidden_size, generator=gen).to(ctx.device))
    init = [v / v.norm() for v in init]
    vs = [v.clone().requires_grad_(True) for v in init]
    opt = torch.optim.Adam(vs, lr=cfg.lr)
    with torch.no_grad():
        loss_init = float(total_loss(init))
        loss_stage1 = float(total_loss([]))  # no reflection: what stage 2 has to beat
    t0 = time.perf_counter()
    history = []
    for _ in range(cfg.steps):
        seqs = train[torch.randperm(train.numel(), generator=gen)[: cfg.seqs_per_step]]
        opt.zero_grad()
        loss = total_loss(vs, seqs)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    with torch.no_grad():
        trained = [v.detach() / v.detach().norm() for v in vs]
        loss_trained = float(total_loss(trained))
    # keep a reflection only if it lowers the held-out loss below stage 1 alone
    kept = min({"none": loss_stage1, "init": loss_init, "trained": loss_trained}.items(), key=lambda kv: kv[1])[0]
    final = {"none": [], "init": init, "trained": trained}[kept]
    m = torch.eye(dims.hidden_size, dtype=torch.float64)
    for v in final:
        m = m @ householder(v.double().cpu())
    return m, {"layers": pick, "steps": cfg.steps, "reflections": cfg.reflections,
               "held_out_seqs": int(n_held), "kv_simulated": any(sm.kv_quant is not None for sm in sims),
               "loss_init": loss_init, "loss_trained": loss_trained, "loss_stage1_only": loss_stage1,
               "kept": kept,
               "train_loss_first_last": [history[0], history[-1]] if history else None,
               "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- method


class RUQuantRotation:
    """Stage 1 (+ stage 2 unless ``stage2=False``); ``ctx.finetune`` selects the fine-tuned variant."""

    name = "ruquant"
    stage2 = True

    def __init__(self, stage1: Stage1Config | None = None, r1_block: int = 128, r4_block: int = 256) -> None:
        self.cfg1 = stage1 or STAGE1
        self.r1_block = r1_block
        self.r4_block = r4_block

    def plan(self, ctx: RotationContext) -> RotationPlan:
        if ctx.layer_states is None or ctx.layer_tensors is None:
            raise ValueError("RUQuant needs calibration access (RotationContext.layer_states / layer_tensors)")
        t0 = time.perf_counter()
        dims = ctx.dims
        d, inter = dims.hidden_size, dims.intermediate_size
        bits = ctx.fmt.activation.bits if ctx.fmt.activation.bits <= 8 else 4
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        hd = randomized_hadamard(d, ctx.generator)
        r2 = randomized_hadamard(dims.head_dim, ctx.generator)
        # stage 1 computes on ctx.device (float64; random draws stay on the CPU generator, so the
        # same seed draws the same targets on any device); its matrices come back to the CPU
        dev = ctx.device
        inputs = site_inputs(ctx, max_tokens=2048)
        t_inputs = time.perf_counter()
        xr = torch.cat([torch.cat([x["qkv"], x["gate_up"]]) for x in inputs]).to(dev, torch.float64)
        report: dict[str, Any] = {"method": "ruquant", "act_bits_proxy": bits, "stage1": {}, "stage2": None}

        # ---- R1, stage 1
        b1 = pick_block(d, self.r1_block, need_hadamard=False)
        hd_dev = hd.to(dev)
        blocks_raw, acc_raw = stage1_blocks(xr, b1, bits, self.cfg1, gen, self.cfg1.full_row)
        blocks_h, acc_h = stage1_blocks(xr @ hd_dev, b1, bits, self.cfg1, gen, self.cfg1.full_row)
        cands = {"identity": torch.eye(d, dtype=torch.float64, device=dev), "hadamard": hd_dev,
                 "blocks": block_diag(blocks_raw), "hadamard+blocks": hd_dev @ block_diag(blocks_h)}
        choice, errs = choose_composition(_sample_rows(xr, 8192, gen), cands, bits)
        r1_s1 = cands[choice].cpu()
        del cands
        report["stage1"]["r1"] = {"block": b1, "choice": choice, "row_mse": errs,
                                  "accepted_steps": {"blocks": acc_raw, "hadamard+blocks": acc_h}}
        t_r1 = time.perf_counter()

        # ---- R4, stage 1 (per layer, block-diagonal with a block Hadamard folded in)
        b4 = pick_block(inter, self.r4_block, need_hadamard=True)
        hb = (hadamard_matrix(b4).double() / math.sqrt(b4)) if is_hadamard_size(b4) else torch.eye(b4).double()
        hb_blocks = hb.to(dev).expand(inter // b4, b4, b4)
        full = {"hadamard_full": OnlineRotation("hadamard", inter)} if is_hadamard_size(inter) else {}
        r4s, r4_stage_h, r4_rep = {}, {}, []
        for i, x in enumerate(inputs):
            xd = x["down"].to(dev, torch.float64)
            xh = (xd.reshape(-1, inter // b4, b4) @ hb_blocks[0]).reshape(xd.shape)
            blocks, acc = stage1_blocks(xh, b4, bits, self.cfg1, gen)
            cand_blocks = {"block_hadamard": hb_blocks, "block_hadamard+blocks": hb_blocks @ blocks}
            errs4 = {k: row_quant_mse(_bd_apply(xd, v), bits) for k, v in cand_blocks.items()}
            errs4["identity"] = row_quant_mse(xd, bits)
            for k, rot in full.items():
                errs4[k] = row_quant_mse(rot.apply(x["down"].float()).double(), bits)
            pick4 = min(cand_blocks, key=errs4.__getitem__)
            r4s[i] = OnlineRotation("block_diagonal", inter, cand_blocks[pick4].float().cpu().contiguous())
            r4_stage_h[i] = OnlineRotation("block_diagonal", inter, hb_blocks.float().cpu().contiguous())
            r4_rep.append({"choice": pick4, "row_mse": errs4, "accepted_steps": acc})
        # the format gives every layer the same kind: a full Hadamard (global mixing over the whole
        # intermediate size) wins when it beats the best block choice summed over the layers
        if is_hadamard_size(inter):
            full_err = sum(r["row_mse"]["hadamard_full"] for r in r4_rep)
            block_err = sum(r["row_mse"][r["choice"]] for r in r4_rep)
            if full_err < block_err:
                r4s = {i: OnlineRotation("hadamard", inter) for i in range(dims.num_layers)}
                r4_stage_h = r4s
        report["stage1"]["down_proj"] = {"block": b4, "layers": r4_rep,
                                         "kind": next(iter(r4s.values())).kind if r4s else "none"}
        report["stage1"]["seconds"] = time.perf_counter() - t0
        report["stage1"]["timings"] = {"site_inputs_s": t_inputs - t0, "r1_s": t_r1 - t_inputs,
                                       "r4_s": time.perf_counter() - t_r1}

        stages = {"hadamard": RotationPlan(residual=hd, head=r2, down_proj=r4_stage_h),
                  "stage1": RotationPlan(residual=r1_s1, head=r2, down_proj=r4s)}
        r1 = r1_s1
        if self.stage2:
            cfg2 = STAGE2_FINETUNE if ctx.finetune else STAGE2
            y = xr @ r1_s1.to(dev)
            x = y[y.abs().amax(-1).argmax()].cpu()
            v0 = x - uniform_target(float(x.norm()), d, gen)
            refl, facts = _stage2(ctx, r1_s1, r4s, v0, cfg2, r2)
            r1 = r1_s1 @ refl
            report["stage2"] = {**facts, "finetune": ctx.finetune}
        report["seconds"] = time.perf_counter() - t0
        return RotationPlan(residual=r1, head=r2, down_proj=r4s, report=report, stages=stages)


def _bd_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    nb, b, _ = blocks.shape
    return torch.einsum("nka,kab->nkb", x.reshape(-1, nb, b), blocks).reshape(x.shape)


class RUQuantStage12(RUQuantRotation):
    name = "ruquant"
    stage2 = True


class RUQuantStage1(RUQuantRotation):
    name = "ruquant-stage1"
    stage2 = False

