"""``ruquant-online`` (issue 24 item 1): RUQuant stage-1 blocks fitted per layer and per linear input,
applied online after R1 / R2 / R4 with the inverse absorbed into the linear. CPU invariants: the blocks
are orthogonal, the absorbed + online pair leaves the unquantized model's output unchanged, the
simulation applies the stored blocks before quantizing, the fit is deterministic, and a checkpoint
that carries blocks outside o_proj is refused by the validator (the format has no field for them);
o_proj's are its format rotation, served (test_plugin_converted, test_tensor_parallel_served)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from convert import cli
from convert.evaluate import Evaluator, LoadedModel
from convert.pipeline import Converter, ConvertOptions, InMemorySink
from convert.rotations import ruquant_online
from convert.rotations.ruquant_online import block_apply, fit_site
from convert.simulate import ONLINE_BLOCKS, checkpoint_linear
from convert.tiny_models import make_tiny_llama
from convert_helpers import simulated_logits
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.errors import RUQuantError
from vllm_ruquant.checkpoint.validate import validate

FAST = dict(calib_samples=4, calib_seq_len=32)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("rqo") / "llama", arch="llama", intermediate_size=256, seed=3)


@pytest.fixture(autouse=True)
def short_stage1(monkeypatch) -> None:
    """Fewer stage-1 steps than the default (mechanics, not the optimum; 2 shared cores)."""
    from convert.rotations import ruquant

    fast = ruquant.Stage1Config(steps=6, givens_rounds=2, max_rows=1024)
    monkeypatch.setattr(ruquant_online, "STAGE1", fast)
    monkeypatch.setattr(ruquant, "STAGE1", fast)
    monkeypatch.setattr(ruquant, "STAGE2", ruquant.Stage2Config(steps=3))


def _outliers(n: int = 1024, d: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 5] += 20 * torch.rand(n, generator=g, dtype=torch.float64)
    x[: n // 16, 77] -= 40
    return x


def test_fit_site_blocks_are_orthogonal_and_never_worse_on_held_out_rows() -> None:
    x = _outliers()
    cfg = ruquant_online.Stage1Config(steps=8, givens_rounds=2, max_rows=1024)
    m, facts = fit_site(x, 768, 4, cfg, torch.Generator().manual_seed(0), block=64)
    assert facts["block"] == 64 and set(facts["held_out_row_mse"]) >= {"identity", "blocks"}
    assert m is not None, facts  # outlier channels: some candidate beats identity on the held-out rows
    nb, b, _ = m.shape
    assert (nb, b) == (2, 64)
    eye = torch.eye(b, dtype=torch.float64).expand(nb, b, b)
    assert torch.allclose(m.transpose(1, 2) @ m, eye, atol=1e-10)
    errs = facts["held_out_row_mse"]
    assert errs[facts["choice"]] == min(errs.values()) < errs["identity"]
    # the choice is made on rows the fit did not see
    from convert.rotations.ruquant import row_quant_mse

    assert row_quant_mse(block_apply(x[768:], m), 4) == pytest.approx(errs[facts["choice"]])


@pytest.mark.parametrize("rotation", ["ruquant-online", "ruquant-online-o", "ruquant-online-pooled"])
def test_absorbed_and_online_blocks_preserve_the_function(llama: Path, rotation: str) -> None:
    """Quantization off: W diag(B) with x -> B(R4(x)) online is the original model (fp32 tolerance)."""
    sink = InMemorySink()
    report = Converter(llama, ConvertOptions(rotation=rotation, quantize=False, **FAST)).run(sink)
    t = sink.tensors
    # o_proj's blocks are the format's online rotation there (served); the other sites' are online_blocks
    o_rotation = f"o_proj.{fmt_mod.ONLINE_ROTATION}"
    stored = {n: v for n, v in t.items() if n.endswith(ONLINE_BLOCKS) or n.endswith(o_rotation)}
    assert stored, report["rotation"]["online_blocks"]["choices"]
    assert not any(n.endswith(f"o_proj.{ONLINE_BLOCKS}") for n in t)
    for n, blocks in stored.items():
        assert blocks.dtype == torch.float32 and blocks.dim() == 3
        nb, b, _ = blocks.shape
        eye = torch.eye(b).expand(nb, b, b)
        assert torch.allclose(blocks.transpose(1, 2) @ blocks, eye, atol=1e-5), n
    # q / k / v read one input: one set of blocks for all three (or none)
    for i in range(2):
        qkv = [t.get(f"model.layers.{i}.self_attn.{n}.{ONLINE_BLOCKS}") for n in ("q_proj", "k_proj", "v_proj")]
        assert all(x is None for x in qkv) or all(torch.equal(qkv[0], x) for x in qkv)
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = Evaluator(LoadedModel.open(llama), torch.device("cpu")).logits(tokens)
    cfg = json.loads((llama / "config.json").read_text())
    fmt = fmt_mod.RUQuantFormat.from_dict(report["format"])
    got = simulated_logits(t, cfg, fmt, tokens)
    assert float((got - want).norm() / want.norm()) < 1e-4
    # ... and without the online blocks (absorbed only) it is not
    bare = {n: v for n, v in t.items() if n not in stored}
    bare_fmt = dataclasses.replace(
        fmt, online_rotations={k: v for k, v in fmt.online_rotations.items() if k != "o_proj"})
    assert float((simulated_logits(bare, cfg, bare_fmt, tokens) - want).norm() / want.norm()) > 1e-2
    rep = report["rotation"]["online_blocks"]
    assert set(rep["choices"]) == ({"o"} if rotation == "ruquant-online-o" else {"qkv", "o", "gate_up", "down"})
    assert rep["timings"]["fit_s"] >= 0
    if rotation == "ruquant-online-o":
        assert set(stored) == {f"model.layers.{i}.self_attn.{o_rotation}" for i in range(2)}  # identity where unfit
        assert fmt.online_rotations["o_proj"] == fmt_mod.RotationSpec("block_diagonal", 128, block_size=128)


def test_simulation_rotates_by_the_blocks_before_quantizing() -> None:
    """``checkpoint_linear`` with ``<prefix>.online_blocks``: quantized_linear of B(R4(x)) with the stored weight."""
    g = torch.Generator().manual_seed(1)
    k, n, b = 256, 48, 128
    q, _ = torch.linalg.qr(torch.randn(2, b, b, generator=g, dtype=torch.float64))
    blocks = q.float()
    w = torch.randn(n, k, generator=g)
    fmt = fmt_mod.scheme_format("w4a4", online_rotations={"down_proj": fmt_mod.RotationSpec("hadamard", k)})
    wq, ws = ref.quantize_weight(w, 4, -1)
    p = "model.layers.0.mlp.down_proj"
    tensors = {f"{p}.qweight": ref.pack_weight(wq, 4), f"{p}.weight_scale": ws, f"{p}.{ONLINE_BLOCKS}": blocks}
    x = torch.randn(5, k, generator=g)
    got = checkpoint_linear(fmt, tensors.__getitem__, tensors.__contains__)(p, x)
    rotated = ref.block_diagonal_rotate(ref.hadamard_transform(x), blocks)
    want = ref.quantized_linear(rotated, wq, ws, act_bits=4, out_dtype=torch.float32)
    assert torch.equal(got, want)


def test_quantized_checkpoint_runs_in_simulation_and_is_refused_by_the_validator(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "online"
    assert cli.main([str(llama), str(out), "--rotation", "ruquant-online", "--scheme", "w4a4kv4",
                     "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    q = Evaluator(LoadedModel.open(out), torch.device("cpu")).logits(tokens)
    fp = Evaluator(LoadedModel.open(llama), torch.device("cpu")).logits(tokens)
    assert torch.isfinite(q).all() and float((q - fp).norm() / fp.norm()) < 0.6
    # the format (version 1) does not declare online blocks: never served without them
    with pytest.raises(RUQuantError, match=ONLINE_BLOCKS):
        validate(out)


def test_fit_is_deterministic(llama: Path) -> None:
    def run() -> dict[str, torch.Tensor]:
        sink = InMemorySink()
        Converter(llama, ConvertOptions(rotation="ruquant-online", scheme="w4a4", quantize=False, **FAST)).run(sink)
        return sink.tensors

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_state_keeps_the_online_blocks() -> None:
    """An interrupted conversion resumes with the blocks it planned (``plan.safetensors`` round trip)."""
    from safetensors.torch import load, save

    from convert.pipeline import _plan_from_tensors, _plan_meta, _plan_tensors
    from convert.rotations import RotationPlan

    b = torch.linalg.qr(torch.randn(3, 32, 32, dtype=torch.float64))[0]
    plan = RotationPlan(linear_blocks={1: {"q_proj": b, "k_proj": b, "v_proj": b}, 4: {"down_proj": b[:2]}})
    back = _plan_from_tensors(load(save(_plan_tensors(plan))), _plan_meta(plan))
    assert back.linear_blocks.keys() == plan.linear_blocks.keys()
    assert all(torch.equal(back.linear_blocks[i][n], t) for i, layer in plan.linear_blocks.items()
               for n, t in layer.items())


def test_transfer_script_runs_on_the_tiny_model(llama: Path, tmp_path: Path) -> None:
    import importlib.util
    import sys

    from convert import calibration

    root = Path(__file__).resolve().parents[1]
    path = root / "benchmarks" / "online_blocks_transfer.py"
    spec = importlib.util.spec_from_file_location("online_blocks_transfer", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["online_blocks_transfer"] = mod
    spec.loader.exec_module(mod)
    text = calibration.default_calibration_text()
    calib, other = tmp_path / "calib.txt", tmp_path / "other.txt"
    calib.write_text(text[: len(text) // 2])
    other.write_text(text[len(text) // 2:])
    out = tmp_path / "t.json"
    assert mod.main([str(llama), "--calib-text", str(calib), "--other-text", str(other), "--layers", "0,1",
                     "--calib-samples", "8", "--seq-len", "32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(r["calib_held_chosen"] <= r["calib_held_identity"] for r in rows)
