"""Issue 6, acceptance 2: a checkpoint converted with ``--tp-size 2`` loads under a simulated
2-way shard split (each rank's parameters filled by vLLM's own weight loaders, as vLLM
would) and the ranks' outputs, concatenated (column-parallel) or summed (row-parallel),
equal the converter's simulated forward of the same layer.

Real TP=2 engines are in ``test_tensor_parallel_served.py`` (issue 25). This split stays
because it checks each site on its own and exactly (1e-5, no rounding flips allowed), where
the served test compares whole-model logprobs with the flip tolerance of a 4-bit model: a
wrong shard here names the layer and loader, and it needs no engine or worker processes.
The model's intermediate size 344 splits into shards of 172: each rank's down_proj input
is rotated by the Williamson H_172 (issue 25).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert import cli
from convert.simulate import checkpoint_linear
from convert.tiny_models import make_tiny_llama
from vllm_ruquant import compat
from vllm_ruquant.checkpoint import format as fmt_mod

TP = 2
LAYER = "model.layers.1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp")
    make_tiny_llama(root / "src", arch="qwen2", intermediate_size=344, seed=4)
    out = root / "w4a4-tp2"
    assert cli.main([str(root / "src"), str(out), "--scheme", "w4a4", "--tp-size", str(TP),
                     "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    return out


def test_344_converts_with_one_172_hadamard_per_shard(ckpt) -> None:
    """``--tp-size 2`` of the quickstart's intermediate 344 (was: "no Hadamard rotation of the
    shard size 172"). (11008 splits into 5504 = 344 * 16: test_reference checks that factor.)"""
    fmt = fmt_mod.RUQuantFormat.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    assert fmt.online_rotations["down_proj"] == fmt_mod.RotationSpec("hadamard", 344, block_size=172)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, shard in index.items():
        if name.startswith(LAYER + "."):
            with safe_open(str(ckpt / shard), "pt") as f:
                out[name] = f.get_tensor(name)
    return out


def _rank_layer(cfg, prefix: str, rank: int, tensors: dict[str, torch.Tensor], row_parallel: bool):
    """One rank's linear layer: parameters created for its shard and loaded by vLLM's loaders."""
    from vllm_ruquant.linear import RUQuantLinearMethod

    n, k = tensors[f"{prefix}.weight_scale"].shape[0], tensors[f"{prefix}.qweight"].shape[1] * 2
    method = RUQuantLinearMethod(cfg, prefix)
    layer = torch.nn.Module()
    if row_parallel:
        method.create_weights(layer, k // TP, [n], k, n, torch.float32,
                              weight_loader=lambda p, w: p.load_row_parallel_weight(w))
    else:
        method.create_weights(layer, k, [n // TP], k, n, torch.float32,
                              weight_loader=lambda p, w: p.load_column_parallel_weight(w))
    for name, param in layer.named_parameters():
        param.tp_rank, param.tp_size = rank, TP
        param.weight_loader(param, tensors[f"{prefix}.{name}"])
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.mark.parametrize("site,row_parallel", [("self_attn.q_proj", False), ("self_attn.v_proj", False),
                                                ("self_attn.o_proj", True), ("mlp.up_proj", False),
                                                ("mlp.down_proj", True)])
def test_two_ranks_reproduce_the_simulated_layer(ckpt, vllm_ctx, monkeypatch, site: str, row_parallel: bool):
    from vllm_ruquant.config import RUQuantConfig

    monkeypatch.setattr(compat, "tensor_parallel_world_size", lambda: TP)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    cfg = RUQuantConfig.from_config(qcfg)
    assert cfg.fmt.tp_size == TP
    tensors = _tensors(ckpt)
    prefix = f"{LAYER}.{site}"
    k = tensors[f"{prefix}.qweight"].shape[1] * 2
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(3)) * 3

    outs = []
    for rank in range(TP):
        method, layer = _rank_layer(cfg, prefix, rank, tensors, row_parallel)
        xr = x[:, rank * k // TP:(rank + 1) * k // TP] if row_parallel else x
        bias = tensors.get(f"{prefix}.bias")  # column-parallel: each rank adds its slice
        if bias is not None:
            bias = bias.chunk(TP)[rank] if not row_parallel else (bias if rank == 0 else None)
        outs.append(method.apply(layer, xr, bias))
    served = torch.stack(outs).sum(0) if row_parallel else torch.cat(outs, dim=-1)

    fmt = fmt_mod.RUQuantFormat.from_dict(qcfg)
    simulated = checkpoint_linear(fmt, tensors.__getitem__, tensors.__contains__)(prefix, x)
    torch.testing.assert_close(served, simulated, rtol=1e-5, atol=1e-5)


def test_serving_at_another_tp_size_is_refused(ckpt, vllm_ctx):
    from vllm_ruquant.config import RUQuantConfig
    from vllm_ruquant.linear import RUQuantLinearMethod

    cfg = RUQuantConfig.from_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    method = RUQuantLinearMethod(cfg, f"{LAYER}.mlp.down_proj")
    with pytest.raises(ValueError, match="converted for --tensor-parallel-size 2.*runs with 1"):
        method.create_weights(torch.nn.Module(), 512, [128], 512, 128, torch.float32, weight_loader=None)


def test_tp_size_that_does_not_divide_is_a_clear_error(tmp_path: Path, capsys) -> None:
    src = make_tiny_llama(tmp_path / "src", intermediate_size=256)
    assert cli.main([str(src), str(tmp_path / "out"), "--tp-size", "3", "--calib-samples", "2",
                     "--calib-seq-len", "32"]) != 0
    assert "--tp-size 3 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
