"""RUQuant (stage 1 + 2) and OSTQuant rotations: orthogonality, function preservation,
valid served checkpoints, determinism, and the Lloyd-Max effect on an outlier distribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convert import cli
from convert.diagnostics import PLOT_NAME, lloyd_max_stats, qsur
from convert.evaluate import Evaluator, LoadedModel
from convert.pipeline import Converter, ConvertOptions, InMemorySink
from convert.rotations.ostquant import cayley
from convert.rotations.ruquant import (
    Stage1Config,
    givens_angles,
    givens_pairs,
    householder,
    reflect,
    rotate_pairs,
    row_quant_mse,
    stage1_blocks,
    uniform_target,
)
from convert.tiny_models import make_tiny_llama
from convert_helpers import simulated_logits
from vllm_ruquant.checkpoint import format as fmt_mod

FAST = dict(calib_samples=2, calib_seq_len=32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    # 352 = 11 * 32 has no Hadamard matrix: RUQuant's R4 is then block-diagonal (blocks <= 256)
    return make_tiny_llama(tmp_path_factory.mktemp("rq") / "llama", arch="llama", intermediate_size=352, seed=5)


@pytest.fixture(autouse=True)
def short_optimisations(monkeypatch) -> None:
    """Fewer steps than the defaults: these tests check mechanics, not the optimum (2 shared cores)."""
    from convert.rotations import ostquant, ruquant

    monkeypatch.setattr(ruquant, "STAGE1", ruquant.Stage1Config(steps=6, givens_rounds=2, max_rows=1024))
    monkeypatch.setattr(ruquant, "STAGE2", ruquant.Stage2Config(steps=4))
    monkeypatch.setattr(ruquant, "STAGE2_FINETUNE", ruquant.Stage2Config(reflections=2, steps=6, layers=0))
    monkeypatch.setattr(ostquant, "STEPS", 4)


def _outlier_activations(n: int = 2048, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Gaussian tokens plus a few huge channels (massive-activation style), as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 3] += 25 * torch.rand(n, generator=g, dtype=torch.float64)
    x[:, 70] -= 15 * torch.rand(n, generator=g, dtype=torch.float64)
    x[: n // 16, 100] += 60
    return x


def test_stage1_building_blocks_are_orthogonal() -> None:
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(64, dtype=torch.float64)
    h = householder(torch.randn(64, generator=g, dtype=torch.float64))
    giv = givens_pairs(torch.randn(64, generator=g, dtype=torch.float64), torch.randperm(64, generator=g), g)
    blocks, _ = stage1_blocks(_outlier_activations(d=128), 64, 4, Stage1Config(steps=4, givens_rounds=2), g)
    c = cayley(torch.randn(32, 32, generator=g, dtype=torch.float64))
    for m in (h, giv, *blocks):
        assert torch.allclose(m.T @ m, eye, atol=1e-10)
    assert torch.allclose(c.T @ c, torch.eye(32, dtype=torch.float64), atol=1e-10)
    # the Householder step maps x exactly onto its target
    x, t = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    t = t * x.norm() / t.norm()
    assert torch.allclose(x @ householder(x - t), t, atol=1e-10)


def _sequential_stage1_block(y: torch.Tensor, bits: int, cfg: Stage1Config,
                             gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Stage 1 for one block, one step at a time: the oracle of the batched search."""
    b = y.shape[1]
    q, cur = torch.eye(b, dtype=torch.float64), y.double()
    best, accepted = row_quant_mse(cur, bits), 0
    for _ in range(cfg.steps):
        x = cur[cur.abs().amax(-1).argmax()]
        u = x - uniform_target(float(x.norm()), b, gen)
        if float(u.norm()) > 1e-12 * max(float(x.norm()), 1e-30):
            cand = reflect(cur, u)
            if (err := row_quant_mse(cand, bits)) < best:
                q, cur, best, accepted = reflect(q, u), cand, err, accepted + 1
        for _ in range(cfg.givens_rounds):
            pairs, theta = givens_angles(cur[cur.abs().amax(-1).argmax()], torch.randperm(b, generator=gen), gen)
            cand = rotate_pairs(cur, pairs, theta)
            if (err := row_quant_mse(cand, bits)) < best:
                q, cur, best, accepted = rotate_pairs(q, pairs, theta), cand, err, accepted + 1
    return q, accepted


@pytest.mark.parametrize("block", [16, 15])
def test_batched_stage1_equals_the_block_by_block_search(block: int) -> None:
    """All blocks are searched in one batch with the draws a block-by-block loop would make."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 4 * block, generator=g, dtype=torch.float64)
    x[:, [1, block + 2, 3 * block]] *= 25.0  # outlier channels, so steps get accepted
    cfg = Stage1Config(steps=5, givens_rounds=2, max_rows=10_000)
    got, got_acc = stage1_blocks(x, block, 4, cfg, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # 300 rows <= max_rows: stage1_blocks samples no rows
    want = [_sequential_stage1_block(x[:, k * block:(k + 1) * block], 4, cfg, gen) for k in range(4)]
    assert got_acc == sum(a for _, a in want) > 0
    for k, (q, _) in enumerate(want):
        torch.testing.assert_close(got[k], q, rtol=0, atol=1e-10)


def test_stage1_reduces_lloyd_max_shift_and_mse_on_outliers() -> None:
    x = _outlier_activations()
    g = torch.Generator().manual_seed(1)
    blocks, accepted = stage1_blocks(x, 128, 4, Stage1Config(), g)
    y = x @ blocks[0]
    before, after = lloyd_max_stats(x, 4), lloyd_max_stats(y, 4)
    assert accepted > 0
    assert after["mse"] < 0.5 * before["mse"], (before, after)
    assert after["shift"] < before["shift"], (before, after)
    assert row_quant_mse(y, 4) == pytest.approx(after["mse"], rel=1e-9)
    assert qsur(y)["qsur_per_dim"] > qsur(x)["qsur_per_dim"]


@pytest.mark.parametrize("rotation", ["ruquant", "ostquant"])
def test_rotation_preserves_the_function(llama: Path, rotation: str) -> None:
    """Quantization off: the rotated (and, for OSTQuant, scaled) model equals the original."""
    sink = InMemorySink()
    report = Converter(llama, ConvertOptions(rotation=rotation, quantize=False, **FAST)).run(sink)
    fmt = fmt_mod.RUQuantFormat.from_dict(report["format"])
    if rotation == "ruquant":
        assert fmt.online_rotations["down_proj"].kind == "block_diagonal"
        nb, blk, _ = sink.tensors["model.layers.1.mlp.down_proj.online_rotation"].shape
        assert nb * blk == 352 and blk <= 256 and nb > 1
        assert report["rotation"]["stage2"] is not None
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = Evaluator(LoadedModel.open(llama), torch.device("cpu")).logits(tokens)
    cfg = json.loads((llama / "config.json").read_text())
    got = simulated_logits(sink.tensors, cfg, fmt, tokens)
    assert float((got - ref).norm() / ref.norm()) < 1e-4
    diag = report["diagnostics"]["summary"]
    assert set(diag) == {"qkv", "gate_up", "down"} and "none" in diag["qkv"] and "final" in diag["qkv"]
    assert all(0 < v["qsur_per_dim"] <= 1.0 + 1e-9 for v in diag["qkv"].values())


@pytest.mark.parametrize("rotation", ["ruquant", "ostquant"])
def test_quantized_checkpoint_is_valid_and_runs(llama: Path, tmp_path: Path, rotation: str) -> None:
    out = tmp_path / rotation
    assert cli.main([str(llama), str(out), "--rotation", rotation, "--scheme", "w4a4kv4",
                     "--calib-samples", "2", "--calib-seq-len", "32"]) == 0
    assert (out / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "ruquant_report.json").read_text())
    assert report["diagnostics"]["summary"]["down"]["final"]["mse"] > 0
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    q = Evaluator(LoadedModel.open(out), torch.device("cpu")).logits(tokens)
    fp = Evaluator(LoadedModel.open(llama), torch.device("cpu")).logits(tokens)
    assert torch.isfinite(q).all() and float((q - fp).norm() / fp.norm()) < 0.6


@pytest.mark.parametrize(("rotation", "finetune"), [("ruquant", True), ("ostquant", False)])
def test_optimised_rotations_are_deterministic(llama: Path, rotation: str, finetune: bool) -> None:
    def run() -> dict[str, torch.Tensor]:
        sink = InMemorySink()
        Converter(llama, ConvertOptions(rotation=rotation, scheme="w4a4", finetune=finetune, quantize=False,
                                        **FAST)).run(sink)
        return sink.tensors

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
