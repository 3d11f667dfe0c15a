"""The conversion recipe: load -> fold norms -> rotate -> quantize -> write, one layer at a time.

Only one decoder layer's weights (plus the calibration hidden states) are in memory at
any time. Calibration runs sequentially: layer i+1 is calibrated on the outputs of the
*quantized* layer i, exactly as the served model will feed it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from convert import calibration, diagnostics, distill, fuse, scale_tuning
from convert.dimension_expansion import expanded_size
from convert.errors import ConvertError, ExitCode
from convert.evaluate import Evaluator, LoadedModel
from convert.model_io import CheckpointReader, CheckpointWriter, read_source
from convert.modeling import decoder_layer, dense_linear, rms_norm, rope_tables
from convert.quantizers import get_quantizer
from convert.rotations import RotationContext, RotationPlan, get_rotation_method
from convert.simulate import ONLINE_BLOCKS, checkpoint_linear, kv_cache_quantizer
from vllm_ruquant import __version__
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import ModelDims
from vllm_ruquant.hadamard import is_hadamard_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertOptions:
    """The whole recipe, as one object (what the CLI flags build)."""

    scheme: str = "w4a4"
    rotation: str = "hadamard"
    weight_quantizer: str = "gptq"
    group_size: int = -1
    act_clip_ratio: float = 1.0
    calib_text: Path | None = None
    calib_samples: int = 32
    calib_seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    quantize: bool = True  # False: rotations only, linears stay full precision (tests, debugging)
    clip: str = "none"  # "gbs": gradual binary search of clip ratios (convert/clip.py)
    full_range: bool = False  # weight scales signed so each group's largest weight lands on -2^(bits-1)
    quantizer_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"rank": 8} for lrq
    resume: bool = False  # continue an interrupted conversion from its last finished layer
    tp_size: int = 1  # tensor-parallel size the checkpoint will be served with (see format.tp_size)
    tune_scales: int = 0  # Adam steps of end-to-end weight-scale tuning after quantization (0: none)
    tune_norms: bool = False  # ... training the layer norms' weights too (convert.scale_tuning)
    finetune: bool = False  # the rotation method's fine-tuned variant (RUQuant / OSTQuant --finetune)
    # GBS+DE's dimension expansion: where down_proj's input size has no Hadamard, pad it to the
    # next size that has one and rotate there (convert/dimension_expansion.py)
    dimension_expansion: bool = False

    @functools.cached_property
    def fmt(self) -> fmt_mod.RUQuantFormat:
        """The scheme, group size, clip ratio and TP size as one validated format (``FormatError``
        otherwise), parsed once; the conversion adds its rotations and provenance to it."""
        return fmt_mod.scheme_format(self.scheme, group_size=self.group_size, clip_ratio=self.act_clip_ratio,
                                     tp_size=self.tp_size)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class LayerSink(Protocol):
    def write_shard(self, tensors: dict[str, torch.Tensor]) -> str: ...

    def tensor_names(self) -> list[str]: ...

    def read_tensor(self, name: str) -> torch.Tensor: ...

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def commit(self, config: dict[str, Any], source_dir: Path, extra_files: dict[str, str]) -> Any: ...

    def abort(self) -> None: ...


class InMemorySink:
    """Collects the converted tensors in a dict (tests, in-process evaluation)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.config: dict[str, Any] = {}
        self.extra_files: dict[str, str] = {}

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> str:
        self.tensors.update(tensors)
        return "memory"

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - set(self.tensors)
        if unknown:
            raise KeyError(f"not written: {sorted(unknown)}")
        self.tensors.update(tensors)

    def commit(self, config: dict[str, Any], source_dir: Path, extra_files: dict[str, str]) -> Any:
        self.config, self.extra_files = config, extra_files
        return self

    def abort(self) -> None:
        self.tensors.clear()


@dataclass
class LayerReport:
    layer: int
    seconds: float
    output_rel_error: float
    weight_rel_error: dict[str, float] = field(default_factory=dict)


def _layer_tensor_names(reader: CheckpointReader, dims: ModelDims, i: int) -> list[str]:
    p = dims.layer_prefix(i) + "."
    return [n for n in reader.keys() if n.startswith(p)]


def _check_finite(x: torch.Tensor, what: str) -> None:
    """Finite weights can still overflow fp32 activations (e.g. a norm weight of 3e38)."""
    if not torch.isfinite(x).all():
        raise ConvertError(f"{what} contain NaN or Inf (weights too large for fp32?)", ExitCode.NUMERICS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Converter:
    """One conversion run; ``run()`` does everything and returns the report dict."""

    def __init__(self, model_dir: Path, opts: ConvertOptions) -> None:
        self.model_dir = model_dir
        self.opts = opts
        self.cfg, self.dims = read_source(model_dir)
        self.reader = CheckpointReader(model_dir)
        self.device = opts.resolved_device()
        self.out_dtype = DTYPES.get(self.dims.torch_dtype, torch.float32)
        if self.dims.torch_dtype not in DTYPES:
            raise ConvertError(f"unsupported checkpoint dtype {self.dims.torch_dtype!r}; supported: "
                               f"{', '.join(DTYPES)}", ExitCode.UNSUPPORTED)
        self.fmt = opts.fmt
        if self.fmt.kv_cache.bits == 4 and not ref.is_power_of_two(self.dims.head_dim):
            raise ConvertError(f"--scheme {opts.scheme}: the 4-bit KV cache (vLLM's int4_per_token_head) "
                               f"needs a power-of-two head_dim, this model has {self.dims.head_dim}; "
                               "choose a scheme without 'kv'", ExitCode.UNSUPPORTED)
        self._check_tp()
        self.quantizer = (get_quantizer(opts.weight_quantizer, seed=opts.seed, clip=opts.clip,
                                        full_range=opts.full_range, **opts.quantizer_options)
                          if opts.quantize else None)
        self.act_clip_ratio = opts.act_clip_ratio  # --clip gbs replaces it by the searched ratio
        self.rotation = get_rotation_method(opts.rotation)
        self.generator = torch.Generator().manual_seed(opts.seed)

    # ----------------------------------------------------------------------- helpers

    def _residual_samples(self, tokens: torch.Tensor, max_tokens: int = 2048) -> torch.Tensor:
        """Normalised, gamma-folded inputs of every linear site of the unrotated model."""
        dims = self.dims
        toks = tokens.reshape(-1)[:max_tokens].reshape(1, -1)
        h = self.reader.get("model.embed_tokens.weight")[toks].to(self.device)
        rope = rope_tables(dims, toks.shape[1], self.device)
        out = []
        for i in range(dims.num_layers):
            sd = {n: self.reader.get(n).to(self.device) for n in _layer_tensor_names(self.reader, dims, i)}
            out.append(rms_norm(h, None, dims.rms_norm_eps).reshape(-1, dims.hidden_size))
            h = decoder_layer(h, i, dims, dense_linear(sd.__getitem__), sd.__getitem__, rope)
            _check_finite(h, f"the calibration activations after layer {i}")
        return torch.cat(out).cpu()

    def _layer_states(self, tokens: torch.Tensor, max_tokens: int = 2048) -> list[torch.Tensor]:
        """fp32 hidden states (n_seq, seq, d) entering each layer of the unrotated fp model, for the
        first ``max_tokens`` // seq_len calibration sequences (cached per count)."""
        n = max(1, min(tokens.shape[0], max_tokens // tokens.shape[1]))
        if getattr(self, "_states_n", None) != n:
            h = self.reader.get("model.embed_tokens.weight")[tokens[:n]].float().to(self.device)
            rope = rope_tables(self.dims, tokens.shape[1], self.device)
            states = []
            for i in range(self.dims.num_layers):
                states.append(h.cpu())
                sd = self._layer_tensors(i)
                h = decoder_layer(h, i, self.dims, dense_linear(sd.__getitem__), sd.__getitem__, rope)
                _check_finite(h, f"the calibration activations after layer {i}")
            self._states_cache, self._states_n = states, n
        return self._states_cache

    def _layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """One layer's tensors, fp32 on the device, RMSNorm gammas folded (in fp64, there), unrotated."""
        sd = {n: self.reader.get(n, torch.float64).to(self.device)
              for n in _layer_tensor_names(self.reader, self.dims, i)}
        self._check_shapes(sd, i)
        fuse.fold_layer_norms(sd, self.dims.layer_prefix(i))
        return {k: v.float() for k, v in sd.items()}

    def _head(self) -> torch.Tensor:
        name = "model.embed_tokens.weight" if self.dims.tie_word_embeddings else "lm_head.weight"
        final_norm = self.reader.get("model.norm.weight", torch.float64)
        return fuse.fold_head(self.reader.get(name, torch.float64), final_norm, None).float().to(self.device)

    def _context(self, tokens: torch.Tensor) -> RotationContext:
        return RotationContext(dims=self.dims, generator=self.generator, device=self.device,
                               residual_samples=lambda: self._residual_samples(tokens),
                               layer_states=lambda max_tokens=2048: self._layer_states(tokens, max_tokens),
                               layer_tensors=self._layer_tensors, head=self._head, fmt=self.fmt,
                               finetune=self.opts.finetune, calib_seq_len=self.opts.calib_seq_len)

    def _plan(self, tokens: torch.Tensor) -> RotationPlan:
        plan = self.rotation.plan(self._context(tokens))
        self._shard_online_rotations(plan)
        self._expand_dimensions(plan)
        self._complete_served_blocks(plan)
        if plan.residual is not None:
            r1 = plan.residual.to(self.device)
            eye = torch.eye(self.dims.hidden_size, dtype=torch.float64, device=self.device)
            assert torch.allclose(r1.T @ r1, eye, atol=1e-8), "R1 not orthogonal"
        for layer in plan.linear_blocks.values():
            for name, b in layer.items():
                eye = torch.eye(b.shape[-1], dtype=torch.float64).expand_as(b)
                assert torch.allclose(b.double().transpose(1, 2) @ b.double(), eye, atol=1e-8), \
                    f"online blocks of {name} not orthogonal"
        return plan

    def _check_tp(self) -> None:
        tp, d = self.opts.tp_size, self.dims
        if tp < 1:
            raise ConvertError(f"--tp-size must be >= 1, got {tp}", ExitCode.BAD_INPUT)
        g = self.opts.group_size
        for what, n in (("attention heads", d.num_heads), ("intermediate size", d.intermediate_size)):
            if n % tp:
                raise ConvertError(f"--tp-size {tp} does not divide the {what} ({n})", ExitCode.UNSUPPORTED)
        for what, k in (("o_proj", d.attention_size), ("down_proj", d.intermediate_size)):
            if g != -1 and (k // tp) % g:
                raise ConvertError(f"--group-size {g} does not divide {what}'s input shard {k // tp} at "
                                   f"--tp-size {tp}", ExitCode.UNSUPPORTED)

    def _shard_online_rotations(self, plan: RotationPlan) -> None:
        """For ``--tp-size t``: each rank holds 1/t of down_proj's input, so R4 must act within
        a shard: a Hadamard becomes ``I_t (x) H_(f/t)``; block-diagonal blocks must not straddle."""
        tp, f = self.opts.tp_size, self.dims.intermediate_size
        if tp == 1:
            return
        shard = f // tp
        for i, r in plan.down_proj.items():
            if r.kind == "hadamard":
                if not is_hadamard_size(shard):
                    raise ConvertError(f"--tp-size {tp}: no Hadamard rotation of the shard size {shard} "
                                       f"(intermediate {f} / {tp})", ExitCode.UNSUPPORTED)
                plan.down_proj[i] = ref.OnlineRotation("hadamard", f, block_size=shard)
            elif r.blocks is not None and shard % r.blocks.shape[-1]:
                raise ConvertError(f"--tp-size {tp}: down_proj rotation blocks of {r.blocks.shape[-1]} "
                                   f"straddle the shards of {shard}", ExitCode.UNSUPPORTED)
        # row-parallel linears (o_proj, down_proj) quantize each rank's slice of their input
        k_of = {"o_proj": self.dims.attention_size, "down_proj": f}
        for layer in plan.linear_blocks.values():
            for name, b in layer.items():
                if name in k_of and (k_of[name] // tp) % b.shape[-1]:
                    raise ConvertError(f"--tp-size {tp}: {name}'s online blocks of {b.shape[-1]} straddle "
                                       f"the shards of {k_of[name] // tp}", ExitCode.UNSUPPORTED)

    def _complete_served_blocks(self, plan: RotationPlan) -> None:
        """A served site's blocks (``served_block_sites``) are one format rotation for all layers:
        a layer whose fit kept no blocks there gets identity blocks (the same function, one shape)."""
        for name in served_block_sites(plan):
            some = next(layer[name] for layer in plan.linear_blocks.values() if name in layer)
            eye = torch.eye(some.shape[-1], dtype=some.dtype).expand_as(some).contiguous()
            for i in range(self.dims.num_layers):
                plan.linear_blocks.setdefault(i, {}).setdefault(name, eye)

    def _expand_dimensions(self, plan: RotationPlan) -> None:
        """``--dimension-expansion``: where down_proj's input size f has no Hadamard, R4 becomes
        ``[x, 0] @ H_m / sqrt(m)`` with m the next size that has one (replacing the rotation
        method's choice: none for Hadamard / OSTQuant, block-diagonal for RUQuant there)."""
        f = self.dims.intermediate_size
        if not self.opts.dimension_expansion or is_hadamard_size(f):
            return
        if self.opts.tp_size != 1:
            raise ConvertError("--dimension-expansion needs --tp-size 1 (the padded rotation reads "
                               "down_proj's whole input)", ExitCode.UNSUPPORTED)
        try:
            m = expanded_size(f)
        except ValueError as e:
            raise ConvertError(f"--dimension-expansion: {e}", ExitCode.UNSUPPORTED) from None
        g = self.opts.group_size
        if g != -1 and m % g:
            raise ConvertError(f"--group-size {g} does not divide down_proj's expanded input size {m}",
                               ExitCode.UNSUPPORTED)
        tqdm.write(f"ruquant-convert: dimension expansion: down_proj's input {f} is zero-padded to {m} "
                   "and Hadamard-rotated")
        plan.down_proj = {i: ref.OnlineRotation("hadamard", m, padded_from=f) for i in range(self.dims.num_layers)}
        plan.report["dimension_expansion"] = {"down_proj": {"from": f, "to": m}}

    def _format(self, plan: RotationPlan) -> fmt_mod.RUQuantFormat:
        rots = {}
        r4s = {(r.kind, r.size, r.block_size if r.blocks is None else r.blocks.shape[-1], r.padded_from)
               for r in plan.down_proj.values()}
        if len(plan.down_proj) not in (0, self.dims.num_layers) or len(r4s) > 1:
            raise AssertionError("a rotation plan must give every layer the same kind of down_proj rotation")
        if r4s:
            kind, size, block, padded_from = r4s.pop()
            rots["down_proj"] = fmt_mod.RotationSpec(kind=kind, size=size, block_size=block, padded_from=padded_from)
        for name in served_block_sites(plan):
            nb, b, _ = plan.linear_blocks[0][name].shape
            rots[name] = fmt_mod.RotationSpec(kind="block_diagonal", size=nb * b, block_size=b)
        o = self.opts
        fmt = dataclasses.replace(
            self.fmt,
            activation=dataclasses.replace(self.fmt.activation, clip_ratio=self.act_clip_ratio),
            # V is rotated offline when the plan folds a per-head R2 into v_proj / o_proj
            kv_cache=dataclasses.replace(self.fmt.kv_cache,
                                         value_rotation="offline" if plan.head is not None else "online"),
            online_rotations=rots,
            converter={"tool": "ruquant-convert", "version": __version__, "scheme": o.scheme,
                       "rotation": o.rotation, "weight_quantizer": o.weight_quantizer, "seed": o.seed,
                       "calib_samples": o.calib_samples, "calib_seq_len": o.calib_seq_len,
                       "calib_text": str(o.calib_text) if o.calib_text else "pydoc_data.topics"},
        )
        fmt.validate()
        fmt.check_model(self.dims.hidden_size, self.dims.intermediate_size, self.dims.attention_size)
        return fmt

    # -------------------------------------------------------------------------- layers

    def _check_shapes(self, sd: dict[str, torch.Tensor], i: int) -> None:
        """Every tensor config.json implies must be present with its shape (one clear error)."""
        dims, p = self.dims, self.dims.layer_prefix(i)
        expect = {f"{prefix}.weight": dims.linear_shape(prefix.rsplit(".", 1)[-1])
                  for prefix in dims.linear_prefixes(i)}
        expect[f"{p}.input_layernorm.weight"] = (dims.hidden_size,)
        expect[f"{p}.post_attention_layernorm.weight"] = (dims.hidden_size,)
        for name, shape in expect.items():
            if name not in sd:
                raise ConvertError(f"tensor {name!r} is missing from the checkpoint", ExitCode.BAD_INPUT)
            if tuple(sd[name].shape) != shape:
                raise ConvertError(f"tensor {name!r} has shape {tuple(sd[name].shape)} but config.json implies "
                                   f"{shape}", ExitCode.BAD_INPUT)

    def _rotated_layer(self, i: int, plan: RotationPlan) -> dict[str, torch.Tensor]:
        """Layer ``i`` with norms folded and the plan's rotations absorbed: fp64, on the device
        (a 70B layer's R1 and R4 are ~30 TFLOP in fp64: minutes on a CPU, a second on a GPU)."""
        dims, p, dev = self.dims, self.dims.layer_prefix(i), self.device
        sd = {n: self.reader.get(n, torch.float64).to(dev) for n in _layer_tensor_names(self.reader, dims, i)}
        self._check_shapes(sd, i)
        fuse.fold_layer_norms(sd, p)
        if plan.residual is not None:
            fuse.rotate_layer_residual(sd, p, plan.residual.to(dev))
        if plan.head is not None:
            fuse.rotate_layer_heads(sd, p, dims, plan.head.to(dev))
        for norm, s in plan.norm_scales.get(i, {}).items():
            fuse.scale_norm_readers(sd, p, norm, s.double().to(dev))
        r4 = plan.down_proj.get(i)
        if r4 is not None:
            fuse.absorb_online_rotation(sd, f"{p}.mlp.down_proj", r4)
            if r4.blocks is not None:  # block_diagonal: the plugin reads each layer's blocks
                sd[fmt_mod.tensor_name(f"{p}.mlp.down_proj", fmt_mod.ONLINE_ROTATION)] = r4.blocks.double()
        # online blocks after R1 / R2 / R4 (``ruquant-online``): W <- W diag(B), B stored beside it, as the
        # format's online rotation where the site is served (o_proj), else as simulation-only online_blocks
        served = served_block_sites(plan)
        for name, blocks in plan.linear_blocks.get(i, {}).items():
            prefix = next(n[: -len(".weight")] for n in sd if n.endswith(f".{name}.weight"))
            bd = blocks.double().to(dev)
            w = sd[f"{prefix}.weight"]
            nb, b, _ = bd.shape
            wb = w.reshape(w.shape[0], nb, b).transpose(0, 1) @ bd  # (nb, N, b): each column block times its B
            sd[f"{prefix}.weight"] = wb.transpose(0, 1).reshape(w.shape)
            sd[fmt_mod.tensor_name(prefix, fmt_mod.ONLINE_ROTATION if name in served else ONLINE_BLOCKS)] = bd
        return sd

    def _hessians(self, h: torch.Tensor, i: int, sd32: dict[str, torch.Tensor], fmt: fmt_mod.RUQuantFormat,
                  rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Full-precision layer output and X^T X / n (fp32) of every linear's (served) input.

        Memory (a 70B layer: an 8192-wide Hessian is 0.5 GB in fp64, down_proj's 28672-wide one 6.6 GB):
        each Hessian is summed in fp64 from one fp64 copy of its input, which is freed before the sum is
        divided in place and stored in fp32, so one fp64 Hessian and no fp64 temporary beside it is alive
        at a time; the fp32 Hessians wait on the host (``_host``) until their linear is quantized;
        linears fed the very same input tensor (q / k / v, gate / up) share one Hessian object instead of
        three and two equal copies.
        """
        hess: dict[str, torch.Tensor] = {}
        last: dict[str, object] = {}  # the previous input (kept alive, so its storage is not reused) and its prefix

        def observe(prefix: str, x2: torch.Tensor) -> None:
            if prefix in hess:
                raise RuntimeError(f"{prefix}: observed twice in one layer forward")
            prev = last.get("x")
            if (isinstance(prev, torch.Tensor) and prev.data_ptr() == x2.data_ptr() and prev.shape == x2.shape
                    and prev.stride() == x2.stride() and prev.dtype == x2.dtype):
                hess[prefix] = hess[str(last["prefix"])]
                return
            xd = x2.double()
            h64 = xd.T @ xd
            del xd
            hess[prefix] = h64.div_(x2.shape[0]).to(self._host, torch.float32)
            del h64
            last.update(x=x2, prefix=prefix)

        capture = checkpoint_linear(fmt, sd32.__getitem__, sd32.__contains__, observe=observe)
        out = decoder_layer(h, i, self.dims, capture, sd32.__getitem__, rope)
        return out, hess

    @property
    def _host(self) -> torch.device:
        """Where a layer's fp32 Hessians and its fp32 weights wait while the quantizers run: on a GPU they
        would sit beside GPTQ's factorisation of the biggest Hessian (for a 70B layer 4.1 GB of Hessians,
        3.3 GB of them down_proj's, and 3.4 GB of weights); the quantizers take each linear's weight and
        Hessian to the device when they quantize it."""
        return torch.device("cpu")

    def _quantize_layer(self, sd: dict[str, torch.Tensor], hess: dict[str, torch.Tensor],
                        fmt: fmt_mod.RUQuantFormat, report: LayerReport) -> dict[str, torch.Tensor]:
        """Replace each linear's ``weight`` by ``qweight`` + ``weight_scale`` (fp32 scales)."""
        assert self.quantizer is not None
        out = dict(sd)
        for prefix in [n[: -len(".weight")] for n in sd if n.endswith("_proj.weight")]:
            w = sd[f"{prefix}.weight"].float().to(self.device)
            q, scale = self.quantizer.quantize(w, fmt.weight.bits, fmt.weight.group_size, hess.get(prefix))
            deq = ref.dequantize_weight(q, scale, fmt.weight.group_size)
            report.weight_rel_error[prefix.rsplit(".", 1)[-1]] = _rel(deq, w)
            del out[f"{prefix}.weight"]
            out[fmt_mod.tensor_name(prefix, fmt_mod.QWEIGHT)] = ref.pack_weight(q.cpu(), fmt.weight.bits)
            out[fmt_mod.tensor_name(prefix, fmt_mod.WEIGHT_SCALE)] = scale.cpu().float()
        return out

    def _times(self, w: torch.Tensor, r: torch.Tensor, chunk_bytes: int = 1 << 30) -> torch.Tensor:
        """``w @ r`` of a CPU tensor, computed on the device in row blocks, returned on the CPU
        (a 128256 x 8192 embedding times R1 is 17 TFLOP in fp64)."""
        if self.device.type == "cpu":
            return w @ r
        r = r.to(self.device)
        out = torch.empty(w.shape[0], r.shape[1], dtype=torch.promote_types(w.dtype, r.dtype))
        step = max(1, chunk_bytes // max(1, w.shape[1] * w.element_size()))
        for s in range(0, w.shape[0], step):
            out[s:s + step] = (w[s:s + step].to(self.device) @ r).cpu()
        return out

    def _storage(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Final dtypes: integers stay, scales/rotations fp32, everything else the model dtype."""
        keep_fp32 = (fmt_mod.WEIGHT_SCALE, fmt_mod.ONLINE_ROTATION, ONLINE_BLOCKS)
        out = {}
        for n, t in sd.items():
            t = t.cpu()
            if t.is_floating_point() and not n.endswith(keep_fp32):
                t = t.to(self.out_dtype)
            out[n] = t
        return out

    # ----------------------------------------------------------------------------- run

    def _tune_scales(self, sink: LayerSink, fmt: fmt_mod.RUQuantFormat, tokens: torch.Tensor) -> dict[str, Any]:
        """End-to-end tuning of the written weight scales (``convert.scale_tuning``), replaced in place."""
        reason = distill.too_large_to_train(self.dims, tokens.numel(), scale_tuning.BATCH * tokens.shape[1],
                                            self.device)
        if reason is not None:
            tqdm.write(f"ruquant-convert: warning: {reason}; the weight scales stay as quantized (no --tune-scales)")
            return {"trained": False, "reason": reason}
        t0 = time.perf_counter()
        fp_top = scale_tuning.fp_targets(Evaluator(LoadedModel.open(self.model_dir), self.device).logits, tokens)
        names = sink.tensor_names()
        result = scale_tuning.tune_weight_scales(fp_top, sink.read_tensor, set(names).__contains__, names,
                                                 self.dims, fmt, tokens, self.device, self.opts.tune_scales,
                                                 self.opts.seed, norms=self.opts.tune_norms)
        if result.scales:
            sink.replace_tensors(result.scales)
        return {**result.report, "seconds_with_fp_targets": time.perf_counter() - t0}

    def fingerprint(self) -> str:
        """Identifies (source model, options): a partial conversion resumes only under the same."""
        src = sorted((p.name, p.stat().st_size) for p in self.model_dir.glob("*.safetensors"))
        opts = {k: str(v) for k, v in asdict(self.opts).items() if k != "resume"}
        blob = json.dumps({"cfg": self.cfg, "src": src, "opts": opts, "version": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _start(self, sink: LayerSink, tokens: torch.Tensor) -> tuple[RotationPlan, torch.Tensor, int, dict]:
        """Fresh start (plan, embedding shard) or the state of an interrupted run."""
        dims = self.dims
        resumed = sink.load_progress() if self.opts.resume and hasattr(sink, "load_progress") else None
        if resumed is not None:
            state, tensors = resumed
            if state["fingerprint"] != self.fingerprint():
                sink.keep_partial = True  # a mistyped flag must not cost the interrupted run
                raise ConvertError("the partial conversion beside the output was made from another model or "
                                   "with other options; resume with the original options, or run again "
                                   "without --resume to start over", ExitCode.BAD_INPUT)
            plan = _plan_from_tensors(sink.load_tensors("plan.safetensors") or {}, state["plan"])
            tqdm.write(f"ruquant-convert: resuming at layer {state['next_layer']} of {dims.num_layers}")
            return plan, tensors["h"].to(self.device), state["next_layer"], state
        t0 = time.perf_counter()
        plan = self._plan(tokens)
        meta = {"fingerprint": self.fingerprint(), "t_plan": time.perf_counter() - t0, "layers": [],
                "plan": _plan_meta(plan)}
        t0 = time.perf_counter()
        meta["diagnostics"] = diagnostics.plan_diagnostics(self._context(tokens), plan)
        meta["t_diagnostics"] = time.perf_counter() - t0
        self._states_cache, self._states_n = None, None
        if hasattr(sink, "save_tensors"):
            sink.save_tensors("plan.safetensors", _plan_tensors(plan))
        r1 = plan.residual
        embed = self.reader.get("model.embed_tokens.weight", torch.float64)
        if tuple(embed.shape) != (dims.vocab_size, dims.hidden_size):
            raise ConvertError(f"model.embed_tokens.weight has shape {tuple(embed.shape)} but config.json "
                               f"implies {(dims.vocab_size, dims.hidden_size)}", ExitCode.BAD_INPUT)
        embed_rot = self._times(embed, r1) if r1 is not None else embed
        h = embed_rot[tokens].float().to(self.device)
        head = embed if dims.tie_word_embeddings else self.reader.get("lm_head.weight", torch.float64)
        final_norm = self.reader.get("model.norm.weight", torch.float64)
        sink.write_shard(self._storage({
            "model.embed_tokens.weight": embed_rot,
            "lm_head.weight": self._times(fuse.fold_head(head, final_norm, None), r1) if r1 is not None
            else fuse.fold_head(head, final_norm, None),
            "model.norm.weight": torch.ones_like(final_norm),
        }))
        return plan, h, 0, meta

    def run(self, sink: LayerSink) -> dict[str, Any]:
        dims, opts = self.dims, self.opts
        t_start = time.perf_counter()
        try:
            tokens = calibration.calibration_batches(self.model_dir, opts.calib_text, opts.calib_samples,
                                                     opts.calib_seq_len, opts.seed)
            plan, h, first, meta = self._start(sink, tokens)
            fmt = self._format(plan)
            if opts.clip == "gbs" and opts.quantize:  # GBS: global activation + KV clip search
                from convert.clip import gbs_calibration_search

                if "clip" not in meta:  # a resumed run keeps the ratio it started with
                    meta["clip"] = gbs_calibration_search(self, plan, fmt, h)
                self.act_clip_ratio = meta["clip"]["activation"]
                fmt = self._format(plan)
            rope = rope_tables(dims, opts.calib_seq_len, self.device)
            kv_quant = kv_cache_quantizer(fmt.kv_cache)
            fault_after = os.environ.get("RUQUANT_FAULT_AFTER_LAYER")  # fault injection for resume tests

            with tqdm(total=dims.num_layers, desc="ruquant-convert", unit="layer", initial=first) as bar:
                for i in range(first, dims.num_layers):
                    t0 = time.perf_counter()
                    sd = self._rotated_layer(i, plan)
                    # the fp64 layer, freed tensor by tensor as its fp32 copy is made (at most one
                    # tensor in both precisions), before the Hessians need the memory
                    sd32 = {k: sd.pop(k).float().to(self.device) for k in list(sd)}
                    del sd
                    fp_out, hess = self._hessians(h, i, sd32, fmt, rope)
                    _check_finite(fp_out, f"the calibration activations after layer {i}")
                    report = LayerReport(layer=i, seconds=0.0, output_rel_error=0.0)
                    if opts.quantize:
                        sd32 = {k: v.to(self._host) for k, v in sd32.items()}
                        qsd = self._quantize_layer(sd32, hess, fmt, report)
                        qsd32 = {k: v.to(self.device) for k, v in qsd.items()}
                        q_linear = checkpoint_linear(fmt, qsd32.__getitem__, qsd32.__contains__)
                        h = decoder_layer(h, i, dims, q_linear, qsd32.__getitem__, rope, kv_quant)
                        report.output_rel_error = _rel(h, fp_out)
                        out_sd = qsd
                    else:
                        h = fp_out
                        out_sd = sd32
                    _check_finite(h, f"the quantized calibration activations after layer {i}")
                    sink.write_shard(self._storage(out_sd))
                    report.seconds = time.perf_counter() - t0
                    meta["layers"].append(asdict(report))
                    if hasattr(sink, "save_progress"):
                        sink.save_progress({**meta, "next_layer": i + 1, "step": i + 1}, {"h": h})
                    bar.update(1)
                    bar.set_postfix(out_err=f"{report.output_rel_error:.4f}")
                    del sd32, hess
                    if fault_after is not None and int(fault_after) == i:
                        os.kill(os.getpid(), signal.SIGKILL)

            if opts.quantize and opts.tune_scales > 0 and "scale_tuning" not in meta:
                meta["scale_tuning"] = self._tune_scales(sink, fmt, tokens)
                if hasattr(sink, "save_progress"):  # a resumed run does not tune the tuned scales again
                    sink.save_progress({**meta, "next_layer": dims.num_layers, "step": dims.num_layers + 1},
                                       {"h": h})

            out_cfg = dict(self.cfg)
            out_cfg["tie_word_embeddings"] = False
            if opts.quantize:
                out_cfg["quantization_config"] = fmt.to_dict()
            report_dict = {
                "model": str(self.model_dir), "architecture": dims.architecture,
                "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
                "format": fmt.to_dict(),
                "rotation": plan.report,
                "diagnostics": meta.get("diagnostics"),
                "clip": meta.get("clip"),
                "scale_tuning": meta.get("scale_tuning"),
                "seconds": {"rotation_plan": meta["t_plan"], "diagnostics": meta.get("t_diagnostics"),
                            "total": time.perf_counter() - t_start},
                "device": str(self.device), "host": platform.node(),
                "resumed_at_layer": first or None,
                "layers": meta["layers"],
            }
            extra: dict[str, str | bytes] = {"ruquant_report.json": json.dumps(report_dict, indent=2)}
            png = diagnostics.plot_png(meta.get("diagnostics"), str(self.model_dir.name))
            if png is not None:
                extra[diagnostics.PLOT_NAME] = png
            sink.commit(out_cfg, self.model_dir, extra)
            return report_dict
        except KeyboardInterrupt:
            if hasattr(sink, "keep_partial"):
                sink.keep_partial = True  # resumable with --resume
            sink.abort()
            raise
        except BaseException:
            sink.abort()
            raise


def served_block_sites(plan: RotationPlan) -> list[str]:
    """Linears whose online blocks (``plan.linear_blocks``) the checkpoint format carries as their
    block-diagonal online rotation, so the plugin serves them: a rotatable site
    (``format.ROTATABLE_SITES``) with no other online rotation in the plan -- o_proj. Blocks after
    R4 (down_proj) and on q/k/v or gate/up stay ``online_blocks``: simulation only."""
    named = {name for layer in plan.linear_blocks.values() for name in layer}
    taken = {"down_proj"} if plan.down_proj else set()
    return sorted(n for n in named if n in fmt_mod.ROTATABLE_SITES and n not in taken)


def _plan_meta(plan: RotationPlan) -> dict[str, Any]:
    return {"report": plan.report,
            "down_proj": {str(i): [r.kind, r.size, r.block_size, r.padded_from] for i, r in plan.down_proj.items()}}


def _plan_tensors(plan: RotationPlan) -> dict[str, torch.Tensor]:
    t = {}
    if plan.residual is not None:
        t["residual"] = plan.residual
    if plan.head is not None:
        t["head"] = plan.head
    for i, r in plan.down_proj.items():
        if r.blocks is not None:
            t[f"down_proj.{i}"] = r.blocks
    for i, scales in plan.norm_scales.items():
        for norm, s in scales.items():
            t[f"norm_scales.{i}.{norm}"] = s
    for i, layer in plan.linear_blocks.items():
        for name, b in layer.items():
            t[f"linear_blocks.{i}.{name}"] = b.clone(memory_format=torch.contiguous_format)  # q/k/v share one
    return t


def _plan_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RotationPlan:
    down = {int(i): ref.OnlineRotation(kind, size, tensors.get(f"down_proj.{i}"), block_size, padded_from)
            for i, (kind, size, block_size, padded_from) in meta["down_proj"].items()}
    scales: dict[int, dict[str, torch.Tensor]] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, s in tensors.items():
        if name.startswith("norm_scales."):
            _, i, norm = name.split(".")
            scales.setdefault(int(i), {})[norm] = s
        elif name.startswith("linear_blocks."):
            _, i, lin = name.split(".")
            blocks.setdefault(int(i), {})[lin] = s
    return RotationPlan(residual=tensors.get("residual"), head=tensors.get("head"), down_proj=down,
                        report=meta["report"], norm_scales=scales, linear_blocks=blocks)


def convert(model_dir: Path, out_dir: Path, opts: ConvertOptions, overwrite: bool = False) -> dict[str, Any]:
    """Convert ``model_dir`` into a ruquant checkpoint at ``out_dir`` (atomic, resumable)."""
    converter = Converter(model_dir, opts)
    writer = CheckpointWriter(out_dir, overwrite=overwrite, resume=opts.resume)
    return converter.run(writer)
