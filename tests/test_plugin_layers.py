"""RUQuantConfig / RUQuantLinearMethod inside real vLLM linear layers, without an engine:
weight loading of merged (QKV, gate/up) and row-parallel layers, TP>1 shard slicing of
the declared parameters, random (``--load-format dummy``-like) weights, config errors."""

from __future__ import annotations

import pytest
import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.format import ActivationSpec, KVCacheSpec, RotationSpec, RUQuantFormat, WeightSpec

H, I_SIZE, NH, NKV, HD = 128, 256, 4, 2, 32


def _config(**kw):
    from vllm_ruquant.config import RUQuantConfig

    return RUQuantConfig.from_config(RUQuantFormat(**kw).to_dict())


def _quantized(w: torch.Tensor, f: RUQuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = ref.quantize_weight(w, f.weight.bits, f.weight.group_size)
    return ref.pack_weight(q, f.weight.bits), s


def _expected(x, ws, f, rotation=None):
    w = torch.cat(ws)
    q, s = ref.quantize_weight(w, f.weight.bits, f.weight.group_size)
    return ref.quantized_linear(x, q, s, act_bits=f.activation.bits, group_size=f.weight.group_size,
                                clip_ratio=f.activation.clip_ratio, rotation=rotation)


FORMATS = [
    dict(weight=WeightSpec(4, -1), activation=ActivationSpec(4)),
    dict(weight=WeightSpec(4, 64), activation=ActivationSpec(8)),
    dict(weight=WeightSpec(8, -1), activation=ActivationSpec(8)),
    dict(weight=WeightSpec(4, 32), activation=ActivationSpec(16)),
]


@pytest.mark.parametrize("kw", FORMATS, ids=lambda k: f"w{k['weight'].bits}g{k['weight'].group_size}"
                         f"a{k['activation'].bits}")
def test_qkv_merged_loading_and_apply(vllm_ctx, kw):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    cfg = _config(**kw)
    layer = QKVParallelLinear(H, HD, NH, NKV, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj")
    g = torch.Generator().manual_seed(0)
    ws = {s: torch.randn(n * HD, H, generator=g) for s, n in (("q", NH), ("k", NKV), ("v", NKV))}
    for shard, w in ws.items():
        qw, sc = _quantized(w, cfg.fmt)
        layer.qweight.weight_loader(layer.qweight, qw, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, sc, shard)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, H, generator=g)
    y = layer.quant_method.apply(layer, x)
    torch.testing.assert_close(y, _expected(x, [ws["q"], ws["k"], ws["v"]], cfg.fmt), rtol=0, atol=0)


def test_gate_up_merged_and_row_parallel_with_rotations(vllm_ctx):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    for rot in (RotationSpec("hadamard", I_SIZE), RotationSpec("block_diagonal", I_SIZE, block_size=64)):
        cfg = _config(weight=WeightSpec(4, 64), activation=ActivationSpec(4),
                      online_rotations={"down_proj": rot})
        g = torch.Generator().manual_seed(1)
        gate_up = MergedColumnParallelLinear(H, [I_SIZE, I_SIZE], bias=False, quant_config=cfg,
                                             prefix="model.layers.0.mlp.gate_up_proj")
        wg, wu = torch.randn(I_SIZE, H, generator=g), torch.randn(I_SIZE, H, generator=g)
        for shard, w in enumerate((wg, wu)):
            qw, sc = _quantized(w, cfg.fmt)
            gate_up.qweight.weight_loader(gate_up.qweight, qw, shard)
            gate_up.weight_scale.weight_loader(gate_up.weight_scale, sc, shard)
        gate_up.quant_method.process_weights_after_loading(gate_up)
        x = torch.randn(3, H, generator=g)
        torch.testing.assert_close(gate_up.quant_method.apply(gate_up, x), _expected(x, [wg, wu], cfg.fmt),
                                   rtol=0, atol=0)

        down = RowParallelLinear(I_SIZE, H, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
        blocks = None
        if rot.kind == "block_diagonal":
            q_, _ = torch.linalg.qr(torch.randn(I_SIZE // 64, 64, 64, generator=g))
            blocks = q_.contiguous()
            down.online_rotation.weight_loader(down.online_rotation, blocks)
        rotation = ref.OnlineRotation(rot.kind, rot.size, blocks)
        wd = torch.randn(H, I_SIZE, generator=g) @ rotation.matrix()
        qw, sc = _quantized(wd, cfg.fmt)
        down.qweight.weight_loader(down.qweight, qw)
        down.weight_scale.weight_loader(down.weight_scale, sc)
        down.quant_method.process_weights_after_loading(down)
        xd = torch.randn(3, I_SIZE, generator=g)
        torch.testing.assert_close(down.quant_method.apply(down, xd), _expected(xd, [wd], cfg.fmt, rotation),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("group_size", [-1, 64])
def test_tp2_shard_slices(vllm_ctx, group_size):
    """With 2 ranks, each rank's parameters receive its slice of the checkpoint tensors:
    output rows for column-parallel, packed input columns (and group scales) for row-parallel."""
    from vllm_ruquant.linear import RUQuantLinearMethod

    cfg = _config(weight=WeightSpec(4, group_size), activation=ActivationSpec(4))
    full_q = torch.randint(0, 256, (H, I_SIZE // 2), dtype=torch.uint8)
    full_s = torch.rand(H, 1 if group_size == -1 else I_SIZE // group_size)
    for rank in range(2):
        method = RUQuantLinearMethod(cfg, "model.layers.0.mlp.down_proj")
        layer = torch.nn.Module()
        method.create_weights(layer, I_SIZE // 2, [H], I_SIZE, H, torch.float32,
                              weight_loader=lambda p, w: p.load_row_parallel_weight(w))
        for p in (layer.qweight, layer.weight_scale):
            p.tp_rank, p.tp_size = rank, 2
        layer.qweight.weight_loader(layer.qweight, full_q)
        layer.weight_scale.weight_loader(layer.weight_scale, full_s)
        k2 = I_SIZE // 4  # packed columns per rank
        assert torch.equal(layer.qweight.data, full_q[:, rank * k2:(rank + 1) * k2])
        if group_size == -1:
            assert torch.equal(layer.weight_scale.data, full_s)
        else:
            gpr = I_SIZE // 2 // group_size
            assert torch.equal(layer.weight_scale.data, full_s[:, rank * gpr:(rank + 1) * gpr])

        col = torch.nn.Module()
        method.create_weights(col, H, [I_SIZE // 2], H, I_SIZE, torch.float32,
                              weight_loader=lambda p, w: p.load_column_parallel_weight(w))
        for p in (col.qweight, col.weight_scale):
            p.tp_rank, p.tp_size = rank, 2
        full_cq = torch.randint(0, 256, (I_SIZE, H // 2), dtype=torch.uint8)
        col.qweight.weight_loader(col.qweight, full_cq)
        assert torch.equal(col.qweight.data, full_cq[rank * I_SIZE // 2:(rank + 1) * I_SIZE // 2])


def test_online_rotation_under_tp_is_a_clear_error(vllm_ctx):
    from vllm_ruquant.linear import RUQuantLinearMethod

    cfg = _config(online_rotations={"down_proj": RotationSpec("hadamard", I_SIZE)})
    method = RUQuantLinearMethod(cfg, "model.layers.0.mlp.down_proj")
    with pytest.raises(NotImplementedError, match="tensor-parallel"):
        method.create_weights(torch.nn.Module(), I_SIZE // 2, [H], I_SIZE, H, torch.float32,
                              weight_loader=lambda p, w: None)


def test_random_weights_do_not_crash(vllm_ctx):
    """``--load-format dummy`` leaves integers uninitialised and fills floats with U(-1e-3, 1e-3)."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    cfg = _config(weight=WeightSpec(4, 64), activation=ActivationSpec(4),
                  online_rotations={"down_proj": RotationSpec("block_diagonal", I_SIZE, block_size=64)})
    layer = RowParallelLinear(I_SIZE, H, bias=True, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    for p in layer.parameters():
        if p.is_floating_point():
            p.data.uniform_(-1e-3, 1e-3)
    layer.quant_method.process_weights_after_loading(layer)
    y = layer.quant_method.apply(layer, torch.randn(4, I_SIZE), layer.bias)
    assert y.shape == (4, H) and torch.isfinite(y).all()


def test_quant_method_per_layer(vllm_ctx):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod

    from vllm_ruquant.linear import RUQuantLinearMethod

    cfg = _config()
    lm_head = ReplicatedLinear(H, 64, bias=False, quant_config=cfg, prefix="lm_head")
    q = ReplicatedLinear(H, 64, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(lm_head.quant_method, UnquantizedLinearMethod)
    assert isinstance(q.quant_method, RUQuantLinearMethod)
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None


def test_config_errors_are_clear():
    from vllm_ruquant.config import RUQuantConfig, RUQuantConfigError

    good = RUQuantFormat().to_dict()
    with pytest.raises(RUQuantConfigError, match="format_version"):
        RUQuantConfig.from_config({**good, "format_version": 99})
    with pytest.raises(RUQuantConfigError, match="value_rotation"):
        RUQuantConfig.from_config(RUQuantFormat(kv_cache=KVCacheSpec(4, value_rotation="later")).to_dict())
    with pytest.raises(RUQuantConfigError, match="ruquant-convert"):
        RUQuantConfig()
    cfg = RUQuantConfig.from_config(good)
    assert cfg.get_name() == fmt_mod.QUANT_METHOD
    assert torch.bfloat16 in cfg.get_supported_act_dtypes()


def test_register_is_idempotent_and_visible():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import vllm_ruquant
    from vllm_ruquant.config import RUQuantConfig

    vllm_ruquant.register()
    vllm_ruquant.register()
    assert QUANTIZATION_METHODS.count("ruquant") == 1
    assert get_quantization_config("ruquant") is RUQuantConfig


def test_layers_of_one_shape_share_one_op_kind_and_keep_their_own_tensors():
    """``ruquant::linear`` is called with a kind id shared by same-shaped layers (so vLLM compiles
    the decoder layers' isometric graphs once) and with each layer's own tensors, block-diagonal
    rotation blocks included."""
    from vllm_ruquant import ops
    from vllm_ruquant.linear_backend import LinearSpec, ReferenceBackend

    backend = ReferenceBackend()
    n, k, b = 16, 64, 16

    def layer(seed: int, out_features: int = n):
        g = torch.Generator().manual_seed(seed)
        blocks = torch.linalg.qr(torch.randn(k // b, b, b, generator=g))[0]
        rot = ref.OnlineRotation("block_diagonal", k, blocks)
        spec = LinearSpec(k, out_features, 4, -1, 8, rotation=rot)
        w_q, w_s = ref.quantize_weight(torch.randn(out_features, k, generator=g), 4)
        prepared = backend.prepare(spec, ref.pack_weight(w_q, 4), w_s)
        return spec, prepared, w_q, w_s, rot

    (spec_a, prep_a, wq_a, ws_a, rot_a), (spec_b, prep_b, wq_b, ws_b, rot_b) = layer(1), layer(2)
    kind_a, kind_b = ops.register_layer(backend, spec_a, prep_a), ops.register_layer(backend, spec_b, prep_b)
    assert kind_a == kind_b
    assert ops.register_layer(backend, layer(3, out_features=2 * n)[0], layer(3, out_features=2 * n)[1]) != kind_a
    assert ops.LAYER_BACKENDS[-3:] == ["reference"] * 3
    x = torch.randn(5, k)
    for prep, w_q, w_s, rot in ((prep_a, wq_a, ws_a, rot_a), (prep_b, wq_b, ws_b, rot_b)):
        y = ops.linear_op(x, list(prep.values()), None, kind_a)
        torch.testing.assert_close(y, ref.quantized_linear(x, w_q, w_s, act_bits=8, rotation=rot), rtol=0, atol=0)
    no_blocks = dict(prep_a)
    del no_blocks["rot_blocks"]
    with pytest.raises(ValueError, match="must prepare 'rot_blocks'"):
        ops.register_layer(backend, spec_a, no_blocks)
