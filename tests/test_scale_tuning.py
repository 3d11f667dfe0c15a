"""End-to-end weight-scale tuning (``--tune-scales``): what it trains against, what it changes, and that
the checkpoint it writes is still one the plugin serves as simulated."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from convert import distill, scale_tuning
from convert.cli import build_parser, options_from_args
from convert.errors import ConvertError
from convert.evaluate import Evaluator, LoadedModel
from convert.model_io import CheckpointReader
from convert.pipeline import Converter, ConvertOptions, InMemorySink, convert
from convert.recipes import DEFAULT_RECIPE, Recipe, recipe_for
from convert.rotations.fake_quant import fake_quant
from convert.tiny_models import make_tiny_llama
from vllm_ruquant import reference as ref
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import model_dims


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("scales") / "llama", arch="llama", seed=3)


def _run(llama: Path, scheme: str, steps: int, tune_norms: bool = False) -> tuple[InMemorySink, dict]:
    sink = InMemorySink()
    opts = ConvertOptions(scheme=scheme, calib_samples=8, calib_seq_len=32, tune_scales=steps, tune_norms=tune_norms)
    return sink, Converter(llama, opts).run(sink)


def test_the_training_simulation_is_the_served_model(llama: Path, tmp_path: Path, monkeypatch) -> None:
    """At its start (sigma = 0) the trainable model computes what ``ruquant-eval`` (the served ops) does,
    rotations, per-token activation quantization, KV4 and all: it trains the model that is served. It does
    so with the Hadamards as matrix products too (how the tuning runs), quantizing an input that several
    linears read (q/k/v, gate/up) once."""
    out = tmp_path / "ckpt"
    convert(llama, out, ConvertOptions(scheme="w4a8kv4", calib_samples=4, calib_seq_len=32))
    model = LoadedModel.open(out)
    ev = Evaluator(model, torch.device("cpu"))
    names = list(model.reader.keys())
    sim = scale_tuning._TrainableModel(ev.get, ev.has, model.dims, model.fmt,
                                       scale_tuning.quantized_prefixes(names), 32, torch.device("cpu"))
    assert len(sim.prefixes) == 7 * model.dims.num_layers
    tokens = torch.randint(0, model.dims.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    served = ev.logits(tokens)
    idx = served.topk(16, dim=-1).indices
    zero = {p: torch.zeros_like(s) for p, s in sim.scales.items()}
    with torch.no_grad():
        trained_form = sim.top_logits(tokens, idx, zero)
    torch.testing.assert_close(trained_form, served.gather(-1, idx), rtol=1e-3, atol=1e-3)
    calls = []

    def counting_fake_quant(*args, **kwargs) -> torch.Tensor:
        calls.append(args[0].shape)
        return fake_quant(*args, **kwargs)

    monkeypatch.setattr(scale_tuning, "fake_quant", counting_fake_quant)
    with torch.no_grad(), ref.hadamard_as_matmul():
        as_tuned = sim.top_logits(tokens, idx, zero)
    torch.testing.assert_close(as_tuned, served.gather(-1, idx), rtol=1e-3, atol=1e-3)
    assert len(calls) == 4 * model.dims.num_layers  # attention input, o, mlp input, down: not 7 a layer


def test_tuning_changes_only_the_scales_and_lowers_the_loss(llama: Path, monkeypatch) -> None:
    """Trained and scored on the same sequences (a random tiny model has nothing to generalise), the
    loss must fall; only the weight scales change."""
    monkeypatch.setattr(scale_tuning, "VAL_SEQS", 0)
    base, _ = _run(llama, "w4a4", 0)
    tuned, report = _run(llama, "w4a4", 12)
    rep = report["scale_tuning"]
    assert rep["steps"] == 12 and rep["linears"] == 14
    assert rep["kept"] == "trained" and rep["loss_trained"] < rep["loss_init"]
    assert set(base.tensors) == set(tuned.tensors)
    changed = {k for k in base.tensors if not torch.equal(base.tensors[k], tuned.tensors[k])}
    assert changed and all(k.endswith("." + fmt_mod.WEIGHT_SCALE) for k in changed)
    for k in changed:  # the same dtype and shape the plugin reads; a few percent, not a new quantizer
        assert tuned.tensors[k].dtype == base.tensors[k].dtype and tuned.tensors[k].shape == base.tensors[k].shape
        ratio = tuned.tensors[k].float() / base.tensors[k].float()
        assert 0.5 < float(ratio.min()) and float(ratio.max()) < 2.0
    assert report["scale_tuning"] is not None and _run(llama, "w4a4", 0)[1]["scale_tuning"] is None


def test_norm_tuning_changes_the_scales_and_the_layer_norms(llama: Path, monkeypatch) -> None:
    """``--tune-norms``: each layer's two RMSNorm weights are trained too (the final norm, which feeds only
    the unquantized head, is not); everything else stays as converted."""
    monkeypatch.setattr(scale_tuning, "VAL_SEQS", 0)
    base, _ = _run(llama, "w4a4", 0)
    tuned, report = _run(llama, "w4a4", 12, tune_norms=True)
    rep = report["scale_tuning"]
    assert rep["kept"] == "trained" and rep["loss_trained"] < rep["loss_init"] and rep["norms"] == 4
    changed = {k for k in base.tensors if not torch.equal(base.tensors[k], tuned.tensors[k])}
    norms = {k for k in changed if not k.endswith("." + fmt_mod.WEIGHT_SCALE)}
    assert norms == {f"model.layers.{i}.{n}.weight" for i in range(2)
                     for n in ("input_layernorm", "post_attention_layernorm")}
    assert all(tuned.tensors[k].dtype == base.tensors[k].dtype for k in norms)


def test_tuned_scales_are_written_into_the_checkpoint(llama: Path, tmp_path: Path) -> None:
    """The written shards hold the tuned scales (replaced in the partial folder, then committed with
    their checksums), the same values the in-memory conversion produces."""
    out = tmp_path / "tuned"
    convert(llama, out, ConvertOptions(scheme="w4a16", calib_samples=8, calib_seq_len=32, tune_scales=6))
    mem, _ = _run(llama, "w4a16", 6)
    reader = CheckpointReader(out)
    scales = [k for k in mem.tensors if k.endswith("." + fmt_mod.WEIGHT_SCALE)]
    assert scales and all(torch.equal(reader.get(k, None), mem.tensors[k]) for k in scales)
    assert not list(out.glob("*.tmp")) and not (out.parent / f".{out.name}.partial").exists()


def test_no_improvement_on_held_out_keeps_the_quantizer_scales(llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(scale_tuning, "LR", 0.0)  # nothing moves: the trained loss cannot be lower
    base, _ = _run(llama, "w4a4", 0)
    tuned, report = _run(llama, "w4a4", 3)
    assert report["scale_tuning"]["kept"] == "init"
    assert all(torch.equal(base.tensors[k], tuned.tensors[k]) for k in base.tensors)


def test_a_model_too_large_to_train_keeps_its_scales(llama: Path, monkeypatch) -> None:
    monkeypatch.setattr(distill, "available_bytes", lambda device: 1 << 20)
    base, _ = _run(llama, "w4a4", 0)
    tuned, report = _run(llama, "w4a4", 5)
    assert report["scale_tuning"]["trained"] is False and "GiB free" in report["scale_tuning"]["reason"]
    assert all(torch.equal(base.tensors[k], tuned.tensors[k]) for k in base.tensors)


def test_cli_flag_and_scheme_defaults(llama: Path, tmp_path: Path) -> None:
    parse = build_parser().parse_args
    assert options_from_args(parse([str(llama), str(tmp_path / "o"), "--tune-scales", "7"])).tune_scales == 7
    for scheme in ("w4a4", "w4a16", "w4a4kv4", "w8a8"):
        opts = options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", scheme]))
        assert opts.tune_scales == recipe_for(scheme).tune_scales
    assert recipe_for("w8a8") == Recipe() and recipe_for("w4a4kv4").tune_scales > 0
    for scheme, recipe in DEFAULT_RECIPE.items():
        opts = options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", scheme]))
        assert (opts.rotation, opts.clip, opts.tune_scales) == (recipe.rotation, recipe.clip, recipe.tune_scales)
        assert (opts.tune_norms, opts.full_range) == (recipe.tune_norms, recipe.full_range)
        assert opts.quantizer_options.get("act_order", False) == recipe.act_order
    assert options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", "w8a8", "--full-range"])).full_range
    assert not options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", "w4a16",
                                        "--no-full-range"])).full_range
    assert options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", "w4a16", "--tune-norms"])).tune_norms
    assert not options_from_args(parse([str(llama), str(tmp_path / "o"), "--no-tune-norms"])).tune_norms
    with pytest.raises(ConvertError, match="--tune-scales"):
        options_from_args(parse([str(llama), str(tmp_path / "o"), "--tune-scales", "-1"]))


def test_default_group_size_falls_back_to_per_channel_where_it_does_not_divide(llama: Path, tmp_path: Path) -> None:
    """A scheme's default groups apply only where they divide every linear input and its TP shard: the
    default must convert any supported model."""
    grouped = [k for k, v in DEFAULT_RECIPE.items() if v.group_size != -1]
    assert grouped  # the recipe has grouped schemes (w4a8, w4a16)
    recipe = DEFAULT_RECIPE[grouped[0]]
    g = recipe.group_size
    dims = model_dims(json.loads((llama / "config.json").read_text()))
    fits = replace(dims, hidden_size=4 * g, intermediate_size=8 * g, num_heads=4, head_dim=g)
    assert recipe.group_size_for(fits) == g
    assert recipe.group_size_for(fits, tp_size=8) == -1  # o_proj's shard (g / 2) is not a multiple
    assert recipe.group_size_for(replace(fits, intermediate_size=8 * g + 2)) == -1
    assert recipe_for("w8a8").group_size_for(fits) == -1  # no groups in that scheme's recipe
    parse = build_parser().parse_args
    opts = options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", grouped[0]]))
    assert opts.group_size == recipe.group_size_for(dims) and opts.fmt.weight.group_size == opts.group_size
    explicit = options_from_args(parse([str(llama), str(tmp_path / "o"), "--scheme", grouped[0], "--group-size", "-1"]))
    assert explicit.group_size == -1
