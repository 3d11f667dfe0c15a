"""Folding RMSNorm gammas into linears and absorbing rotations into weights.

All functions work on a flat ``{name: tensor}`` dict of float64 tensors for one decoder
layer (or the embedding / head), and return nothing: they rewrite the dict in place.
Conventions (row vectors, ``y = x W^T``):

* RMSNorm ``norm(x) * gamma`` feeding ``W``: ``W <- W diag(gamma)``, gamma <- 1. After this
  every norm is scale-free, so it commutes with any orthogonal R1: ``norm(x R1) = norm(x) R1``.
* Residual rotation R1 (``h -> h R1``): readers ``W <- W R1``; writers (o, down)
  ``W <- R1^T W`` and their bias ``b <- b R1``; embeddings ``E <- E R1``.
* Head rotation R2 on V/O: each V head ``W_v[h] <- R2^T W_v[h]``, ``b_v[h] <- b_v[h] R2``;
  each O input head ``W_o[:, h] <- W_o[:, h] R2``.
* Online rotation Q on down_proj's input: ``W_down <- W_down Q`` (the plugin feeds ``x Q``).
"""

from __future__ import annotations

import math

import torch

from vllm_ruquant.checkpoint.models import NORM_READERS, READERS, WRITERS, ModelDims
from vllm_ruquant.hadamard import factor_size, small_hadamard
from vllm_ruquant.reference import OnlineRotation


def fold_layer_norms(sd: dict[str, torch.Tensor], prefix: str) -> None:
    for norm, readers in NORM_READERS.items():
        gamma = sd[f"{prefix}.{norm}.weight"]
        for r in readers:
            sd[f"{prefix}.{r}.weight"] = sd[f"{prefix}.{r}.weight"] * gamma.unsqueeze(0)
        sd[f"{prefix}.{norm}.weight"] = torch.ones_like(gamma)


def rotate_layer_residual(sd: dict[str, torch.Tensor], prefix: str, r1: torch.Tensor) -> None:
    for r in READERS:
        sd[f"{prefix}.{r}.weight"] = sd[f"{prefix}.{r}.weight"] @ r1
    for w in WRITERS:
        sd[f"{prefix}.{w}.weight"] = r1.T @ sd[f"{prefix}.{w}.weight"]
        if f"{prefix}.{w}.bias" in sd:
            sd[f"{prefix}.{w}.bias"] = sd[f"{prefix}.{w}.bias"] @ r1


def rotate_layer_heads(sd: dict[str, torch.Tensor], prefix: str, dims: ModelDims, r2: torch.Tensor) -> None:
    hd = dims.head_dim
    v = f"{prefix}.self_attn.v_proj"
    wv = sd[f"{v}.weight"].reshape(dims.num_kv_heads, hd, -1)
    sd[f"{v}.weight"] = torch.einsum("ji,hjk->hik", r2, wv).reshape(dims.num_kv_heads * hd, -1)
    if f"{v}.bias" in sd:
        sd[f"{v}.bias"] = (sd[f"{v}.bias"].reshape(dims.num_kv_heads, hd) @ r2).reshape(-1)
    o = f"{prefix}.self_attn.o_proj.weight"
    wo = sd[o].reshape(sd[o].shape[0], dims.num_heads, hd)
    sd[o] = (wo @ r2).reshape(sd[o].shape[0], -1)


def scale_norm_readers(sd: dict[str, torch.Tensor], prefix: str, norm: str, s: torch.Tensor) -> None:
    """Smoothing at a norm: norm weight ``1/s``, its readers ``W <- W diag(s)`` (after R1).

    The readers then quantize ``norm(h R1) / s`` -- flatter channels -- with the same output.
    """
    sd[f"{prefix}.{norm}.weight"] = sd[f"{prefix}.{norm}.weight"] / s
    for r in NORM_READERS[norm]:
        sd[f"{prefix}.{r}.weight"] = sd[f"{prefix}.{r}.weight"] * s.unsqueeze(0)


def absorb_online_input_rotation(sd: dict[str, torch.Tensor], linear_prefix: str, q: torch.Tensor) -> None:
    sd[f"{linear_prefix}.weight"] = sd[f"{linear_prefix}.weight"] @ q


def times_online_rotation(w: torch.Tensor, rot: OnlineRotation) -> torch.Tensor:
    """``w @ rot.matrix()`` in ``w``'s dtype and on its device; a Hadamard without its dense matrix.

    The dense Q of a Llama-3-70B down_proj input (28672 = 28 x 1024) is 6.6 GB in fp64 and 13.5
    TFLOP to apply to the weight; its Kronecker factors ``H_m (x) H_p`` cost p / size of that.
    The scale is the fp32 ``1/sqrt(b)`` that every entry of ``rot.matrix()`` carries, so both give
    the same weight up to fp64 rounding.
    """
    if rot.kind != "hadamard":
        return w @ rot.matrix().to(w)
    x = rot.pad(w)
    b = rot.block_size or rot.size
    m, p = factor_size(b)
    y = x.reshape(*x.shape[:-1], -1, m, p) @ small_hadamard(p).to(x)
    if m > 1:
        y = torch.einsum("...ap,ai->...ip", y, small_hadamard(m).to(x))
    scale = float(torch.ones((), dtype=torch.float32) / math.sqrt(b))
    return (y * scale).reshape(*x.shape[:-1], rot.size)


def absorb_online_rotation(sd: dict[str, torch.Tensor], linear_prefix: str, rot: OnlineRotation) -> None:
    """``W <- W Q`` for the online rotation ``rot`` of the linear's input (``times_online_rotation``)."""
    sd[f"{linear_prefix}.weight"] = times_online_rotation(sd[f"{linear_prefix}.weight"], rot)


def fold_head(head: torch.Tensor, final_norm: torch.Tensor, r1: torch.Tensor | None) -> torch.Tensor:
    """lm_head with the final norm's gamma folded in and the residual rotation absorbed."""
    w = head * final_norm.unsqueeze(0)
    return w @ r1 if r1 is not None else w
