"""Helpers for the converter tests (imported top-level, as ``plugin_helpers``: see conftest.py)."""

from __future__ import annotations

import torch

from convert.modeling import decoder_layer, lm_logits, rope_tables
from convert.simulate import checkpoint_linear
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import model_dims


def simulated_logits(tensors: dict[str, torch.Tensor], cfg: dict, fmt: fmt_mod.RUQuantFormat | None,
                     tokens: torch.Tensor) -> torch.Tensor:
    """Logits of an in-memory converted model (``InMemorySink.tensors``) through the simulated serving
    linears: integer tensors as stored, everything else in fp32."""
    dims = model_dims({**cfg, "tie_word_embeddings": False})

    def get(name: str) -> torch.Tensor:
        t = tensors[name]
        return t if t.dtype in (torch.uint8, torch.int8) else t.float()

    lin = checkpoint_linear(fmt, get, tensors.__contains__)
    h = get("model.embed_tokens.weight")[tokens]
    rope = rope_tables(dims, tokens.shape[-1])
    for i in range(dims.num_layers):
        h = decoder_layer(h, i, dims, lin, get, rope)
    return lm_logits(h, dims, get)
