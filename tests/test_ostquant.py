"""OSTQuant's training knobs (issue 24 item 2): the calibration-token cap lifted for OSTQuant only,
held-out selection, the rotation-only variant, the fp top-k KL-Top, and quality.py's --ostquant."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from convert import distill
from convert.pipeline import Converter, ConvertOptions, InMemorySink
from convert.rotations import ostquant
from convert.tiny_models import make_tiny_llama
from vllm_ruquant.reference import OnlineRotation

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
    assert float(distill.kl_top_of(distill.top_k(fp), q)) == pytest.approx(float(distill.kl_top(fp, q)), rel=1e-6)
    assert float(distill.kl_top_of(distill.top_k(fp), fp)) == pytest.approx(0.0, abs=1e-6)


def _absorbed_logits(sim, seqs: torch.Tensor, r: torch.Tensor, log_s: torch.Tensor,
                     layers: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The quantized model as the converter writes it: R1 and the scalings absorbed into every weight
    and the head, the residual stream in the R1 basis (the training simulation's reference)."""
    from convert.modeling import decoder_layer, lm_logits
    from convert.rotations.fake_quant import fake_quant
    from vllm_ruquant.checkpoint.models import NORM_READERS, WRITERS

    dims, fmt = sim.dims, sim.ctx.fmt
    wb = fmt.weight.bits if ostquant.SIM_WEIGHTS else 16
    q4 = sim.r4.matrix()
    h = sim.h0[seqs] @ r
    for i, sd in enumerate(layers):
        p, w = dims.layer_prefix(i), dict(sd)
        for j, (norm, readers) in enumerate(NORM_READERS.items()):
            w[f"{p}.{norm}.weight"] = 1.0 / log_s[i, j].exp()
            for name in readers:
                w[f"{p}.{name}.weight"] = fake_quant((sd[f"{p}.{name}.weight"] @ r) * log_s[i, j].exp(), wb)
        for name in WRITERS:
            wt = r.T @ sd[f"{p}.{name}.weight"]
            w[f"{p}.{name}.weight"] = fake_quant(wt @ q4 if name == "mlp.down_proj" else wt, wb)

        def linear(prefix: str, x: torch.Tensor, w=w) -> torch.Tensor:
            x = x @ q4 if prefix.endswith("down_proj") else x
            return fake_quant(x, fmt.activation.bits, clip_ratio=ostquant.SIM_ACT_CLIP) @ w[f"{prefix}.weight"].T

        h = decoder_layer(h, i, dims, linear, w.__getitem__, sim.rope, sim.kv_quant)
    return lm_logits(h, replace(dims, tie_word_embeddings=False),
                     {"model.norm.weight": torch.ones(dims.hidden_size), "lm_head.weight": sim.head @ r}.__getitem__)


@pytest.mark.parametrize("sim_weights", [False, True])
def test_training_simulation_equals_the_absorbed_model(llama: Path, monkeypatch, sim_weights: bool) -> None:
    """The training keeps the residual in the original basis and reads only the top-k head rows; its
    loss and its gradient must be those of the model with R1 and the scalings absorbed, as written."""
    monkeypatch.setattr(ostquant, "SIM_WEIGHTS", sim_weights)
    # K and V are the same function of (R1, s) in both forms, but their 4-bit rounding is where float
    # differences of 1e-7 flip an integer most visibly (one flip moves later tokens' attention): off here
    monkeypatch.setattr(ostquant, "SIM_KV", False)
    conv = Converter(llama, ConvertOptions(rotation="ostquant", scheme="w4a4kv4", calib_samples=4, calib_seq_len=32))
    ctx = conv._context(_tokens(4, 32))
    sim = ostquant._ModelSim(ctx, OnlineRotation("hadamard", conv.dims.intermediate_size))
    layers = [ctx.layer_tensors(i) for i in range(conv.dims.num_layers)]
    d = conv.dims.hidden_size
    seqs = torch.arange(3)
    idx, fp_logp = distill.top_k(sim.fp_logits(seqs), 16)

    def loss_and_grad(absorbed: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        a = (0.05 * torch.randn(d, d, generator=torch.Generator().manual_seed(5))).requires_grad_()
        log_s = (0.1 * torch.randn(conv.dims.num_layers, 2, d, generator=torch.Generator().manual_seed(6)))
        log_s.requires_grad_()
        r = ostquant.cayley(a)
        q = (_absorbed_logits(sim, seqs, r, log_s, layers).gather(-1, idx) if absorbed
             else sim.q_top_logits(seqs, r, log_s, idx))
        loss = distill.kl_top_gathered(fp_logp, q)
        loss.backward()
        return float(loss.detach()), a.grad, log_s.grad

    fast, absorbed = loss_and_grad(False), loss_and_grad(True)
    assert fast[0] > 1e-4  # quantization is on: the loss is not trivially zero
    assert fast[0] == pytest.approx(absorbed[0], rel=1e-4)
    for got, want in zip(fast[1:], absorbed[1:], strict=True):
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert float(cos) > 0.999 and float(got.norm() / want.norm()) == pytest.approx(1.0, rel=1e-2)


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


def test_a_model_too_large_to_train_keeps_the_hadamard_start(llama: Path, monkeypatch) -> None:
    """OSTQuant holds the whole model in fp32 to train it end to end: where that does not fit (a 70B model,
    an 8B one on a small host) the default rotation at w4a4kv4 must not end the conversion."""
    need = distill.training_bytes(Converter(llama, ConvertOptions()).dims, ostquant.CALIB_TOKENS, ostquant.BATCH * 32)
    assert need > 0
    monkeypatch.setattr(distill, "available_bytes", lambda device: int(need / 0.8) - 1)
    rep = _plan_report(llama, calib_samples=4, calib_seq_len=32)
    assert rep["trained"] is False and rep["kept"] == "init" and "GiB free" in rep["reason"]
    assert rep["seconds"] < 5  # nothing was trained
    monkeypatch.setattr(distill, "available_bytes", lambda device: int(need / 0.8) + 1)
    assert "trained" not in _plan_report(llama, calib_samples=4, calib_seq_len=32)


def test_a_scheme_with_nothing_to_train_keeps_the_hadamard_start(llama: Path) -> None:
    """At w4a16 with fp weights in the loss nothing is quantized in training: no step is run for nothing."""
    sink = InMemorySink()
    rep = Converter(llama, ConvertOptions(rotation="ostquant", scheme="w4a16", quantize=False, calib_samples=4,
                                          calib_seq_len=32)).run(sink)["rotation"]
    assert rep["trained"] is False and "leaves the loss" in rep["reason"]
    # ... while w4a8 trains, unclipped (the 0.75 clip is the 4-bit activations' GBS pick)
    rep = Converter(llama, ConvertOptions(rotation="ostquant", scheme="w4a8", quantize=False, calib_samples=4,
                                          calib_seq_len=32)).run(sink)["rotation"]
    assert "trained" not in rep and rep["sim_act_clip"] == 1.0 and len(rep["train_loss_curve"]) > 0


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
    assert long["SIM_BF16"] is False and long["STEPS"] == ostquant.FINETUNE_STEPS  # --finetune's training
    # the default recipe's row is the module's defaults (STEPS is shortened by this file's fixture)
    default = q.ROWS["ostquant_gbs_actorder"]["ostquant"]
    assert default["STEPS"] == 80 and default["SIM_BF16"] is True
    assert {k: getattr(ostquant, k) for k in default if k != "STEPS"} == {k: v for k, v in default.items()
                                                                         if k != "STEPS"}
