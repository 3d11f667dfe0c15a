"""End-to-end tuning of the weight scales after quantization, the 4-bit integers frozen (``--tune-scales``).

Why: GPTQ fits each linear to its own calibration outputs, one layer after the other. The converter
already feeds layer i+1 the quantized layer i's outputs, but no layer's fit sees what its error does to
the next-token distribution, and the errors of all layers add up. With the integers fixed, the scales
(one per output channel, or per group) are few parameters that the served kernels read as they are:
training them end to end against the fp model's next-token distribution (KL-Top, the loss OSTQuant
trains with, ``convert.distill``) corrects part of the accumulated error. This is the "scales only"
end-to-end step of EfficientQAT (E2E-QP) at calibration scale: nothing the plugin reads changes but
the scale values (and, with ``norms`` / ``--tune-norms``, the layer norms' weights), so served ==
simulated holds as before.

What is trained: per stored scale ``s = s_gptq * exp(sigma)``, sigma zero at the start, Adam with a
cosine-decayed learning rate. The model is simulated as served -- the format's online rotations
(``simulate.site_rotation``), per-token activation quantization under the served clip ratio and the
KV cache, both with straight-through rounding -- with weights ``integers * trained scales``. ``VAL_SEQS``
calibration sequences are held out of training; the trained scales are kept only if their KL-Top on
them is lower than the quantizer's scales'. Both losses, the curve and the seconds are reported.

Cost: ``STEPS`` forward + backward passes of ``BATCH`` calibration sequences through the whole model,
plus the fp model's logits once: about 4.3 s a step for SmolLM2-135M on 2 CPU cores at w4a4kv4 (4.0 at
w4a16). Two things keep a step cheap: the Hadamards run as BLAS products (``reference.hadamard_as_matmul``;
a butterfly stage is an allocation and a copy, forward and backward), and an input that several linears
read (q/k/v, gate/up) is rotated and quantized once: together 0.77x the step before them
(``benchmarks/results/cpu-2026-12-05-scale-tuning-step/``). The whole model is held in fp32, so a model
too large for that (``distill.too_large_to_train``) skips the tuning with a warning instead of running out
of memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from convert.distill import TOP_K, kl_top_gathered, top_k_targets
from convert.modeling import TensorFn, decoder_layer, rms_norm, rope_tables
from convert.rotations.fake_quant import fake_quant
from convert.simulate import checkpoint_linear, kv_cache_quantizer, site_rotation
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import NORM_READERS, ModelDims

logger = logging.getLogger(__name__)

# Defaults: measured on SmolLM2-135M (docs/methods.md, "Scale tuning"): 60 steps fit the w4a16 / w4a8
# default recipes into 10 minutes on 2 CPU cores.
STEPS = 60
BATCH = 4  # calibration sequences per step
LR = 2e-3  # Adam learning rate of sigma (log-scale): 60 cosine-decayed steps move scales by a few percent
VAL_SEQS = 4  # calibration sequences held out of training to decide trained vs the quantizer's scales
CHUNK = 4  # sequences per forward when scoring (fp top-k, held-out loss), to bound memory
BF16 = False  # the training steps' matmuls in bf16 (autocast); the held-out decision stays fp32

HasFn = Callable[[str], bool]  # whether the converted checkpoint has a tensor of that name


@dataclass
class TunedScales:
    """The tensors to store -- scales, and layer norms with ``norms`` (name -> value in its stored dtype; empty
    when the quantizer's are kept) -- and the report."""

    scales: dict[str, torch.Tensor]
    report: dict


class _TrainableModel:
    """The converted checkpoint as served, with its weight scales ``s * exp(sigma)`` trainable."""

    def __init__(self, get: TensorFn, has: HasFn, dims: ModelDims, fmt: fmt_mod.RUQuantFormat,
                 prefixes: list[str], seq_len: int, device: torch.device) -> None:
        self.dims, self.fmt, self.device = dims, fmt, device
        self._get, self._tensors = get, {}
        self.prefixes = prefixes
        self.codes = {p: ref.unpack_weight(get(fmt_mod.tensor_name(p, fmt_mod.QWEIGHT)), fmt.weight.bits)
                      .to(device, torch.float32) for p in prefixes}
        stored = {p: get(fmt_mod.tensor_name(p, fmt_mod.WEIGHT_SCALE)) for p in prefixes}
        self.scale_dtypes = {p: s.dtype for p, s in stored.items()}  # what the tuned scales are written back as
        self.scales = {p: s.to(device, torch.float32) for p, s in stored.items()}
        self.rotations = {p: site_rotation(fmt, self.get, has, p) for p in prefixes}
        self.bias = {p: self.get(fmt_mod.tensor_name(p, fmt_mod.BIAS)) if has(fmt_mod.tensor_name(p, fmt_mod.BIAS))
                     else None for p in prefixes}
        self.unquantized = checkpoint_linear(fmt, self.get, has)  # any linear left in full precision
        self.kv_quant = kv_cache_quantizer(fmt.kv_cache, straight_through=True)
        self.rope = rope_tables(dims, seq_len, device)
        self.embed = self.get("model.embed_tokens.weight")
        self.head = self.get("lm_head.weight")

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            self._tensors[name] = self._get(name).to(self.device, torch.float32)
        return self._tensors[name]

    def _linear(self, sigma: dict[str, torch.Tensor]) -> Callable[[str, torch.Tensor], torch.Tensor]:
        act_bits, clip, gs = self.fmt.activation.bits, self.fmt.activation.clip_ratio, self.fmt.weight.group_size
        # q/k/v (and gate/up) read one input: its rotation and quantization are made once, for the first of
        # them, and reused while the next linear gets the same tensor with the same rotation and shards
        last: list = [None, None, None]  # [input, (rotation, shards), what the linear multiplies]

        def served_input(prefix: str, x: torch.Tensor) -> torch.Tensor:
            rot, shards = self.rotations[prefix], self.fmt.act_shards(prefix)
            if last[0] is x and last[1] == (id(rot), shards):
                return last[2]
            x2 = rot.apply(x) if rot is not None else x.float()
            if act_bits < 16:  # per token (and per tensor-parallel shard of K), as the kernels quantize
                x2 = fake_quant(x2.unflatten(-1, (shards, -1)), act_bits, clip_ratio=clip).flatten(-2)
            last[:] = [x, (id(rot), shards), x2]
            return x2

        def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
            if prefix not in self.codes:
                return self.unquantized(prefix, x)
            x2 = served_input(prefix, x)
            codes = self.codes[prefix]
            w = ref.dequantize_weight(codes, self.scales[prefix] * sigma[prefix].exp(), gs)
            y = x2 @ w.T
            return y + self.bias[prefix] if self.bias[prefix] is not None else y

        return linear

    def norm_names(self) -> list[str]:
        """The layer norms' weights (not the final norm's: that one only scales the unquantized head)."""
        return [f"{self.dims.layer_prefix(i)}.{norm}.weight" for i in range(self.dims.num_layers)
                for norm in NORM_READERS]

    def top_logits(self, tokens: torch.Tensor, idx: torch.Tensor, sigma: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the token ids ``idx (b, t, k)`` (the head is not quantized: only k rows are read).
        ``sigma`` holds log-factors of the weight scales (by linear prefix) and of any norm weights (by name)."""
        h = self.embed[tokens]
        linear = self._linear(sigma)

        def get(name: str) -> torch.Tensor:
            return self.get(name) * sigma[name].exp() if name in sigma else self.get(name)

        for i in range(self.dims.num_layers):
            h = decoder_layer(h, i, self.dims, linear, get, self.rope, self.kv_quant)
        x = rms_norm(h, self.get("model.norm.weight"), self.dims.rms_norm_eps)
        return torch.einsum("btd,btkd->btk", x, self.head[idx])


def quantized_prefixes(names: list[str]) -> list[str]:
    """The linears of a converted checkpoint that hold 4-bit (or 8-bit) integers and scales."""
    suffix = "." + fmt_mod.QWEIGHT
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix))


def fp_targets(fp_logits: Callable[[torch.Tensor], torch.Tensor],
               tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp model's top-k ids and log-probabilities on every calibration sequence (``CHUNK`` at a time)."""
    return top_k_targets(fp_logits, tokens, CHUNK)


def tune_weight_scales(fp_top: tuple[torch.Tensor, torch.Tensor], get: TensorFn, has: HasFn,
                       names: list[str], dims: ModelDims, fmt: fmt_mod.RUQuantFormat, tokens: torch.Tensor,
                       device: torch.device, steps: int = STEPS, seed: int = 0, norms: bool = False) -> TunedScales:
    """Train the weight scales of the converted checkpoint (``get`` / ``has`` / ``names``) on the
    calibration ``tokens (n, t)`` against ``fp_top`` (``fp_targets`` of the source model).

    ``norms``: each layer's two RMSNorm weights are trained too (``g * exp(tau)``), a per-input-channel
    scaling of q/k/v's and gate/up's inputs that the per-(output, group) scales cannot express -- where
    activations are quantized, it moves what the quantizer sees, as SmoothQuant / OSTQuant's scalings do.
    The plugin serves it as the norm's weight (vLLM applies it before the activation quantization, as the
    simulation does). The final norm, which feeds only the unquantized head, is left alone."""
    t0 = time.perf_counter()
    prefixes = quantized_prefixes(names)
    model = _TrainableModel(get, has, dims, fmt, prefixes, tokens.shape[1], device)
    tokens = tokens.to(device)
    n = tokens.shape[0]
    n_val = VAL_SEQS if 0 < VAL_SEQS < n else 0
    train_seqs, val_seqs = (torch.arange(n - n_val), torch.arange(n - n_val, n)) if n_val else (torch.arange(n),) * 2
    fp_idx, fp_logp = (t.to(device) for t in fp_top)
    sigma = {p: torch.zeros_like(model.scales[p], requires_grad=True) for p in prefixes}
    norm_names = model.norm_names() if norms else []
    sigma.update({name: torch.zeros_like(model.get(name), requires_grad=True) for name in norm_names})

    def loss_on(seqs: torch.Tensor, sg: dict[str, torch.Tensor]) -> torch.Tensor:
        return kl_top_gathered(fp_logp[seqs], model.top_logits(tokens[seqs], fp_idx[seqs], sg))

    @torch.no_grad()
    def held_out(sg: dict[str, torch.Tensor]) -> float:
        return sum(float(loss_on(c, sg)) * len(c) for c in val_seqs.split(CHUNK)) / len(val_seqs)

    with ref.hadamard_as_matmul():  # the same transforms in BLAS products (no kernel has to match these bits)
        loss_init = held_out(sigma)
        opt = torch.optim.Adam(list(sigma.values()), lr=LR)
        gen = torch.Generator().manual_seed(seed)
        history: list[float] = []
        for step in tqdm(range(steps), desc="scale tuning", unit="step", leave=False):
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / steps))
            seqs = train_seqs[torch.randperm(len(train_seqs), generator=gen)[:BATCH]]
            opt.zero_grad()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=BF16):
                loss = loss_on(seqs, sigma)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
        loss_trained = held_out(sigma)
    keep = loss_trained < loss_init
    scales = {}
    if keep:
        for p in prefixes:
            name = fmt_mod.tensor_name(p, fmt_mod.WEIGHT_SCALE)
            scales[name] = (model.scales[p] * sigma[p].detach().exp()).to(model.scale_dtypes[p]).cpu()
        for name in norm_names:  # stored in the checkpoint's dtype, which the simulation and vLLM then read
            scales[name] = (model.get(name) * sigma[name].detach().exp()).to(get(name).dtype).cpu()
    shift = max((float(s.detach().abs().max()) for s in sigma.values()), default=0.0)
    report = {"loss": "kl_top", "top_k": TOP_K, "steps": steps, "batch": BATCH, "lr": LR, "bf16": BF16,
              "linears": len(prefixes), "norms": len(norm_names),
              "selected_on": f"{n_val} held-out sequences" if n_val else "all calibration sequences",
              "loss_init": loss_init, "loss_trained": loss_trained, "kept": "trained" if keep else "init",
              "train_loss_first_last": [history[0], history[-1]] if history else None,
              "max_abs_log_scale_change": shift, "seconds": time.perf_counter() - t0}
    if not keep:
        logger.warning("scale tuning: held-out KL-Top %.5f -> %.5f did not improve; keeping the quantizer's scales",
                       loss_init, loss_trained)
    return TunedScales(scales, report)
