"""OSTQuant (seed 004, issue 5): a learned orthogonal R1 plus learned diagonal scalings,
optimised with the KL-Top loss against the full-precision model's logits.

Why: a fixed Hadamard makes activations isotropic on average but ignores the data; OSTQuant
learns an orthogonal transform *and* per-channel scalings (equivalent transformations, so
the fp function is unchanged) so that the activation distribution fills the quantizer's
hypercube (its QSUR metric, reported for every method by ``convert.diagnostics``).

What is learned, and how it is absorbed
---------------------------------------
* R1 = ``Hd @ cayley(A)``: ``Hd`` the randomized Hadamard (the start point), ``A`` a learned
  skew-symmetric matrix, ``cayley(A) = (I - A)^-1 (I + A)`` -- orthogonal for every A, so
  plain Adam keeps R1 exactly orthogonal. Absorbed offline like any R1.
* Per layer, per norm (input_layernorm, post_attention_layernorm) a scaling ``s = exp(sigma)``
  in the rotated basis: the norm weight becomes ``1/s`` and its readers' weights ``W R1 diag(s)``
  (``RotationPlan.norm_scales``, applied by ``fuse.scale_norm_readers``): function preserved.
* R2 (per head) and R4 (down_proj, online): the randomized / plain Hadamard, not learned.

Loss: KL-Top -- the KL divergence between the fp model's and the simulated-quantized
model's next-token distributions restricted to the fp model's top-k logits (k = 64), mean
over tokens. OSTQuant uses it instead of cross-entropy because with few calibration
samples the label loss over-fits, and the full-vocabulary KL is dominated by the long tail.

Simulation: the whole model in the R1 basis, as served except that R2 is not simulated (V is
rotated online in its stead): per-token activations at the scheme's bits under the clip ratio
``SIM_ACT_CLIP``, the KV cache (``SIM_KV``) and, with ``SIM_WEIGHTS``, RTN per-channel weights,
all with straight-through rounding. Inputs are the first ``CALIB_TOKENS`` calibration tokens
(their embeddings; ``ctx.layer_states(CALIB_TOKENS)``); ``VAL_SEQS`` sequences are held out of
training, and the learned transform is kept only if its KL-Top on them beats the Hadamard
start (both reported, with the training-loss curve).

Defaults (issue 24 item 2, measured on SmolLM2-135M at w4a4kv4, docs/methods.md "OSTQuant on
the real model"): fp weights (the converter's GPTQ removes most of the weight error, so an RTN
weight loss trains against the wrong error), the served activation clip 0.75 and KV4 cache,
all 32 x 256 calibration tokens with 4 sequences held out, Adam steps of 4 sequences (80 by
default: sized when OSTQuant was the w4a4kv4 default recipe, within 10 minutes on 2 CPU cores -- scale
tuning replaced it there, ``convert/scale_tuning.py``; 200 with ``--finetune``, the
configuration first measured on an H200), lr 1e-3 for A and 1e-2 for sigma, cosine-decayed. The
earlier defaults -- 12 steps of one sequence on 2048 tokens, RTN weights, selection on the training
sequences -- barely moved R1 and fell back to (or fit past) the Hadamard start; ``examples/quality.py`` pins them
(``OSTQUANT_V0``) for the rows measured with them.

Cost: about 100 s of training on an H200 (200 steps, fp32, the weights rotated every step). On the
CPU a step is a forward + backward of 4 x 256 tokens through the whole model, so it is bound by
matmul throughput: 11 s a step on 2 cores with the weights and the head rotated every step; 6.7 s
with the residual kept in the original basis (``_ModelSim``: only the two norm sites' inputs are
rotated, no weight gradient, the head read at the top-k ids only, R4 as two small products); 4.4 s
with the matmuls in bf16 (``SIM_BF16``; this CPU's bf16 matmul runs at 2.3x its fp32 rate).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch
from tqdm import tqdm

from convert import distill
from convert.distill import TOP_K, kl_top_gathered
from convert.modeling import decoder_layer, rms_norm, rope_tables
from convert.rotations.base import RotationContext, RotationPlan
from convert.rotations.fake_quant import fake_quant
from convert.rotations.hadamard import randomized_hadamard
from convert.simulate import kv_cache_quantizer
from vllm_ruquant.checkpoint.models import NORM_READERS
from vllm_ruquant.hadamard import factor_size, is_hadamard_size, small_hadamard
from vllm_ruquant.reference import OnlineRotation

logger = logging.getLogger(__name__)

# Defaults (issue 24 item 2): the configuration measured best on SmolLM2-135M at w4a4kv4 (docs/methods.md,
# "OSTQuant on the real model"; seeds_32k_gpu.md). Before it: 12 steps of 1 sequence on 2048 tokens with RTN
# weights, no clip, no KV cache, selected on the training sequences -- quality.py's older rows pin those values.
# STEPS: sized to convert SmolLM2-135M in 10 minutes on 2 CPU cores (the w4a4kv4 default until scale tuning);
# FINETUNE_STEPS (--finetune): the 200 steps measured on an H200 (35.50, docs/methods.md)
STEPS, FINETUNE_STEPS = 80, 200
BATCH = 4  # calibration sequences per step
LR_ROT, LR_SCALE = 1e-3, 1e-2  # Adam learning rates of A (the Cayley parameter) and sigma
SIM_ACT_CLIP = 0.75  # activation clip in training at <= 4-bit activations (GBS's pick on SmolLM2 at w4a4kv4; at
# w4a8 GBS picks 0.994, so wider activations train unclipped)
SIM_KV = True  # simulate the KV cache (straight-through) in training (no effect at 16-bit KV)
SIM_WEIGHTS = False  # fp weights in training, leaving the weight error to GPTQ (True: RTN weights)
VAL_SEQS = 4  # calibration sequences held out of training to decide trained vs init (0: all)
CALIB_TOKENS = 8192  # calibration tokens OSTQuant trains and selects on (ctx.layer_states' cap)
COSINE = True  # cosine decay of both learning rates over the steps (False: constant)
LEARN_SCALES = True  # learn the norm-site scalings (False: the rotation alone, SpinQuant-style)
SIM_BF16 = True  # the training forward's matmuls in bf16 (autocast); the fp targets and the keep decision stay fp32
CHUNK = 4  # sequences per forward when scoring (fp top-k, held-out loss), to bound memory


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - K)^-1 (I + K)`` for ``K = (a - a^T) / 2``."""
    k = (a - a.T) / 2
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - k, eye + k)


class _ModelSim:
    """The whole model on calibration embeddings: fp, or quantized under (R1, scales).

    Why the residual stream stays in the original basis: RMSNorm (gamma folded) commutes with an
    orthogonal R1 and lm_head is not quantized, so R1 only matters where an activation is
    quantized -- the two norm sites' readers. There the input is rotated, scaled, quantized and
    rotated back, ``Q(n R / s) s R^T``, the same function of ``(R, s)`` as the absorbed weights
    ``W R s`` the converter writes, at two ``d x d`` products per layer instead of rotating every
    weight and the head each step. With fp weights (``SIM_WEIGHTS`` off) no weight gradient is
    formed at all, and the loss reads only the head rows of the fp model's top-k tokens.
    """

    def __init__(self, ctx: RotationContext, r4: OnlineRotation | None) -> None:
        assert ctx.layer_states is not None and ctx.layer_tensors is not None and ctx.head is not None
        self.ctx, self.dims = ctx, ctx.dims
        self.layers = [ctx.layer_tensors(i) for i in range(ctx.dims.num_layers)]
        self.head = ctx.head()
        self.h0 = ctx.layer_states(CALIB_TOKENS)[0].to(ctx.device).float()
        self.r4 = r4
        if r4 is not None:  # down_proj's input is rotated online by R4, absorbed in its weight once
            assert r4.kind == "hadamard" and r4.block_size is None and r4.padded_from is None, r4
            # x @ (H_m (x) H_p) / sqrt(n) as two small dense products: the reference's butterfly
            # is slicing-heavy, and its backward (zero-filled slice gradients) dominated a step
            m, p = factor_size(r4.size)
            self.r4_factors = (small_hadamard(m).to(ctx.device) / math.sqrt(m),
                               small_hadamard(p).to(ctx.device) / math.sqrt(p))
            q4 = r4.matrix().to(ctx.device)
            for i, sd in enumerate(self.layers):
                name = f"{self.dims.layer_prefix(i)}.mlp.down_proj.weight"
                sd[name] = sd[name] @ q4
        self.rope = rope_tables(ctx.dims, self.h0.shape[1], ctx.device)
        # V is rotated online in the simulation (the served R2 is a randomized Hadamard, offline)
        kv = dataclasses.replace(ctx.fmt.kv_cache, value_rotation="online")
        self.kv_quant = kv_cache_quantizer(kv, straight_through=True) if SIM_KV else None
        self.site_of = {name: j for j, readers in enumerate(NORM_READERS.values()) for name in readers}

    def _rotate_down_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ R4`` (``R4 = H_m (x) H_p / sqrt(n)``): ``H_m^T X H_p`` on ``x`` viewed as ``(m, p)``."""
        hm, hp = self.r4_factors
        y = x.float().reshape(*x.shape[:-1], hm.shape[0], hp.shape[0]) @ hp
        return torch.einsum("...ap,ai->...ip", y, hm).reshape(x.shape)

    def _features(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, None, self.dims.rms_norm_eps)

    @torch.no_grad()
    def fp_logits(self, seqs: torch.Tensor) -> torch.Tensor:
        h = self.h0[seqs]
        for i, sd in enumerate(self.layers):
            linear = self._linear(i, sd, None, None)
            h = decoder_layer(h, i, self.dims, linear, sd.__getitem__, self.rope)
        return self._features(h) @ self.head.T

    def q_top_logits(self, seqs: torch.Tensor, r: torch.Tensor, log_s: torch.Tensor,
                     idx: torch.Tensor) -> torch.Tensor:
        """The quantized model's logits at token ids ``idx (b, t, k)``; ``log_s (L, 2, d)`` the
        norm-site scalings."""
        h = self.h0[seqs]
        for i, sd in enumerate(self.layers):
            h = decoder_layer(h, i, self.dims, self._linear(i, sd, r, log_s[i].exp()), sd.__getitem__,
                              self.rope, self.kv_quant)
        return torch.einsum("btd,btkd->btk", self._features(h), self.head[idx])

    def _linear(self, i: int, sd: dict[str, torch.Tensor], r: torch.Tensor | None,
                scales: torch.Tensor | None) -> Any:
        """Layer ``i``'s linears: fp (``r`` None), or quantized as served under ``(r, scales)``."""
        p = self.dims.layer_prefix(i)
        wb, ab = self.ctx.fmt.weight.bits if SIM_WEIGHTS else 16, self.ctx.fmt.activation.bits
        clip = act_clip(ab)
        quantized_inputs: dict[int, torch.Tensor] = {}  # per norm site: its readers share one input

        def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
            name = prefix[len(p) + 1:]
            weight, bias = sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias")
            if name == "mlp.down_proj" and self.r4 is not None:
                x = self._rotate_down_input(x)
            if r is None:
                y = x.float() @ weight.T
            elif name in self.site_of:  # a reader of the residual: input in the R1 basis, scaled
                j = self.site_of[name]
                s = scales[j]
                if j not in quantized_inputs:
                    quantized_inputs[j] = fake_quant((x.float() @ r) / s, ab, clip_ratio=clip)
                u = quantized_inputs[j]
                y = u @ fake_quant((weight @ r) * s, wb).T if SIM_WEIGHTS else ((u * s) @ r.T) @ weight.T
            else:  # a writer of the residual: its output in the R1 basis for weight quantization only
                u = fake_quant(x.float(), ab, clip_ratio=clip)
                y = (u @ fake_quant(r.T @ weight, wb).T) @ r.T if SIM_WEIGHTS else u @ weight.T
            return y + bias if bias is not None else y

        return linear


def _curve(history: list[float], points: int = 10) -> list[float]:
    """The training loss at ``points`` evenly spaced steps, each the mean of its stretch (noisy per step)."""
    if not history:
        return []
    n = min(points, len(history))
    bounds = [round(i * len(history) / n) for i in range(n + 1)]
    return [sum(history[b:e]) / (e - b) for b, e in zip(bounds[:-1], bounds[1:], strict=True)]


def act_clip(act_bits: int) -> float:
    """The activation clip ratio the training simulates at ``act_bits``."""
    return SIM_ACT_CLIP if act_bits <= 4 else 1.0


def nothing_to_train(fmt: Any) -> bool:
    """With fp weights in the loss, a scheme that quantizes neither activations nor the KV cache (w4a16)
    leaves the loss at zero whatever R1 and the scalings are: no step could move them."""
    kv = fmt.kv_cache.bits < 16 and SIM_KV
    return fmt.activation.bits >= 16 and not kv and not SIM_WEIGHTS


class OSTQuantRotation:
    name = "ostquant"

    def plan(self, ctx: RotationContext) -> RotationPlan:
        if ctx.layer_states is None or ctx.layer_tensors is None or ctx.head is None:
            raise ValueError("OSTQuant needs calibration access (RotationContext.layer_states / layer_tensors / head)")
        t0 = time.perf_counter()
        dims = ctx.dims
        d, n_layers = dims.hidden_size, dims.num_layers
        hd = randomized_hadamard(d, ctx.generator)
        r2 = randomized_hadamard(dims.head_dim, ctx.generator)
        r4 = OnlineRotation("hadamard", dims.intermediate_size) if is_hadamard_size(dims.intermediate_size) else None
        hadamard = RotationPlan(residual=hd, head=r2, down_proj={i: r4 for i in range(n_layers)} if r4 else {})
        # a model too large to train here keeps the Hadamard start instead of ending its conversion
        reason = distill.too_large_to_train(dims, CALIB_TOKENS, BATCH * ctx.calib_seq_len, ctx.device)
        if reason is None and nothing_to_train(ctx.fmt):
            reason = (f"a {ctx.fmt.activation.bits}-bit-activation scheme with a "
                      f"{ctx.fmt.kv_cache.bits}-bit KV cache leaves the loss (fp weights) at zero")
        if reason is not None:
            logger.warning("ostquant: %s; keeping the randomized Hadamard start (untrained)", reason)
            return dataclasses.replace(hadamard, stages={"hadamard": hadamard}, report={
                "method": "ostquant", "kept": "init", "trained": False, "reason": reason,
                "seconds": time.perf_counter() - t0})
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator)))
        sim = _ModelSim(ctx, r4)
        n_seq = sim.h0.shape[0]
        all_seqs = torch.arange(n_seq)
        n_val = VAL_SEQS if 0 < VAL_SEQS < n_seq else 0
        train_seqs, val_seqs = (all_seqs[: n_seq - n_val], all_seqs[n_seq - n_val:]) if n_val else (all_seqs, all_seqs)
        fp_idx, fp_logp = distill.top_k_targets(sim.fp_logits, all_seqs, CHUNK)
        steps = FINETUNE_STEPS if ctx.finetune else STEPS
        hd32 = hd.float().to(ctx.device)
        a = torch.zeros(d, d, device=ctx.device, requires_grad=True)
        log_s = torch.zeros(n_layers, 2, d, device=ctx.device, requires_grad=LEARN_SCALES)
        groups = [{"params": [a], "lr": LR_ROT}] + ([{"params": [log_s], "lr": LR_SCALE}] if LEARN_SCALES else [])
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if COSINE else None

        def loss_on(seqs: torch.Tensor, aa: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
            idx = fp_idx[seqs]
            return kl_top_gathered(fp_logp[seqs], sim.q_top_logits(seqs, hd32 @ cayley(aa), ss, idx))

        @torch.no_grad()
        def held_out(aa: torch.Tensor, ss: torch.Tensor) -> float:  # mean over sequences, CHUNK at a time
            return sum(float(loss_on(c, aa, ss)) * len(c) for c in val_seqs.split(CHUNK)) / len(val_seqs)

        loss_init = held_out(torch.zeros_like(a), torch.zeros_like(log_s))
        history = []
        # minutes on a GPU, hours on a CPU: say how far it is
        bar = tqdm(range(steps), desc="ostquant training", unit="step", leave=False)
        for _ in bar:
            seqs = train_seqs[torch.randperm(len(train_seqs), generator=gen)[:BATCH]]
            opt.zero_grad()
            with torch.autocast(device_type=torch.device(ctx.device).type, dtype=torch.bfloat16, enabled=SIM_BF16):
                loss = loss_on(seqs, a, log_s)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            history.append(float(loss.detach()))
            bar.set_postfix(kl_top=f"{history[-1]:.4f}", refresh=False)
        loss_trained = held_out(a.detach(), log_s.detach())
        keep = loss_trained < loss_init
        a_f = a.detach().double().cpu() if keep else torch.zeros(d, d, dtype=torch.float64)
        s_f = log_s.detach().double().cpu().exp() if keep else torch.ones(n_layers, 2, d, dtype=torch.float64)
        r1 = hd @ cayley(a_f)
        scales = ({i: {norm: s_f[i, j].clone() for j, norm in enumerate(NORM_READERS)} for i in range(n_layers)}
                  if keep else {})
        report = {"method": "ostquant", "loss": "kl_top", "top_k": TOP_K, "steps": steps, "batch": BATCH,
                  "lr": [LR_ROT, LR_SCALE], "cosine": COSINE, "sim_bf16": SIM_BF16,
                  "learn_scales": LEARN_SCALES, "calib_tokens": n_seq * sim.h0.shape[1],
                  "sim_act_clip": act_clip(ctx.fmt.activation.bits), "sim_kv": SIM_KV, "sim_weights": SIM_WEIGHTS,
                  "selected_on": f"{n_val} held-out sequences" if n_val else "all calibration sequences",
                  "loss_init": loss_init, "loss_trained": loss_trained, "kept": "trained" if keep else "init",
                  "train_loss_first_last": [history[0], history[-1]] if history else None,
                  "train_loss_curve": _curve(history),
                  "scale_range": [float(s_f.min()), float(s_f.max())],
                  "down_proj_online": "hadamard" if r4 else "none", "seconds": time.perf_counter() - t0}
        return RotationPlan(residual=r1, head=r2, down_proj={i: r4 for i in range(n_layers)} if r4 else {},
                            report=report, norm_scales=scales,
                            stages={"hadamard": hadamard})
