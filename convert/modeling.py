"""A small functional forward of the Llama-family decoder, for calibration and evaluation.

The converter needs to run one decoder layer at a time on calibration activations, with
every linear replaced by a callback (to record GPTQ Hessians, or to simulate the served
quantized linear). Writing the forward here, in ~100 lines of plain torch, keeps it
independent of the installed transformers version; tests check it against transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from convert.errors import ConvertError, ExitCode
from vllm_ruquant.checkpoint.models import ModelDims

# linear(full_prefix, x) -> y
LinearFn = Callable[[str, torch.Tensor], torch.Tensor]
# get(tensor_name) -> tensor
TensorFn = Callable[[str], torch.Tensor]
# kv_quant(k, v), each (b, kv_heads, t, head_dim) after RoPE -> (k, v) as the cache returns them
KVQuantFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight.float() if weight is not None else y


def rope_inv_freq(dims: ModelDims) -> torch.Tensor:
    """Rotary inverse frequencies, including Llama-3 and linear scaling."""
    hd = dims.head_dim
    inv = 1.0 / (dims.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = dims.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if kind in ("default", None):
        return inv.float()
    if kind == "linear":
        return (inv / float(sc["factor"])).float()
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        return scaled.float()
    raise ConvertError(f"rope scaling {kind!r} is not supported by the converter", ExitCode.UNSUPPORTED)


def rope_tables(dims: ModelDims, seq_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    inv = rope_inv_freq(dims).to(device)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, t, hd); the half-split (neox) rotary layout Llama checkpoints use."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


def attention_block(
    h: torch.Tensor, prefix: str, dims: ModelDims, linear: LinearFn, get: TensorFn,
    rope: tuple[torch.Tensor, torch.Tensor], kv_quant: KVQuantFn | None = None,
    norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual update of the attention sub-block: returns attn(norm(h))."""
    b, t, _ = h.shape
    x = rms_norm(h, norm_weight, dims.rms_norm_eps)
    a = f"{prefix}.self_attn"
    q = linear(f"{a}.q_proj", x).float().view(b, t, dims.num_heads, dims.head_dim).transpose(1, 2)
    k = linear(f"{a}.k_proj", x).float().view(b, t, dims.num_kv_heads, dims.head_dim).transpose(1, 2)
    v = linear(f"{a}.v_proj", x).float().view(b, t, dims.num_kv_heads, dims.head_dim).transpose(1, 2)
    if dims.qk_norm:
        q = rms_norm(q, get(f"{a}.q_norm.weight"), dims.rms_norm_eps)
        k = rms_norm(k, get(f"{a}.k_norm.weight"), dims.rms_norm_eps)
    cos, sin = rope
    q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
    if kv_quant is not None:
        k, v = kv_quant(k, v)
    k = k.repeat_interleave(dims.kv_groups, dim=1)
    v = v.repeat_interleave(dims.kv_groups, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    o = o.transpose(1, 2).reshape(b, t, dims.attention_size)
    return linear(f"{a}.o_proj", o.to(h.dtype)).float()


def mlp_block(h: torch.Tensor, prefix: str, dims: ModelDims, linear: LinearFn,
              norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    x = rms_norm(h, norm_weight, dims.rms_norm_eps)
    m = f"{prefix}.mlp"
    g = linear(f"{m}.gate_proj", x).float()
    u = linear(f"{m}.up_proj", x).float()
    return linear(f"{m}.down_proj", F.silu(g) * u).float()


def decoder_layer(
    h: torch.Tensor, i: int, dims: ModelDims, linear: LinearFn, get: TensorFn,
    rope: tuple[torch.Tensor, torch.Tensor], kv_quant: KVQuantFn | None = None,
) -> torch.Tensor:
    """One decoder layer, h (b, t, d) fp32 -> fp32; norms read through ``get``."""
    p = dims.layer_prefix(i)
    h = h + attention_block(h, p, dims, linear, get, rope, kv_quant, get(f"{p}.input_layernorm.weight"))
    return h + mlp_block(h, p, dims, linear, get(f"{p}.post_attention_layernorm.weight"))


def dense_linear(get: TensorFn) -> LinearFn:
    """The plain full-precision linear over tensors named ``<prefix>.weight`` / ``.bias``."""

    def linear(prefix: str, x: torch.Tensor) -> torch.Tensor:
        y = x.float() @ get(f"{prefix}.weight").float().T
        try:
            return y + get(f"{prefix}.bias").float()
        except KeyError:
            return y

    return linear


def lm_logits(h: torch.Tensor, dims: ModelDims, get: TensorFn) -> torch.Tensor:
    x = rms_norm(h, get("model.norm.weight"), dims.rms_norm_eps)
    head = "model.embed_tokens.weight" if dims.tie_word_embeddings else "lm_head.weight"
    return x @ get(head).float().T
