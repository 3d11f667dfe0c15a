"""OSTQuant's training knobs (issue 24 item 2): the calibration-token cap lifted for OSTQuant only,
held-out selection, the rotation-only variant, the fp top-k KL-Top, and quality.py's --ostquant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from convert.pipeline import Converter, ConvertOptions, InMemorySink
from convert.rotations import ostquant
from convert.tiny_models import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("ost") / "llama", arch="llama", seed=7)


@pytest.fixture(autouse=True)
def short_training(monkeypatch) -> None:
    """Few steps: these tests check what OSTQuant trains on and keeps, not how good it gets (2 shared cores)."""
    monkeypatch.setattr(ostquant, "STEPS", 10)


def _tokens(n: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(0))


def test_layer_states_are_capped_at_2048_tokens_unless_asked_for_more(llama: Path) -> None:
    conv = Converter(llama, ConvertOptions(scheme="w4a4", calib_samples=80, calib_seq_len=32))
    tokens = _tokens(80, 32)
    capped = conv._layer_states(tokens)  # the default (RUQuant, diagnostics): 2048 tokens = 64 sequences
    assert len(capped) == conv.dims.num_layers and capped[0].shape[:2] == (64, 32)
    capped = [h.clone() for h in capped]
    more = conv._layer_states(tokens, 80 * 32)
    assert more[0].shape[:2] == (80, 32)
    # the same first sequences, the same fp states: only the count changed
    assert all(torch.equal(a, b[:64]) for a, b in zip(capped, more, strict=True))
    assert conv._layer_states(tokens)[0].shape[0] == 64  # cached per count, not stuck at the larger one


def test_kl_top_from_the_fp_top_k_equals_kl_top() -> None:
    g = torch.Generator().manual_seed(1)
    fp, q = torch.randn(2, 5, 300, generator=g), torch.randn(2, 5, 300, generator=g)
    assert float(ostquant.kl_top_of(ostquant.top_k(fp), q)) == pytest.approx(float(ostquant.kl_top(fp, q)), rel=1e-6)
    assert float(ostquant.kl_top_of(ostquant.top_k(fp), fp)) == pytest.approx(0.0, abs=1e-6)


def _plan_report(llama: Path, **opts) -> dict:
    sink = InMemorySink()
    return Converter(llama, ConvertOptions(rotation="ostquant", scheme="w4a4kv4", quantize=False, **opts)).run(
        sink)["rotation"]


def test_ostquant_trains_on_calib_tokens_and_decides_on_held_out_sequences(llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(ostquant, "CALIB_TOKENS", 10 * 32)
    monkeypatch.setattr(ostquant, "VAL_SEQS", 3)
    rep = _plan_report(llama, calib_samples=12, calib_seq_len=32)
    # 10 of the 12 calibration sequences (CALIB_TOKENS), 3 of them held out for the keep decision
    assert rep["calib_tokens"] == 10 * 32 and rep["selected_on"] == "3 held-out sequences"
    assert rep["steps"] == 10 and rep["batch"] == ostquant.BATCH and len(rep["train_loss_curve"]) == 10
    assert rep["kept"] == ("trained" if rep["loss_trained"] < rep["loss_init"] else "init")
    assert all(x > 0 for x in rep["train_loss_curve"])
    # the whole calibration set when CALIB_TOKENS allows it
    monkeypatch.setattr(ostquant, "CALIB_TOKENS", 8192)
    assert _plan_report(llama, calib_samples=12, calib_seq_len=32)["calib_tokens"] == 12 * 32


def test_rotation_only_learns_no_scales(llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(ostquant, "LEARN_SCALES", False)
    monkeypatch.setattr(ostquant, "VAL_SEQS", 0)  # decide on the training sequences: the trained R1 is kept
    monkeypatch.setattr(ostquant, "LR_ROT", 1e-2)  # a visible gain in 10 steps on the tiny model
    rep = _plan_report(llama, calib_samples=4, calib_seq_len=32)
    assert rep["learn_scales"] is False and rep["kept"] == "trained" and rep["scale_range"] == [1.0, 1.0]
    monkeypatch.setattr(ostquant, "LEARN_SCALES", True)
    rep = _plan_report(llama, calib_samples=4, calib_seq_len=32)
    assert rep["kept"] == "trained" and rep["scale_range"] != [1.0, 1.0]


def _quality_module(monkeypatch: pytest.MonkeyPatch):
    """examples/quality.py as a module; its sibling imports resolve through pytest's scoped path entry."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("quality_for_test", ROOT / "examples" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_ostquant_knobs_parse_and_refuse_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    q = _quality_module(monkeypatch)
    assert q._knobs("STEPS=5,COSINE=False,LR_ROT=3e-4") == {"STEPS": 5, "COSINE": False, "LR_ROT": 3e-4}
    assert q._knobs("") == {}
    with pytest.raises(SystemExit):
        q._knobs("STEPZ=5")
    # the rows measured before issue 24 item 2 pin the old training, the new row the measured one
    assert q.ROWS["ostquant_gbs"]["ostquant"]["STEPS"] == 12
    long = q.ROWS["ostquant_long_gbs_actorder"]["ostquant"]
    assert long["STEPS"] == 200 and long["CALIB_TOKENS"] == 8192 and long["SIM_WEIGHTS"] is False
    # ... which is also the module's default (STEPS is shortened by this file's fixture)
    assert {k: getattr(ostquant, k) for k in long if k != "STEPS"} == {k: v for k, v in long.items() if k != "STEPS"}
