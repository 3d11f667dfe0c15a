"""``TritonBackend``: the ruquant linear layer on NVIDIA GPUs (see ``linear_backend.LinearBackend``).

``prepare`` picks a kernel path from the layer's spec once and repacks the weights for
it; ``apply`` runs the fused rotate+quantize kernel and then the GEMM:

=============================  ==================  ===================================
weights x activations          activations          weights (``prepare``)
=============================  ==================  ===================================
int4 x packed int4 (opt-in)    packed int4          checkpoint layout, as is
int4 x int4/6/8 (W4A4, W4A8)   int8                 chunked int4 (``layout.py``)
int3/6/8 x int4/6/8            int8                 int8, as is
int4 x bf16 (W4A16)            rotated bf16         chunked int4, Triton dequant GEMM
int3/6/8 x bf16                rotated bf16         dequantized bf16, torch.matmul
=============================  ==================  ===================================

W4A4 keeps its activations one per byte by default: the same integers, but then the GEMM
unpacks only the weights, and measured on H100 that is 1.4-1.7x cuBLAS bf16 at M=4096
against 0.9-1.2x with both operands packed (docs/kernels.md). The extra
activation bytes are small beside the weights at decode sizes and beside the arithmetic
at prefill sizes. ``RUQUANT_W4A4_PACKED_ACT=1`` selects packed int4 activations.

An input size K that is not a multiple of 128 (SmolLM2's 576, a shard of 344, ...) is served
by the same kernels on K zero-padded to the tile: ``prepare`` pads the weights with zero
columns (and zero-weight groups), ``apply`` has rotate+quantize write its integers into the
first K columns of a zeroed (M, K_pad) buffer. Zeros change no absmax, product or sum, so the
integers and the result are those of the unpadded layer. Only weight groups that are not a
multiple of 64 (e.g. 32) use the reference arithmetic on the GPU, logged once per shape.

Decode sizes: W4A4 / W4A8 layers run the CUDA-core GEMV (``gemv.qgemv``) instead of the tensor-core GEMM
up to ``GEMV_MAX_M`` tokens (``RUQUANT_GEMV_MAX_M``, default 1; ``RUQUANT_GEMV=0`` turns it off): the same
arguments, the same integers and bits, on the same stored weights; which kernel serves a layer is logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time

import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import gemm, gemv, layout
from vllm_ruquant.kernels.dequant_gemm import w4a16_gemm
from vllm_ruquant.kernels.gemm import qgemm
from vllm_ruquant.kernels.rotate_quant import hadamard_factor_t, rotate_quant
from vllm_ruquant.linear_backend import LinearSpec, ReferenceBackend
from vllm_ruquant.logs import log_once

logger = logging.getLogger(__name__)


TILE_K = 128  # the GEMMs' K tile
# Up to GEMV_MAX_M tokens, W4A4 / W4A8 layers run the CUDA-core GEMV (``gemv.qgemv``: same integers, same
# bits, weights streamed without the tensor-core GEMM's 16-row padding); ``RUQUANT_GEMV=0`` turns it off.
# H200, Llama-3-8B shape, served decode step at batch 1 (benchmarks/results/gpu-2026-12-04d): 3749 us
# with it (and the in-kernel quantization below) against 5105 us for rotate_quant + qgemm.
GEMV = os.environ.get("RUQUANT_GEMV", "1") == "1"
GEMV_MAX_M = gemv.GEMV_MAX_M
# Up to this many tokens, an un-rotated W4A4 / W4A8 layer quantizes its activations inside the matrix
# kernel (a_mode 2) instead of in a rotate_quant launch before it. Not a rotated one: the GEMV quantizing
# down_proj's rotated fp32 rows (K = 14336) took 39.5 us against 24.6 for rotate_quant + GEMV
# (H200, gpu-2026-12-04f). Only where the GEMV serves: the GEMV
# does it at no measurable cost, while qgemm's a_mode 2 (every program re-reads its rows for the scale)
# ran 4x slower than rotate_quant + qgemm (decode_linears: 249 against ~80 us a layer at M = 1).
FUSED_QUANT_MAX_M = int(os.environ.get("RUQUANT_FUSED_QUANT_MAX_M", str(GEMV_MAX_M if GEMV else 0)))


# On by default (``RUQUANT_GRAPH_QUANT=0`` turns it off): under torch.compile an un-rotated W4A4 / W4A8
# layer lets Inductor quantize its activations (fused into the kernel that produces them,
# ``ops.int_linear_op``) instead of a rotate_quant launch or the GEMV's in-kernel quantization. H200,
# Llama-3-8B shape, served decode step 3606 -> 3360 us at batch 1, 4344 -> 4013 at batch 16
# (gpu-2026-12-04f). Fused behind the bf16 RMSNorm, Inductor would quantize the normalized activation
# before its rounding to bf16 (some integers one step off the simulation's, scales up to 0.3%) unless
# its ``emulate_precision_casts`` is set, which ``prepare`` therefore sets (``inductor_setup``, with the
# whole-row reductions); with it the served model's greedy output equals the simulation's on the H200
# (gpu-2026-12-04g) (docs/kernels.md).
GRAPH_QUANT = os.environ.get("RUQUANT_GRAPH_QUANT", "1") == "1"

# The GEMMs' autotuner times every candidate config of an M bucket (``gemm.m_bucket``) the first time a
# layer shape meets that bucket: ~50 ms a config (Triton's warmup 10 + rep 40 ms) on the serving stream,
# 0.1-0.3 s a bucket and shape. vLLM's own warm-up meets only the CUDA-graph sizes (<= 512 tokens) and
# the largest batch, so a server met the buckets in between (prefill chunks of 1024 to 8192 tokens
# mixed with decodes) while serving -- inside a benchmark's clock. ``warm_up`` runs each layer shape's
# GEMM once per bucket at load time instead; ``RUQUANT_PRETUNE=0`` leaves them to their first use.
PRETUNE = os.environ.get("RUQUANT_PRETUNE", "1") == "1"
_PRETUNED: set[tuple] = set()  # layer shapes warmed in this process (a backend is made per layer)


def padded_k(spec: LinearSpec) -> int | None:
    """K rounded up to whole GEMM tiles and weight groups, or None if the groups do not tile.

    ``K`` itself when it tiles already; groups must be a multiple of 64 (the narrowest chunk).
    """
    k, g = spec.in_features, spec.group_size
    if g in (-1, k):
        step = TILE_K
    elif g % 64 == 0:
        step = math.lcm(TILE_K, g)
    else:
        return None
    return -(-k // step) * step


def _tiling(spec: LinearSpec) -> tuple[int, int, int]:
    """What the matrix kernels are launched with for this layer: K padded to whole tiles, the weight
    group (the padded K for per-channel weights) and the chunk of the weights' layout."""
    k_pad = padded_k(spec)
    assert k_pad is not None
    g = k_pad if spec.group_size == spec.in_features else spec.group_size
    return k_pad, g, layout.chunk_for(k_pad, g) or TILE_K


# the weight layout ``prepare`` leaves for each integer-activation path, as ``qgemm``'s b_mode
_B_MODE = {"w4a4": 1, "w4a8": 2, "int8": 0}


def _path(spec: LinearSpec) -> str:
    """Which kernel path serves this layer (see the module table)."""
    k = padded_k(spec)
    if k is None:
        return "reference"
    g = k if spec.group_size == spec.in_features else spec.group_size
    if spec.act_bits >= 16:
        if spec.weight_bits == 4:
            return "w4a16" if layout.chunk_for(k, g) else "reference"
        return "dequant_matmul"
    if spec.weight_bits == 4 and spec.act_bits == 4 and os.environ.get("RUQUANT_W4A4_PACKED_ACT") == "1":
        return "w4a4"
    if spec.weight_bits == 4:
        return "w4a8" if layout.chunk_for(k, g) else "reference"
    return "int8"


def _pad_weights(spec: LinearSpec, qweight: torch.Tensor, weight_scale: torch.Tensor, k_pad: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's weights with ``k_pad - K`` zero input columns (zero-weight groups, scale 1)."""
    k = spec.in_features
    w_q = torch.nn.functional.pad(ref.unpack_weight(qweight, spec.weight_bits), (0, k_pad - k))
    if spec.group_size not in (-1, k):
        extra = (k_pad - k) // spec.group_size
        weight_scale = torch.nn.functional.pad(weight_scale.float(), (0, extra), value=1.0)
    return ref.pack_weight(w_q, spec.weight_bits), weight_scale


class TritonBackend:
    """GPU backend: fused rotate+quant, then W4A4 / W4A8 / W8A8 / W4A16 Triton GEMMs."""

    name = "triton"

    def __init__(self) -> None:
        # packed W4A4 on FP8 tensor cores instead of int8 (both exact; fp8 measured 3x slower)
        self.w4a4_fp8 = os.environ.get("RUQUANT_W4A4_MMA", "int8").lower() == "fp8"
        self._ref = ReferenceBackend()
        self._warned: set[tuple[int, int, str]] = set()  # (K, N, reason) logged
        logger.info("ruquant: using Triton kernels (rotate_quant + %s W4A4 GEMM)",
                    "fp8" if self.w4a4_fp8 else "int8")

    def prepare(self, spec: LinearSpec, qweight: torch.Tensor, weight_scale: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        if self.quantizes_in_graph(spec):
            from vllm_ruquant.kernels import inductor_setup  # noqa: PLC0415  (torch._inductor, on demand)

            inductor_setup.configure_for_graph_quant()
        path = _path(spec)
        out: dict[str, torch.Tensor] = {}
        if spec.rotation is not None and spec.rotation.kind == "block_diagonal":
            assert spec.rotation.blocks is not None
            # a plain tensor (the layer's loaded parameter is a vLLM parameter subclass)
            out["rot_blocks"] = spec.rotation.blocks.data.to(qweight.device, torch.float32).clone()
        if path == "reference":
            self._log_once(spec, f"reference math on GPU: weight groups of {spec.group_size} are not a "
                                 "multiple of 64")
            out["w_scale"] = weight_scale.float().contiguous()
            out.update(self._ref.prepare(spec, qweight, weight_scale))
            return out
        k, k_pad = spec.in_features, padded_k(spec)
        assert k_pad is not None
        if k_pad != k:
            self._log_once(spec, f"K zero-padded to {k_pad} for the {TILE_K}-wide GEMM tiles")
            qweight, weight_scale = _pad_weights(spec, qweight, weight_scale, k_pad)
        g = k_pad if spec.group_size == k else spec.group_size
        out["w_scale"] = weight_scale.float().contiguous()
        if path == "w4a4":
            out["w"] = qweight.contiguous()
        elif path in ("w4a8", "w4a16"):
            chunk = layout.chunk_for(k_pad, g)
            assert chunk is not None
            out["w"] = layout.pack_chunked(ref.unpack_int4(qweight), chunk)
        elif path == "int8":
            out["w"] = ref.unpack_weight(qweight, spec.weight_bits).contiguous()
        else:  # dequant_matmul
            w_q = ref.unpack_weight(qweight, spec.weight_bits)
            out["w"] = ref.dequantize_weight(w_q, weight_scale, g)  # fp32, cast at use
        if spec.rotation is not None and spec.rotation.kind == "hadamard":
            from vllm_ruquant.hadamard import factor_size  # noqa: PLC0415

            m, _ = factor_size(spec.rotation.size)
            if m > 1:
                out["rot_ht"] = hadamard_factor_t(m, qweight.device)
            # the torch rotation (factors above 64, per-shard blocks) reads device-resident
            # factors copied on first use: make that use now, never inside CUDA-graph capture
            spec.rotation.apply(torch.zeros(1, spec.rotation.in_features, device=qweight.device))
        return out

    def warm_up(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], *, max_tokens: int,
                dtype: torch.dtype, bias: torch.Tensor | None = None) -> int:
        """Run this layer shape's GEMM once in every M bucket a step of up to ``max_tokens`` tokens reaches
        (zero activations, the arguments ``apply`` / ``apply_quantized`` pass, so the autotuner's keys are
        the served ones): its configs are timed now, at load, not at the first request of each size.
        Returns the buckets run: 0 for a shape warmed before, a path that does not autotune, or
        ``RUQUANT_PRETUNE=0``."""
        path = _path(spec)
        if not PRETUNE or path in ("reference", "dequant_matmul") or not gemm.autotunes():
            return 0
        if path == "w4a16" and dtype not in (torch.bfloat16, torch.float16):
            return 0  # served by torch (``_weight_only_torch``), nothing to tune
        key = (path, spec.in_features, spec.out_features, spec.group_size, bias is not None, dtype)
        if key in _PRETUNED:
            return 0
        _PRETUNED.add(key)
        k_pad, g, chunk = _tiling(spec)
        device = prepared["w"].device
        buckets = gemm.buckets_up_to(max_tokens)
        t0 = time.perf_counter()
        for m in buckets:
            if path == "w4a16":
                w4a16_gemm(torch.zeros(m, k_pad, dtype=dtype, device=device), prepared["w"], prepared["w_scale"],
                           K=k_pad, group_size=g, chunk=chunk, bias=bias)
                continue
            packed = path == "w4a4"
            q = torch.zeros(m, k_pad // 2 if packed else k_pad, dtype=torch.uint8 if packed else torch.int8,
                            device=device)
            self._gemm_on_integers(spec, path, q, torch.ones(m, dtype=torch.float32, device=device), prepared,
                                   bias, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # the zero rows and outputs (up to ~1 GB) are not the model's memory
        logger.info("ruquant: layer K=%d N=%d: GEMM autotuned for M buckets %d..%d at load (%.1f s)", spec.in_features,
                    spec.out_features, buckets[0], buckets[-1], time.perf_counter() - t0)
        return len(buckets)

    def _log_once(self, spec: LinearSpec, reason: str) -> None:
        key = (spec.in_features, spec.out_features, reason)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("ruquant: layer K=%d N=%d group=%d: %s", spec.in_features, spec.out_features,
                           spec.group_size, reason)

    def apply(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        path = _path(spec)
        if path == "reference":
            return self._ref.apply(spec, prepared, x, bias)
        if path in ("w4a16", "dequant_matmul") and x.dtype not in (torch.bfloat16, torch.float16):
            return self._weight_only_torch(spec, prepared, x, bias)
        lead = x.shape[:-1]
        k = spec.in_features
        k_pad, g, chunk = _tiling(spec)
        rotation = spec.rotation
        x2 = x.reshape(-1, x.shape[-1])
        if rotation is not None and rotation.padded_from is not None:
            # dimension expansion: zero-pad here, then the kernels see a plain size-k Hadamard
            x2 = rotation.pad(x2)
            rotation = dataclasses.replace(rotation, padded_from=None)
        blocks = prepared.get("rot_blocks")
        if path in ("w4a16", "dequant_matmul"):
            buf = _padded_buffer(x2, k_pad, path)
            xr, _ = rotate_quant(x2, 16, rotation=rotation, blocks=blocks, out=_first_columns(buf, x2))
            xr = xr if buf is None else buf
            if path == "w4a16":
                y = w4a16_gemm(xr, prepared["w"], prepared["w_scale"], K=k_pad, group_size=g, chunk=chunk, bias=bias)
            else:
                y = (xr @ prepared["w"].to(x.dtype).T).float()
                if bias is not None:
                    y = y + bias.float()
                y = y.to(x.dtype)
        elif path == "w4a8" and rotation is None and k == k_pad and self._fuses_quantization(x2.shape[0], k, g):
            # decode: the matrix kernel quantizes its activation rows itself (same integers, one launch)
            y = self._int_gemm(spec, x2.contiguous(), None, prepared, a_mode=2, b_mode=2, K=k, group_size=g,
                               chunk=chunk, bias=bias, out_dtype=x.dtype, act_bits=spec.act_bits,
                               clip_ratio=spec.clip_ratio)
        else:
            packed = path == "w4a4"
            buf = _padded_buffer(x2, k_pad, path)
            q, s = rotate_quant(x2, spec.act_bits, spec.clip_ratio, rotation, pack=packed, blocks=blocks,
                                out=_first_columns(buf, x2))
            y = self._gemm_on_integers(spec, path, q if buf is None else buf, s, prepared, bias, x.dtype)
        return y.reshape(*lead, spec.out_features)

    def _gemm_on_integers(self, spec: LinearSpec, path: str, q: torch.Tensor, s: torch.Tensor,
                          prepared: dict[str, torch.Tensor], bias: torch.Tensor | None,
                          out_dtype: torch.dtype) -> torch.Tensor:
        """The layer's GEMM (or GEMV) on quantized activation rows ``q`` (packed int4 on the ``w4a4`` path,
        int8 otherwise, K padded) and their scales ``s``: what ``apply`` launches after rotate_quant and
        ``warm_up`` times at load, so both meet the same autotuner keys."""
        k_pad, g, chunk = _tiling(spec)
        packed = path == "w4a4"
        return self._int_gemm(spec, q, s, prepared, a_mode=1 if packed else 0, b_mode=_B_MODE[path], K=k_pad,
                              group_size=g, chunk=chunk, bias=bias, out_dtype=out_dtype,
                              use_fp8=packed and self.w4a4_fp8)

    def quantizes_in_graph(self, spec: LinearSpec) -> bool:
        """Un-rotated layers on the int8-activation kernels whose K tiles (no padding): see GRAPH_QUANT."""
        return (GRAPH_QUANT and spec.rotation is None and spec.act_bits < 16 and _path(spec) == "w4a8"
                and padded_k(spec) == spec.in_features)

    def apply_quantized(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], q: torch.Tensor,
                        scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMV (decode sizes) or the GEMM on given int8 ``q (..., K)`` and fp32 scales ``(..., 1)``:
        what ``apply`` runs after its rotate_quant launch."""
        k = spec.in_features
        g = k if spec.group_size == k else spec.group_size
        chunk = layout.chunk_for(k, g) or TILE_K
        y = self._int_gemm(spec, q.reshape(-1, k).contiguous(), scale.reshape(-1).float().contiguous(), prepared,
                           a_mode=0, b_mode=2, K=k, group_size=g, chunk=chunk, bias=bias, out_dtype=out_dtype)
        return y.reshape(*q.shape[:-1], spec.out_features)

    @staticmethod
    def _fuses_quantization(m: int, k: int, group: int) -> bool:
        """Whether ``m`` tokens of an un-rotated layer are quantized inside the matrix kernel: up to
        FUSED_QUANT_MAX_M, and with the GEMV on only where it takes the problem (else qgemm's own
        in-kernel quantization would run, the 4x slower path; rotate_quant + qgemm instead)."""
        return m <= FUSED_QUANT_MAX_M and (not GEMV or (m <= GEMV_MAX_M and gemv.supports(m, k, group, 2, 2)))

    def _int_gemm(self, spec: LinearSpec, a: torch.Tensor, a_scale: torch.Tensor | None,
                  prepared: dict[str, torch.Tensor], *, use_fp8: bool = False, **kw) -> torch.Tensor:
        """``qgemm``, or for decode sizes with ``RUQUANT_GEMV=1`` the GEMV (the same bits); which one
        serves a layer shape is logged once."""
        m = a.shape[0]
        k, g = kw["K"], kw["group_size"]
        if GEMV and m <= GEMV_MAX_M and gemv.supports(m, k, g, kw["a_mode"], kw["b_mode"]):
            log_once(logger, f"gemv:{spec.in_features}x{spec.out_features}:g{spec.group_size}:a{kw['a_mode']}",
                     f"ruquant: layer K={spec.in_features} N={spec.out_features}: CUDA-core GEMV (qgemv) "
                     f"for M <= {GEMV_MAX_M}, a_mode {kw['a_mode']}")
            return gemv.qgemv(a, a_scale, prepared["w"], prepared["w_scale"], **kw)
        if GEMV and m <= GEMV_MAX_M:
            log_once(logger, f"gemv-no:{spec.in_features}x{spec.out_features}:g{spec.group_size}:a{kw['a_mode']}",
                     f"ruquant: layer K={spec.in_features} N={spec.out_features} group={spec.group_size} "
                     f"a_mode {kw['a_mode']} b_mode {kw['b_mode']}: no GEMV for it, tensor-core qgemm")
        return qgemm(a, a_scale, prepared["w"], prepared["w_scale"], use_fp8=use_fp8, **kw)

    def _weight_only_torch(self, spec: LinearSpec, prepared: dict[str, torch.Tensor], x: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
        """fp32 (or other) activations on a weight-only layer: the reference math in torch."""
        w = prepared["w"]
        k, k_pad = spec.in_features, padded_k(spec)
        assert k_pad is not None
        g = k_pad if spec.group_size == k else spec.group_size
        if _path(spec) == "w4a16":
            w_q = layout.unpack_chunked(w, layout.chunk_for(k_pad, g) or TILE_K)
            w = ref.dequantize_weight(w_q, prepared["w_scale"], g)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if spec.rotation is not None:
            x2 = dataclasses.replace(spec.rotation, blocks=prepared.get("rot_blocks")).apply(x2)
        x2 = torch.nn.functional.pad(x2, (0, k_pad - x2.shape[-1]))
        y = (x2.to(x.dtype) @ w.to(x.dtype).T).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*lead, spec.out_features)


def _padded_buffer(x2: torch.Tensor, k_pad: int, path: str) -> torch.Tensor | None:
    """A zeroed (M, K_pad) buffer (K_pad/2 bytes if packed) for rotate_quant's output; None if K tiles."""
    m, k = x2.shape
    if k == k_pad:
        return None
    if path in ("w4a16", "dequant_matmul"):
        return x2.new_zeros(m, k_pad)
    if path == "w4a4":  # packed int4, two per byte
        return torch.zeros(m, k_pad // 2, dtype=torch.uint8, device=x2.device)
    return torch.zeros(m, k_pad, dtype=torch.int8, device=x2.device)


def _first_columns(buf: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor | None:
    """The view of ``buf`` that rotate_quant fills: the columns of the K real inputs."""
    if buf is None:
        return None
    k = x2.shape[1]
    return buf[:, : k // 2] if buf.dtype == torch.uint8 else buf[:, :k]
