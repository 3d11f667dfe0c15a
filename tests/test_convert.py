"""The converter end to end on tiny random models: function preserved, checkpoint valid, errors clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convert import cli
from convert.errors import ExitCode
from convert.evaluate import Evaluator, LoadedModel
from convert.model_io import read_config
from convert.pipeline import Converter, ConvertOptions, InMemorySink
from convert.tiny_models import make_tiny_llama
from convert_helpers import simulated_logits
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.models import model_dims
from vllm_ruquant.checkpoint.shards import sha256_file

SMALL_CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {
        "llama": make_tiny_llama(root / "llama", arch="llama", intermediate_size=256, seed=1),
        # 344 = 2 * 172: a non-power-of-two online Hadamard, like 11008 = 64 * 172
        "qwen2": make_tiny_llama(root / "qwen2", arch="qwen2", intermediate_size=344, seed=2),
        "mistral": make_tiny_llama(root / "mistral", arch="mistral", intermediate_size=256, seed=3),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_rotations_preserve_the_function(models, arch: str) -> None:
    """Rotations + norm folding, everything 32-bit: logits equal the original's (transformers)."""
    from transformers import AutoModelForCausalLM

    src = models[arch]
    sink = InMemorySink()
    report = Converter(src, ConvertOptions(quantize=False, calib_samples=2, calib_seq_len=32)).run(sink)
    fmt = fmt_mod.RUQuantFormat.from_dict(report["format"])
    assert fmt.online_rotations["down_proj"].kind == "hadamard"
    # the weights really changed (rotated), norms are folded to ones
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        orig_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not torch.allclose(sink.tensors["model.layers.0.self_attn.q_proj.weight"], orig_q, atol=1e-3)
    assert torch.equal(sink.tensors["model.layers.1.input_layernorm.weight"], torch.ones(128))

    tokens = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        expect = model(tokens).logits
    got = simulated_logits(sink.tensors, read_config(src), fmt, tokens)
    rel = float((got - expect).norm() / expect.norm())
    assert rel < 1e-4, rel


def test_w4a4_checkpoint_is_complete_and_consistent(models, tmp_path: Path) -> None:
    out = tmp_path / "w4a4"
    assert cli.main([str(models["qwen2"]), str(out), "--scheme", "w4a4", *SMALL_CALIB]) == 0
    cfg = json.loads((out / "config.json").read_text())
    fmt = fmt_mod.RUQuantFormat.from_dict(cfg["quantization_config"])
    assert (fmt.weight.bits, fmt.activation.bits) == (4, 4)
    assert fmt.online_rotations["down_proj"].size == 344
    assert cfg["tie_word_embeddings"] is False
    for f in ("tokenizer.json", "tokenizer_config.json", "ruquant_report.json", "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard, digest in index["metadata"]["sha256"].items():
        assert sha256_file(out / shard) == digest
    dims = model_dims({k: v for k, v in cfg.items() if k != "quantization_config"})
    names = set(index["weight_map"])
    for i in range(dims.num_layers):
        for prefix in dims.linear_prefixes(i):
            n, k = dims.linear_shape(prefix.rsplit(".", 1)[-1])
            for kind, (shape, dtype) in fmt_mod.linear_tensor_shapes(fmt, n, k).items():
                name = fmt_mod.tensor_name(prefix, kind)
                with safe_open(str(out / index["weight_map"][name]), "pt") as f:
                    t = f.get_tensor(name)
                assert tuple(t.shape) == shape and str(t.dtype) == f"torch.{dtype}", name
            assert f"{prefix}.weight" not in names
    assert "model.layers.0.self_attn.q_proj.bias" in names  # Qwen2 biases kept
    report = json.loads((out / "ruquant_report.json").read_text())
    assert len(report["layers"]) == dims.num_layers
    assert all(0 < layer["output_rel_error"] < 0.5 for layer in report["layers"])
    assert set(report["layers"][0]["weight_rel_error"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"}
    # the simulated-quantized model runs and stays close to the original
    tokens = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    q_logits = Evaluator(LoadedModel.open(out), torch.device("cpu")).logits(tokens)
    fp_logits = Evaluator(LoadedModel.open(models["qwen2"]), torch.device("cpu")).logits(tokens)
    assert torch.isfinite(q_logits).all()
    assert float((q_logits - fp_logits).norm() / fp_logits.norm()) < 0.6


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w8a8", "w6a6"])
def test_every_scheme_converts(models, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / scheme
    assert cli.main([str(models["llama"]), str(out), "--scheme", scheme, "--weight-quantizer", "rtn",
                     *SMALL_CALIB]) == 0
    fmt = fmt_mod.RUQuantFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert fmt_mod.SCHEMES[scheme] == (fmt.weight.bits, fmt.activation.bits, fmt.kv_cache.bits)


def test_gptq_reduces_layer_error_against_rtn(models) -> None:
    errs = {}
    for q in ("rtn", "gptq"):
        opts = ConvertOptions(scheme="w4a16", weight_quantizer=q, calib_samples=8, calib_seq_len=64)
        report = Converter(models["llama"], opts).run(InMemorySink())
        errs[q] = sum(layer["output_rel_error"] for layer in report["layers"])
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_conversion_is_deterministic(models) -> None:
    def run() -> dict[str, torch.Tensor]:
        sink = InMemorySink()
        Converter(models["mistral"], ConvertOptions(scheme="w4a4", calib_samples=2, calib_seq_len=32)).run(sink)
        return sink.tensors

    a, b = run(), run()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Issue 5, acceptance 3: "same checkpoint hash twice", per optimizing option. The hashes are
# the per-shard sha256 the converter records in the index (and the validator checks at
# load), so two runs agree byte for byte on every tensor they write. Cheapest settings
# that still run each optimizer.
OPTIMIZER_OPTIONS = {
    "ruquant-finetune": ["--rotation", "ruquant", "--finetune"],
    "ostquant": ["--transform", "ostquant"],
    "septq": ["--weight-quantizer", "septq"],
    "lrq": ["--weight-quantizer", "lrq", "--lrq-steps", "10"],
    "gbs": ["--clip", "gbs"],
    "gbs-dimension-expansion-w3a3kv3": ["--clip", "gbs", "--dimension-expansion", "--scheme", "w3a3kv3"],
}


@pytest.fixture(scope="module")
def expandable_model(tmp_path_factory) -> Path:
    # 170 is no Hadamard order: dimension expansion pads it to 172
    return make_tiny_llama(tmp_path_factory.mktemp("det") / "src", intermediate_size=170, seed=4)


@pytest.mark.parametrize("name", list(OPTIMIZER_OPTIONS))
def test_each_optimizer_writes_the_same_checkpoint_hash_twice(expandable_model: Path, tmp_path: Path,
                                                               name: str) -> None:
    argv = ["--calib-samples", "2", "--calib-seq-len", "32", "--seed", "3", "--scheme", "w4a4",
            *OPTIMIZER_OPTIONS[name]]  # a later --scheme wins
    for run in ("a", "b"):
        assert cli.main([str(expandable_model), str(tmp_path / run), *argv]) == 0
    a, b = _shard_hashes(tmp_path / "a"), _shard_hashes(tmp_path / "b")
    assert a and a == b
    # the seed is what fixes them: another seed gives another checkpoint
    assert cli.main([str(expandable_model), str(tmp_path / "c"), *argv, "--seed", "4"]) == 0
    assert _shard_hashes(tmp_path / "c") != a


# ------------------------------------------------------------------------------ bad input


def _assert_fails(argv: list[str], out: Path, code: ExitCode, message: str, capsys) -> None:
    assert cli.main([*argv[:1], str(out), *SMALL_CALIB, *argv[1:]]) == code  # the case's own flags win
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ruquant-convert: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no .partial left


def test_missing_directory(tmp_path: Path, capsys) -> None:
    _assert_fails([str(tmp_path / "nope")], tmp_path / "out", ExitCode.BAD_INPUT, "does not exist", capsys)


def test_unsupported_architecture(models, tmp_path: Path, capsys) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    cfg = read_config(models["llama"])
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    _assert_fails([str(src)], tmp_path / "out", ExitCode.UNSUPPORTED, "LlamaForCausalLM", capsys)


def test_unknown_scheme(models, tmp_path: Path, capsys) -> None:
    _assert_fails([str(models["llama"]), "--scheme", "w2a2"], tmp_path / "out", ExitCode.UNSUPPORTED,
                  "unknown scheme 'w2a2'", capsys)


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard(models, tmp_path: Path, capsys) -> None:
    src = _copy_model(models["llama"], tmp_path / "trunc")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_fails([str(src)], tmp_path / "out", ExitCode.BAD_INPUT, "corrupt or truncated", capsys)


def test_corrupt_shard_header(models, tmp_path: Path, capsys) -> None:
    src = _copy_model(models["llama"], tmp_path / "corrupt")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    (src / "model.safetensors").write_bytes(bytes(data))
    _assert_fails([str(src)], tmp_path / "out", ExitCode.BAD_INPUT, "corrupt or truncated", capsys)


def test_config_shapes_do_not_match_weights(models, tmp_path: Path, capsys) -> None:
    src = _copy_model(models["llama"], tmp_path / "shapes")
    cfg = read_config(src)
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    _assert_fails([str(src)], tmp_path / "out", ExitCode.BAD_INPUT, "config.json implies", capsys)


@pytest.mark.parametrize("config, message", [
    ("256", "must hold a JSON object"),
    ('{"hidden_size": "big"}', "malformed dimension"),
])
def test_malformed_config_values(models, tmp_path: Path, capsys, config: str, message: str) -> None:
    src = _copy_model(models["llama"], tmp_path / "cfg")
    edit = json.loads(config)
    text = json.dumps({**read_config(src), **edit}) if isinstance(edit, dict) else config
    (src / "config.json").write_text(text)
    _assert_fails([str(src)], tmp_path / "out", ExitCode.BAD_INPUT, message, capsys)


def _edit_weights(src: Path, edit) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    for f in src.glob("*.safetensors"):
        sd = load_file(f)
        edit(sd)
        save_file(sd, f, metadata={"format": "pt"})


def test_missing_layer_tensor_is_named(models, tmp_path: Path, capsys) -> None:
    src = _copy_model(models["llama"], tmp_path / "missing")
    _edit_weights(src, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight", None))
    _assert_fails([str(src)], tmp_path / "out", ExitCode.BAD_INPUT,
                  "'model.layers.1.mlp.up_proj.weight' is missing", capsys)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "contains NaN or Inf"),
    (3e38, "calibration activations after layer 0 contain NaN or Inf"),  # finite, overflows fp32 activations
])
def test_non_finite_weights_or_activations(models, tmp_path: Path, capsys, value: float, message: str) -> None:
    src = _copy_model(models["llama"], tmp_path / "numerics")

    def poison(sd: dict) -> None:
        name = "model.layers.0.input_layernorm.weight" if value == 3e38 else "model.layers.0.mlp.down_proj.weight"
        if name in sd:
            sd[name][0] = value

    _edit_weights(src, poison)
    _assert_fails([str(src), "--rotation", "ruquant-stage1"], tmp_path / "out", ExitCode.NUMERICS, message, capsys)


def test_disk_full_is_an_io_error(models, tmp_path: Path, capsys, monkeypatch) -> None:
    """safetensors reports ENOSPC as a SafetensorError, not an OSError."""
    from safetensors import SafetensorError

    import convert.model_io as model_io

    def full(*_args, **_kwargs) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_io, "save_file", full)
    _assert_fails([str(models["llama"])], tmp_path / "out", ExitCode.IO_ERROR, "No space left on device", capsys)


def test_existing_output_is_not_overwritten(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main([str(models["llama"]), str(out), *SMALL_CALIB]) == ExitCode.OUTPUT_EXISTS
    assert (out / "keep.txt").read_text() == "mine"
    assert "already exists" in capsys.readouterr().err


def test_calibration_text_too_short(models, tmp_path: Path, capsys) -> None:
    text = tmp_path / "short.txt"
    text.write_text("too short")
    _assert_fails([str(models["llama"]), "--calib-text", str(text)], tmp_path / "out", ExitCode.BAD_INPUT,
                  "calibration text too short", capsys)


def test_eval_rejects_wrong_format_version(models, tmp_path: Path, capsys) -> None:
    from convert import evaluate

    out = tmp_path / "ckpt"
    assert cli.main([str(models["llama"]), str(out), "--weight-quantizer", "rtn", *SMALL_CALIB]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    assert evaluate.main([str(out), "--max-tokens", "64"]) != 0
    assert "format_version is 99" in capsys.readouterr().err


# ------------------------------------------------------------------------ resume / dry run


def _shard_hashes(out: Path) -> dict[str, str]:
    return json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["sha256"]


def test_kill_and_resume_gives_the_same_checkpoint(models, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    src, out = models["qwen2"], tmp_path / "resumed"
    argv = [sys.executable, "-m", "convert.cli", str(src), str(out), "--scheme", "w4a4", *SMALL_CALIB]
    env = {**os.environ, "RUQUANT_FAULT_AFTER_LAYER": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    killed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after layer 0, like kill -9
    assert not out.exists()
    partial = tmp_path / ".resumed.partial"
    assert (partial / "progress.json").is_file()
    assert json.loads((partial / "progress.json").read_text())["state"]["next_layer"] == 1

    assert cli.main([str(src), str(out), "--scheme", "w4a4", *SMALL_CALIB, "--resume"]) == 0
    assert not partial.exists()
    assert json.loads((out / "ruquant_report.json").read_text())["resumed_at_layer"] == 1
    fresh = tmp_path / "fresh"
    assert cli.main([str(src), str(fresh), "--scheme", "w4a4", *SMALL_CALIB]) == 0
    assert _shard_hashes(out) == _shard_hashes(fresh)


def test_resume_refuses_other_options(models, tmp_path: Path, capsys) -> None:
    import os
    import subprocess
    import sys

    src, out = models["llama"], tmp_path / "o"
    env = {**os.environ, "RUQUANT_FAULT_AFTER_LAYER": "0", "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, "-m", "convert.cli", str(src), str(out), *SMALL_CALIB], env=env,
                   capture_output=True)
    assert cli.main([str(src), str(out), *SMALL_CALIB, "--seed", "7", "--resume"]) == ExitCode.BAD_INPUT
    assert "other options" in capsys.readouterr().err
    assert not out.exists()
    # the refused resume kept the interrupted run: the original options still resume it
    assert (tmp_path / f".{out.name}.partial").is_dir()
    assert cli.main([str(src), str(out), *SMALL_CALIB, "--resume"]) == 0
    assert "resuming at layer 1" in capsys.readouterr().out


def test_dry_run_writes_nothing(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dry"
    assert cli.main([str(models["qwen2"]), str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "hadamard 344" in text and "2 layers" in text and "14 quantized linears" in text
    assert list(tmp_path.iterdir()) == []


def _cfg_edit(**edit):  # noqa: ANN003, ANN202
    def apply(src: Path) -> None:
        cfg = {k: v for k, v in read_config(src).items() if k not in edit or edit[k] is not None}
        cfg.update({k: v for k, v in edit.items() if v is not None})
        (src / "config.json").write_text(json.dumps(cfg))
    return apply


def _drop_tensor(name: str):  # noqa: ANN202
    return lambda src: _edit_weights(src, lambda sd: sd.pop(name, None))


def _inf_embedding(src: Path) -> None:
    def edit(sd: dict) -> None:
        if "model.embed_tokens.weight" in sd:
            sd["model.embed_tokens.weight"][3, 0] = float("inf")
    _edit_weights(src, edit)


def _rename_shards(src: Path) -> None:
    for f in src.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))


# (what is wrong, how to make it, extra flags, exit code, message) -- the converter's bad-input table
BAD_INPUTS = [
    ("no config.json", lambda src: (src / "config.json").unlink(), [], ExitCode.BAD_INPUT, "has no config.json"),
    ("config.json not JSON", lambda src: (src / "config.json").write_text("{"), [], ExitCode.BAD_INPUT,
     "is not valid JSON"),
    ("config lacks intermediate_size", _cfg_edit(intermediate_size=None), [], ExitCode.BAD_INPUT,
     "lacks 'intermediate_size'"),
    ("already quantized", _cfg_edit(quantization_config={"quant_method": "gptq"}), [], ExitCode.UNSUPPORTED,
     "already quantized (gptq)"),
    ("float64 checkpoint", _cfg_edit(torch_dtype="float64"), [], ExitCode.UNSUPPORTED, "unsupported checkpoint dtype"),
    ("yarn rope scaling", _cfg_edit(rope_scaling={"rope_type": "yarn", "factor": 4.0}), [], ExitCode.UNSUPPORTED,
     "rope scaling 'yarn'"),
    ("vocab_size disagrees with the embedding", _cfg_edit(vocab_size=1000), [], ExitCode.BAD_INPUT,
     "config.json implies"),
    ("lm_head missing (untied)", _drop_tensor("lm_head.weight"), [], ExitCode.BAD_INPUT, "'lm_head.weight' is missing"),
    ("Inf in the embedding", _inf_embedding, [], ExitCode.NUMERICS, "contains NaN or Inf"),
    ("no safetensors weights", _rename_shards, [], ExitCode.BAD_INPUT, "holds no *.safetensors"),
    ("tokenizer.json broken", lambda src: (src / "tokenizer.json").write_text("{"), [], ExitCode.BAD_INPUT,
     "cannot load the tokenizer"),
    ("unknown rotation", None, ["--rotation", "givens"], ExitCode.UNSUPPORTED, "unknown rotation 'givens'"),
    ("unknown weight quantizer", None, ["--weight-quantizer", "awq"], ExitCode.UNSUPPORTED,
     "unknown weight quantizer 'awq'"),
    ("zero calibration samples", None, ["--calib-samples", "0"], ExitCode.BAD_INPUT, "--calib-samples must be"),
    ("unknown device", None, ["--device", "tpu"], ExitCode.BAD_INPUT, "--device must be"),
    ("LRQ rank 0", None, ["--weight-quantizer", "lrq", "--lrq-rank", "0"], ExitCode.BAD_INPUT, "--lrq-rank must be"),
    ("TP size 0", None, ["--tp-size", "0"], ExitCode.BAD_INPUT, "--tp-size must be >= 1"),
    ("group size not dividing", None, ["--group-size", "48"], ExitCode.UNSUPPORTED, "does not divide"),
    ("activation clip ratio > 1", None, ["--act-clip-ratio", "1.5"], ExitCode.UNSUPPORTED, "clip_ratio must be"),
]


@pytest.mark.parametrize("what, mutate, flags, code, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_table(models, tmp_path: Path, capsys, what: str, mutate, flags: list[str],  # noqa: ANN001
                         code: ExitCode, message: str) -> None:
    src = models["llama"]
    if mutate is not None:
        src = _copy_model(src, tmp_path / "src")
        mutate(src)
    _assert_fails([str(src), *flags], tmp_path / "out", code, message, capsys)


@pytest.mark.parametrize("text, message", [(None, "does not exist"), (b"caf\xe9 " * 400, "is not UTF-8")])
def test_bad_calibration_text_file(models, tmp_path: Path, capsys, text: bytes | None, message: str) -> None:
    path = tmp_path / "calib.txt"
    if text is not None:
        path.write_bytes(text)
    _assert_fails([str(models["llama"]), "--calib-text", str(path)], tmp_path / "out", ExitCode.BAD_INPUT,
                  message, capsys)


def test_missing_output_parent(models, tmp_path: Path, capsys) -> None:
    out = tmp_path / "no_such_parent" / "out"
    assert cli.main([str(models["llama"]), str(out), *SMALL_CALIB]) == ExitCode.BAD_INPUT
    assert "parent directory" in capsys.readouterr().err and not out.parent.exists()


def test_unknown_flag_is_an_argparse_error(models, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([str(models["llama"]), str(tmp_path / "out"), "--bits", "4"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rot", [
    ("hadamard", 256, None, None), ("hadamard", 688, None, None),  # 2^8; 172 x 4 (Paley)
    ("hadamard", 688, 344, None),  # per tensor-parallel shard (--tp-size 2)
    ("hadamard", 1024, None, 1000),  # dimension expansion: zero-padded input
    ("block_diagonal", 96, None, None),
])
def test_online_rotation_absorbed_without_its_dense_matrix(rot) -> None:
    """``W Q`` from Q's Kronecker factors equals ``W @ Q.matrix()`` (the dense path it replaces)."""
    from convert import fuse
    from vllm_ruquant.reference import OnlineRotation

    kind, size, block, padded = rot
    g = torch.Generator().manual_seed(0)
    blocks = torch.linalg.qr(torch.randn(3, 32, 32, generator=g))[0] if kind == "block_diagonal" else None
    r = OnlineRotation(kind, size, blocks, block_size=block, padded_from=padded)
    w = torch.randn(24, r.in_features, generator=g, dtype=torch.float64)
    got = fuse.times_online_rotation(w, r)
    want = w @ r.matrix().double()
    assert got.dtype == torch.float64 and got.shape == want.shape == (24, size)
    assert torch.allclose(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


def test_qsur_of_fewer_samples_than_dimensions_uses_the_small_gram_matrix() -> None:
    """n < k: the n x n Gram matrix gives the k x k second moment's spectrum (rest zero, clamped)."""
    import math

    from convert.diagnostics import qsur

    def direct(x: torch.Tensor) -> dict[str, float]:  # the k x k computation
        x = x.double()
        k = x.shape[1]
        c = x.T @ x / x.shape[0]
        lam = torch.linalg.eigvalsh(c).clamp_min(float(c.diagonal().max()) * 1e-9)
        hd, hm = 0.5 * float(lam.log().sum()), 0.5 * math.log(float(c.diagonal().max()))
        log_ball = (k / 2) * math.log(math.pi) - math.lgamma(k / 2 + 1)
        return {"qsur_per_dim": math.exp(hd / k - hm),
                "qsur_log10": (log_ball + hd - k * (math.log(2.0) + hm)) / math.log(10)}

    g = torch.Generator().manual_seed(0)
    for n, k in [(64, 200), (300, 200)]:
        x = torch.randn(n, k, generator=g) * torch.linspace(0.2, 3.0, k)
        got, want = qsur(x), direct(x)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6), (n, k, key)


@pytest.mark.parametrize(("flags", "rotation", "clip", "act_order"), [
    (["--scheme", "w4a4kv4"], "hadamard", "gbs", True),  # issue 24: the measured default recipe per scheme
    (["--scheme", "w3a3kv3"], "hadamard", "gbs", False),
    (["--scheme", "w4a16"], "hadamard", "gbs", True),
    (["--scheme", "w4a8"], "hadamard", "gbs", True),
    (["--scheme", "w4a4"], "hadamard", "gbs", True),  # the CLI's and the quickstart's default scheme
    (["--scheme", "w4a8kv4"], "hadamard", "gbs", True),
    (["--scheme", "w8a8"], "hadamard", "none", False),
    ([], "hadamard", "gbs", True),
    (["--scheme", "w6a6"], "hadamard", "none", False),
    (["--scheme", "w4a4kv4", "--act-clip-ratio", "0.9"], "hadamard", "none", True),  # a given ratio: kept
    (["--scheme", "w4a4kv4", "--clip", "none", "--no-act-order", "--rotation", "hadamard"], "hadamard", "none",
     False),
    (["--scheme", "w6a6", "--act-order", "--transform", "ostquant"], "ostquant", "none", True),
])
def test_default_recipe_per_scheme(models: dict[str, Path], flags: list[str], rotation: str, clip: str,
                                   act_order: bool) -> None:
    args = cli.build_parser().parse_args([str(models["llama"]), "out", *flags])
    opts = cli.options_from_args(args)
    assert opts.rotation == rotation and opts.clip == clip
    assert opts.quantizer_options.get("act_order", False) == act_order
