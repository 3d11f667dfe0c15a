"""The checkpoint format's validation: every malformed config is one clear FormatError."""

from __future__ import annotations

import copy

import pytest

from vllm_ruquant.checkpoint.format import FormatError, RotationSpec, RUQuantFormat, linear_tensor_shapes, scheme_format


def good() -> dict:
    return scheme_format("w4a4", online_rotations={"down_proj": RotationSpec("hadamard", 11008)}).to_dict()


def test_round_trip() -> None:
    fmt = RUQuantFormat.from_dict(good())
    assert fmt.to_dict() == good()
    assert fmt.rotation_for("model.layers.3.mlp.down_proj") == RotationSpec("hadamard", 11008)
    assert fmt.rotation_for("model.layers.3.mlp.up_proj") is None
    assert fmt.is_ignored("lm_head") and not fmt.is_ignored("model.layers.0.self_attn.q_proj")


BAD = [
    (lambda c: c.update(quant_method="gptq"), "quant_method"),
    (lambda c: c.update(format_version=2), "format_version is 2"),
    (lambda c: c.pop("format_version"), "format_version is None"),
    (lambda c: c["weight"].update(bits=5), "weight.bits"),
    (lambda c: c["weight"].update(bits="4"), "weight.bits must be int"),
    (lambda c: c["weight"].update(group_size=0), "group_size"),
    (lambda c: c["weight"].update(symmetric=False), "symmetric"),
    (lambda c: c["activation"].update(bits=5), "activation.bits"),
    (lambda c: c["activation"].update(clip_ratio=1.5), "clip_ratio"),
    (lambda c: c["kv_cache"].update(bits=2), "kv_cache.bits"),
    (lambda c: c["online_rotations"].update(up_proj={"kind": "hadamard", "size": 64}), "online rotations are"),
    (lambda c: c["online_rotations"]["down_proj"].update(kind="fourier"), "kind must be one of"),
    (lambda c: c["online_rotations"]["down_proj"].update(size=13696), "no Hadamard rotation of size 13696"),
    (lambda c: c["online_rotations"].update(down_proj={"kind": "block_diagonal", "size": 100, "block_size": 32}),
     "block_size must divide"),
    (lambda c: c["online_rotations"]["down_proj"].update(padded_from=11008), r"padded_from must be in \(0, size"),
    (lambda c: c["online_rotations"]["down_proj"].update(padded_from=True), "padded_from must be int"),
    (lambda c: c["online_rotations"].update(down_proj={"kind": "block_diagonal", "size": 128, "block_size": 32,
                                                       "padded_from": 100}), "for kind 'hadamard' only"),
    (lambda c: c.update(tp_size=2) or c["online_rotations"]["down_proj"].update(padded_from=11000),
     "needs tp_size 1"),
    (lambda c: c.update(extra=1), "unknown keys"),
    (lambda c: c["weight"].update(color="red"), "unknown keys"),
    (lambda c: c.update(weight=[]), "weight must be an object"),
    (lambda c: c.update(ignore="lm_head"), "ignore must be a list"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_malformed_configs_are_clear_errors(mutate, message: str) -> None:
    cfg = copy.deepcopy(good())
    mutate(cfg)
    with pytest.raises(FormatError, match=message):
        RUQuantFormat.from_dict(cfg)


def test_not_an_object() -> None:
    with pytest.raises(FormatError, match="JSON object"):
        RUQuantFormat.from_dict(["ruquant"])


def test_model_shape_mismatch() -> None:
    fmt = RUQuantFormat.from_dict(good())
    fmt.check_model(4096, 11008)
    with pytest.raises(FormatError, match="11008 but the model's input size of down_proj is 14336"):
        fmt.check_model(4096, 14336)


def test_unknown_scheme() -> None:
    with pytest.raises(FormatError, match="unknown scheme 'w2a2'"):
        scheme_format("w2a2")


def test_tensor_shapes() -> None:
    fmt = scheme_format("w4a4")
    assert linear_tensor_shapes(fmt, 32, 64) == {"qweight": ((32, 32), "uint8"), "weight_scale": ((32, 1), "float32")}
    fmt8 = scheme_format("w8a8")
    assert linear_tensor_shapes(fmt8, 32, 64)["qweight"] == ((32, 64), "int8")


def test_dimension_expanded_rotation() -> None:
    """``padded_from``: the model's size is checked against it, the stored weight is ``size`` wide."""
    spec = RotationSpec("hadamard", 176, padded_from=172)
    fmt = scheme_format("w4a4", online_rotations={"down_proj": spec})
    again = RUQuantFormat.from_dict(fmt.to_dict())
    assert again.online_rotations["down_proj"] == spec and spec.in_features == 172
    again.check_model(64, 172)
    with pytest.raises(FormatError, match="padded_from is 172 but the model's input size of down_proj is 176"):
        again.check_model(64, 176)
    assert linear_tensor_shapes(fmt, 64, 172, spec)["qweight"] == ((64, 88), "uint8")
    assert "padded_from" not in scheme_format("w4a4", online_rotations={"down_proj": RotationSpec(
        "hadamard", 176)}).to_dict()["online_rotations"]["down_proj"]  # absent, not null, when unused
    grouped = scheme_format("w4a4", online_rotations={"down_proj": RotationSpec("hadamard", 176, padded_from=172)})
    grouped = RUQuantFormat.from_dict({**grouped.to_dict(), "weight": {"bits": 4, "group_size": 86,
                                                                        "symmetric": True}})
    with pytest.raises(FormatError, match="does not divide the padded input size 176"):
        grouped.check_model(344, 172)  # 86 divides the model's sizes but not 176


def test_o_proj_block_rotation() -> None:
    """``ruquant-online-o``'s per-layer blocks: an o_proj site whose size is heads x head_dim (not the hidden size
    where a model says so), with a stored (nb, b, b) tensor; q/k/v and gate/up take no online rotation."""
    spec = RotationSpec("block_diagonal", 2048, block_size=128)
    fmt = RUQuantFormat.from_dict(scheme_format("w4a4", online_rotations={"o_proj": spec}).to_dict())
    assert fmt.rotation_for("model.layers.3.self_attn.o_proj") == spec
    assert linear_tensor_shapes(fmt, 1024, 2048, spec)["online_rotation"] == ((16, 128, 128), "float32")
    fmt.check_model(1024, 3072, attention_size=2048)  # Qwen3-0.6B: 16 heads x 128 over a hidden size of 1024
    with pytest.raises(FormatError, match="2048 but the model's input size of o_proj is 1024"):
        fmt.check_model(1024, 3072)
    with pytest.raises(FormatError, match="online rotations are supported on"):
        scheme_format("w4a4", online_rotations={"gate_proj": spec}).validate()
