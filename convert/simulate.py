"""Simulated serving: the linear layers and KV cache exactly as the plugin computes them.

Both the converter (layer outputs for the next layer's calibration, error metrics) and
``evaluate.py`` (perplexity of a written checkpoint) go through here, and the plugin's
CPU path runs the same ``vllm_ruquant.reference`` ops, so "simulated" and "served" differ
only by what vLLM does outside the linears (attention kernels, dtype casts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from convert.modeling import KVQuantFn, LinearFn
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod

# ``<prefix>.online_blocks``: float32 (nb, b, b), an online block-diagonal rotation of the
# linear's input applied AFTER the format's online rotation of that site (if any) and before
# the activation quantization; the weight has it absorbed. Written by ``--rotation
# ruquant-online`` for the inputs the format cannot carry (q/k/v, gate/up, down_proj after R4;
# o_proj's blocks are its format rotation, ``pipeline.served_block_sites``). Not part of the
# checkpoint format (version 1): ``ruquant-validate`` and the plugin refuse a checkpoint that
# carries it ("unexpected tensor"), so it is never served without its rotation; this
# simulation (``ruquant-eval``) applies it.
ONLINE_BLOCKS = "online_blocks"


def checkpoint_linear(fmt: fmt_mod.RUQuantFormat | None, get: Callable[[str], torch.Tensor],
                      has: Callable[[str], bool], compute_dtype: torch.dtype = torch.float32,
                      observe: Callable[[str, torch.Tensor], None] | None = None) -> LinearFn:
    """A LinearFn over checkpoint tensors: quantized where ``<prefix>.qweight`` exists.

    ``observe(prefix, x2)`` sees each full-precision linear's 2-D input as the layer
    consumes it (after its online rotation): the converter's Hessian hook.
    """
    cache: dict[str, tuple] = {}

    def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
        if prefix not in cache:
            bias_name = fmt_mod.tensor_name(prefix, fmt_mod.BIAS)
            bias = get(bias_name) if has(bias_name) else None
            qname = fmt_mod.tensor_name(prefix, fmt_mod.QWEIGHT)
            rot = site_rotation(fmt, get, has, prefix)
            if has(qname):
                assert fmt is not None
                w_q = ref.unpack_weight(get(qname), fmt.weight.bits)
                scale = get(fmt_mod.tensor_name(prefix, fmt_mod.WEIGHT_SCALE)).float()
                cache[prefix] = ("q", w_q, scale, bias, rot)
            else:
                cache[prefix] = ("fp", get(f"{prefix}.weight").float(), None, bias, rot)
        kind, w, scale, bias, rot = cache[prefix]
        xc = x.to(compute_dtype)
        if kind == "q":
            assert fmt is not None
            return ref.quantized_linear(
                xc, w, scale, act_bits=fmt.activation.bits, group_size=fmt.weight.group_size,
                clip_ratio=fmt.activation.clip_ratio, rotation=rot, bias=bias, out_dtype=torch.float32,
                act_shards=fmt.act_shards(prefix))
        x2 = rot.apply(xc) if rot is not None else xc.float()
        x2 = x2.reshape(-1, x2.shape[-1])  # a dimension-expanded rotation widens it
        if observe is not None:
            observe(prefix, x2)
        y = (x2 @ w.T).reshape(*xc.shape[:-1], -1)
        return y + bias.float() if bias is not None else y

    return linear


def site_rotation(fmt: fmt_mod.RUQuantFormat | None, get: Callable[[str], torch.Tensor],
                  has: Callable[[str], bool], prefix: str) -> ref.OnlineRotation | BlockAfter | None:
    """The online rotation of linear ``prefix``'s input as served: the format's (with its stored blocks,
    if any), then the ``online_blocks`` of ``--rotation ruquant-online`` (one rotation as the kernel sees it)."""
    spec = fmt.rotation_for(prefix) if fmt is not None else None
    rot = None
    if spec is not None:
        blocks_name = fmt_mod.tensor_name(prefix, fmt_mod.ONLINE_ROTATION)
        rot = fmt_mod.online_rotation(spec, get(blocks_name) if has(blocks_name) else None)
    blocks_name = fmt_mod.tensor_name(prefix, ONLINE_BLOCKS)
    if has(blocks_name):
        return BlockAfter(rot, get(blocks_name).float())
    return rot


class BlockAfter:
    """``x -> block_diagonal(first(x), blocks)``: an online rotation (or none) followed by a
    block-diagonal one, with ``reference.OnlineRotation``'s ``apply`` / ``matrix``, so
    ``reference.quantized_linear`` quantizes what it returns (in fp32, as the block op does)."""

    def __init__(self, first: ref.OnlineRotation | None, blocks: torch.Tensor) -> None:
        self.first, self.blocks = first, blocks
        self.size = blocks.shape[0] * blocks.shape[1]
        self.in_features = first.in_features if first is not None else self.size

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return ref.block_diagonal_rotate(self.first.apply(x) if self.first is not None else x.float(), self.blocks)

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.in_features, dtype=torch.float32))


def kv_cache_quantizer(spec: fmt_mod.KVCacheSpec, online_rotation: bool = True,
                       straight_through: bool = False) -> KVQuantFn | None:
    """The KV cache as served for ``spec`` (``reference.simulate_kv_cache``); None at 16 bits.

    ``online_rotation=False``: the no-rotation ablation (``ruquant-eval --kv-no-rotation``).
    ``straight_through``: gradients pass around the rounding (RUQuant's rotation learning).
    """
    if spec.bits >= 16:
        return None
    offline = spec.value_rotation == "offline"

    def kv_quant(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.simulate_kv_cache(k, v, spec.bits, value_rotated_offline=offline,
                                     straight_through=straight_through, online_rotation=online_rotation)

    return kv_quant
