"""Fuzzing ``vllm_ruquant.checkpoint.validate`` with mutated copies of one real converted checkpoint.

Why: the validator runs on whatever a user points vLLM at -- half-copied directories,
hand-edited configs, shards from another conversion. Its contract is that every such
problem becomes one ``CheckpointError`` naming the culprit: never another exception type
(a ``KeyError`` / ``struct.error`` traceback), never a hang (each case runs under an alarm),
never a pass on a checkpoint that cannot load. Mutations fall in two groups:

* invalidating ones (wrong dims, bad bits, truncation, missing tensors, index edits,
  checksum mismatches): ``validate`` must raise ``CheckpointError`` every time;
* arbitrary ones (any JSON value anywhere, random header bytes with checksums off), some
  of which leave a loadable checkpoint: ``validate`` must raise ``CheckpointError`` or pass.

The checkpoint comes from the real converter on a tiny Llama (~0.7 MB, 3 shards).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from convert import cli
from convert.tiny_models import make_tiny_llama
from vllm_ruquant.checkpoint import validate as val
from vllm_ruquant.checkpoint.errors import CheckpointError, ExitCode
from vllm_ruquant.checkpoint.shards import INDEX_FILE, sha256_file
from vllm_ruquant.checkpoint.validate import validate

CASE_TIMEOUT_S = 10
# RUQUANT_FUZZ_EXAMPLES=500 for a longer local run; CI keeps the suite under a minute
FUZZ = settings(max_examples=int(os.environ.get("RUQUANT_FUZZ_EXAMPLES", "25")), deadline=None,
                derandomize=not os.environ.get("RUQUANT_FUZZ_EXAMPLES"), database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INDEX = INDEX_FILE


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("validate_fuzz")
    src = make_tiny_llama(root / "src", arch="llama", intermediate_size=256, seed=1)
    out = root / "w4a4"
    assert cli.main([str(src), str(out), "--scheme", "w4a4", "--calib-samples", "2", "--calib-seq-len", "32"]) == 0
    return out


class CaseTimeout(Exception):
    """A validation ran past CASE_TIMEOUT_S: a hang is a bug, not a slow case."""


@contextlib.contextmanager
def alarm(seconds: float = CASE_TIMEOUT_S) -> Iterator[None]:
    """SIGALRM-based limit (pytest runs tests in the main thread, where signals land)."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"validate() did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def mutable_copy(ckpt: Path) -> Iterator[Path]:
    """A private copy per hypothesis example (function-scoped tmp_path is shared between them)."""
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "ckpt"
        shutil.copytree(ckpt, dst)
        yield dst


def must_fail(path: Path, **kw: Any) -> CheckpointError:
    with alarm():
        try:
            validate(path, **kw)
        except CheckpointError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"not one line: {msg!r}"
            return e
    pytest.fail("validate() accepted an invalid checkpoint")


def may_pass(path: Path, **kw: Any) -> None:
    """Arbitrary mutation: a clean error or a pass (the mutation may be harmless)."""
    with alarm(), contextlib.suppress(CheckpointError):
        validate(path, **kw)


# ------------------------------------------------------------------ file helpers


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def header_len(shard: Path) -> int:
    return struct.unpack("<Q", shard.read_bytes()[:8])[0]


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    new = fn(data)
    path.write_text(json.dumps(data if new is None else new))


def set_key(keys: tuple[str, ...], value: Any) -> Callable[[dict], None]:
    def fn(cfg: dict) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return fn


def del_key(keys: tuple[str, ...]) -> Callable[[dict], None]:
    def fn(cfg: dict) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return fn


def rewrite_shard(path: Path, shard: Path, fn: Callable[[dict], None], *, fix_index: bool = True) -> None:
    """Change a shard's tensors with ``fn``; optionally keep the index consistent (weight_map and
    sha256), so that the validator's answer is about the tensors, not the checksum."""
    tensors = load_file(str(shard))
    fn(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if fix_index:
        def fix(index: dict) -> None:
            wm = {k: v for k, v in index["weight_map"].items() if v != shard.name}
            wm.update({k: shard.name for k in tensors})
            index["weight_map"] = wm
            index["metadata"]["sha256"][shard.name] = sha256_file(shard)
        edit_json(path / INDEX, fix)


# ---------------------------------------------------------------------- baseline


def test_unmutated_checkpoint_validates(ckpt: Path) -> None:
    with alarm():
        report = validate(ckpt)
    assert report.checksums_verified == 3 and report.tensors == 35 and report.shards == 3
    assert validate(ckpt, verify_checksums=False).checksums_skipped


def test_skip_checksum_env(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RUQUANT_SKIP_CHECKSUM=1 skips hashing: a flipped data byte then goes unnoticed (documented)."""
    with mutable_copy(ckpt) as p:
        s = shards(p)[1]
        b = bytearray(s.read_bytes())
        b[-1] ^= 0xFF
        s.write_bytes(bytes(b))
        assert "sha256" in str(must_fail(p))
        monkeypatch.setenv(val.SKIP_CHECKSUM_ENV, "1")
        assert validate(p).checksums_skipped


# ------------------------------------------------------------- config mutations

DIM_KEYS = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "vocab_size": None}
JUNK = st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.booleans(),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.integers(max_value=0))
ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(),
                                  st.text(max_size=8)),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=6)


@st.composite
def bad_config_edit(draw: st.DrawFn) -> tuple[str, Callable[[dict], None]]:
    """One edit of config.json that makes the checkpoint unservable."""
    kind = draw(st.sampled_from(["dim_value", "dim_type", "dim_delete", "quant"]))
    if kind == "dim_value":
        key = draw(st.sampled_from(sorted(DIM_KEYS)))
        v = draw(st.integers(1, 4096))
        return f"{key}={v}", lambda c: set_key((key,), v if v != c[key] else v + 1)(c)
    if kind == "dim_type":
        key = draw(st.sampled_from(sorted(DIM_KEYS)))
        value = draw(JUNK)
        return f"{key}={value!r}", set_key((key,), value)
    if kind == "dim_delete":
        # head_dim is left out: deleting it falls back to hidden/heads = 32, the same value
        key = draw(st.sampled_from(["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "quantization_config", "architectures"]))
        if key == "architectures":
            return "architectures+model_type deleted", lambda c: (c.pop("architectures"), c.pop("model_type"))
        return f"del {key}", del_key((key,))
    q = ("quantization_config",)
    edits: list[tuple[str, tuple[str, ...], Any]] = [
        ("weight.bits", (*q, "weight", "bits"), draw(st.one_of(st.sampled_from([3, 6, 8, 5, 2, 16]), JUNK))),
        ("weight.group_size", (*q, "weight", "group_size"),
         draw(st.one_of(st.sampled_from([2, 32, 64, 128, 256, 0, 7, -2]), JUNK))),
        ("weight.symmetric", (*q, "weight", "symmetric"), draw(st.sampled_from([False, 1, "true", None]))),
        ("activation.bits", (*q, "activation", "bits"), draw(st.one_of(st.sampled_from([5, 2, 32, 0]), JUNK))),
        ("activation.clip_ratio", (*q, "activation", "clip_ratio"),
         draw(st.one_of(st.floats(1.0001, 1e9), st.floats(-1e9, 0.0), st.just(float("nan")), st.text(max_size=3)))),
        ("kv_cache.bits", (*q, "kv_cache", "bits"), draw(st.sampled_from([5, 2, 7, 32, "16", None]))),
        ("rotation.size", (*q, "online_rotations", "down_proj", "size"),
         draw(st.one_of(st.integers(-5, 10**12).filter(lambda v: v != 256), JUNK))),
        ("rotation.kind", (*q, "online_rotations", "down_proj", "kind"),
         draw(st.one_of(st.sampled_from(["block_diagonal", "givens", ""]), JUNK))),
        ("format_version", (*q, "format_version"), draw(st.one_of(st.integers().filter(lambda v: v != 1), JUNK))),
        ("quant_method", (*q, "quant_method"), draw(st.sampled_from(["gptq", "RUQUANT", "", None, 1]))),
        ("unknown key", (*q, draw(st.sampled_from(["weights", "extra", "version"]))), draw(ANY_JSON)),
        ("ignore", (*q, "ignore"), draw(st.sampled_from([["q_proj"], ["down_proj", "lm_head"], "lm_head", [1], {}]))),
        ("online_rotations", (*q, "online_rotations"),
         draw(st.sampled_from([[], "hadamard", {"up_proj": {"kind": "hadamard", "size": 256}}]))),
        ("weight", (*q, "weight"), draw(st.sampled_from([[], "4", 4, None]))),
    ]
    name, keys, value = draw(st.sampled_from(edits))
    return f"{name}={value!r}", set_key(keys, value)


@FUZZ
@given(edit=bad_config_edit())
def test_bad_config_edit_is_a_clean_error(ckpt: Path, edit: tuple[str, Callable[[dict], None]]) -> None:
    _, fn = edit
    with mutable_copy(ckpt) as p:
        edit_json(p / "config.json", fn)
        must_fail(p, verify_checksums=False)


@FUZZ
@given(data=st.data())
def test_arbitrary_config_edit_never_crashes(ckpt: Path, data: st.DataObject) -> None:
    """Any JSON value at any existing key path (or the key deleted): error or pass, nothing else."""
    with mutable_copy(ckpt) as p:
        cfg = json.loads((p / "config.json").read_text())
        paths: list[tuple[str, ...]] = []

        def walk(d: Any, prefix: tuple[str, ...]) -> None:
            if isinstance(d, dict):
                for k, v in d.items():
                    paths.append((*prefix, k))
                    walk(v, (*prefix, k))
        walk(cfg, ())
        keys = data.draw(st.sampled_from(paths))
        mutated = copy.deepcopy(cfg)
        if data.draw(st.booleans()):
            del_key(keys)(mutated)
        else:
            set_key(keys, data.draw(ANY_JSON))(mutated)
        (p / "config.json").write_text(json.dumps(mutated))
        may_pass(p, verify_checksums=False)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"ruquant"', "\xff\xfe", "{" * 100000])
def test_config_not_an_object(ckpt: Path, text: str) -> None:
    with mutable_copy(ckpt) as p:
        (p / "config.json").write_bytes(text.encode("latin-1"))
        assert must_fail(p).code == ExitCode.INVALID


# ---------------------------------------------------------------- shard damage


@FUZZ
@given(data=st.data())
def test_truncated_shard_is_caught_without_hashing(ckpt: Path, data: st.DataObject) -> None:
    with mutable_copy(ckpt) as p:
        s = data.draw(st.sampled_from(shards(p)))
        raw = s.read_bytes()
        s.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
        e = must_fail(p, verify_checksums=False)
        assert s.name in str(e) and e.code == ExitCode.CORRUPT


@FUZZ
@given(data=st.data())
def test_flipped_header_byte(ckpt: Path, data: st.DataObject) -> None:
    """Any flipped bit in a shard's length field or JSON header: with checksums always an error;
    without them an error or (a harmless flip, e.g. in __metadata__) a pass."""
    with mutable_copy(ckpt) as p:
        s = data.draw(st.sampled_from(shards(p)))
        raw = bytearray(s.read_bytes())
        pos = data.draw(st.integers(0, 8 + header_len(s) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        s.write_bytes(bytes(raw))
        may_pass(p, verify_checksums=False)
        assert must_fail(p).code == ExitCode.CORRUPT


@FUZZ
@given(data=st.data())
def test_flipped_data_byte_fails_the_checksum(ckpt: Path, data: st.DataObject) -> None:
    with mutable_copy(ckpt) as p:
        s = data.draw(st.sampled_from(shards(p)))
        raw = bytearray(s.read_bytes())
        raw[data.draw(st.integers(8 + header_len(s), len(raw) - 1))] ^= 0x10
        s.write_bytes(bytes(raw))
        e = must_fail(p)
        assert s.name in str(e) and "sha256" in str(e)


@FUZZ
@given(data=st.data())
def test_deleted_tensor_is_named(ckpt: Path, data: st.DataObject) -> None:
    with mutable_copy(ckpt) as p:
        s = data.draw(st.sampled_from(shards(p)))
        victim = data.draw(st.sampled_from(sorted(load_file(str(s)))))
        fix_index = data.draw(st.booleans())
        rewrite_shard(p, s, lambda t: t.pop(victim), fix_index=fix_index)
        e = must_fail(p, verify_checksums=fix_index)
        assert victim in str(e)


@pytest.mark.parametrize("name,shape,dtype", [
    ("model.layers.0.mlp.down_proj.online_rotation", (2, 128, 128), "float32"),
    ("model.layers.2.self_attn.q_proj.qweight", (128, 64), "uint8"),
    ("model.layers.0.self_attn.q_proj.weight", (128, 128), "float32"),
    ("model.layers.1.mlp.gate_proj.qweight_v2", (4,), "uint8"),
])
def test_extra_tensor_is_named(ckpt: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
    import torch

    with mutable_copy(ckpt) as p:
        s = shards(p)[1]
        rewrite_shard(p, s, lambda t: t.__setitem__(name, torch.zeros(shape, dtype=getattr(torch, dtype))))
        assert name in str(must_fail(p))


@FUZZ
@given(data=st.data())
def test_wrong_shape_or_dtype_is_named(ckpt: Path, data: st.DataObject) -> None:
    import torch

    with mutable_copy(ckpt) as p:
        s = data.draw(st.sampled_from(shards(p)))
        victim = data.draw(st.sampled_from(sorted(load_file(str(s)))))

        def change(t: dict) -> None:
            x = t[victim]
            if data.draw(st.booleans()):
                t[victim] = x.to(torch.int8 if x.dtype != torch.int8 else torch.uint8)
            else:
                t[victim] = torch.zeros(*x.shape[:-1], x.shape[-1] + data.draw(st.integers(1, 3)), dtype=x.dtype)
        rewrite_shard(p, s, change)
        assert victim in str(must_fail(p))


# ---------------------------------------------------------------- index edits


@st.composite
def bad_index_edit(draw: st.DrawFn) -> Callable[[dict], None]:
    def pick_tensor(index: dict) -> str:
        return draw(st.sampled_from(sorted(index["weight_map"])))

    kind = draw(st.sampled_from(["drop_entry", "move_entry", "missing_file", "bad_name", "sha_value",
                                 "sha_drop", "sha_extra", "sha_type", "weight_map_type", "not_object"]))

    def fn(index: dict) -> Any:
        wm, sha = index["weight_map"], index["metadata"]["sha256"]
        if kind == "drop_entry":
            del wm[pick_tensor(index)]
        elif kind == "move_entry":
            t = pick_tensor(index)
            wm[t] = draw(st.sampled_from(sorted(set(wm.values()) - {wm[t]})))
        elif kind == "missing_file":
            wm[pick_tensor(index)] = "model-00009-of-00009.safetensors"
        elif kind == "bad_name":
            wm[pick_tensor(index)] = draw(st.sampled_from(["../config.json", "/etc/passwd", "", ".", "a/b"]))
        elif kind == "sha_value":
            k = draw(st.sampled_from(sorted(sha)))
            sha[k] = ("0" if sha[k][0] != "0" else "1") + sha[k][1:]
        elif kind == "sha_drop":
            del sha[draw(st.sampled_from(sorted(sha)))]
        elif kind == "sha_extra":
            sha["model-00099-of-00099.safetensors"] = "0" * 64
        elif kind == "sha_type":
            index["metadata"]["sha256"] = draw(st.sampled_from([[], "abc", {k: 1 for k in sha},
                                                                {k: "xyz" for k in sha}]))
        elif kind == "weight_map_type":
            index["weight_map"] = draw(st.sampled_from([[], "x", None, {"a": 1}]))
        else:
            return draw(st.sampled_from([[], 3, "index", True]))
        return None
    return fn


@FUZZ
@given(edit=bad_index_edit())
def test_bad_index_edit_is_a_clean_error(ckpt: Path, edit: Callable[[dict], None]) -> None:
    with mutable_copy(ckpt) as p:
        edit_json(p / INDEX, edit)
        must_fail(p)


def test_missing_shard_and_missing_weights(ckpt: Path) -> None:
    with mutable_copy(ckpt) as p:
        shards(p)[2].unlink()
        e = must_fail(p)
        assert e.code == ExitCode.MISSING and "model-00003-of-00003.safetensors" in str(e)
        for s in shards(p):
            s.unlink()
        (p / INDEX).unlink()
        assert must_fail(p).code == ExitCode.MISSING
        # a weightless directory (vLLM --load-format dummy) passes when weights are optional
        assert not validate(p, require_weights=False).weights_present


def test_adversarial_hadamard_size_does_not_hang(ckpt: Path) -> None:
    """4 * 1000003 + ... : format's Hadamard search would build / trial-divide a huge order."""
    for size in (4 * 1000003, 12 * 2**40 + 4, 2**61 - 1, 344 * 3):
        with mutable_copy(ckpt) as p:
            edit_json(p / "config.json", set_key(("quantization_config", "online_rotations", "down_proj", "size"),
                                                 size))
            assert "Hadamard" in str(must_fail(p))


# ------------------------------------------------------------------ CLI + plugin


def test_cli_exit_codes(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert val.main([str(ckpt)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert val.main([str(tmp_path / "nope")]) == ExitCode.MISSING
    err = capsys.readouterr().err
    assert err.startswith("ruquant-validate: error: ") and err.count("\n") == 1
    with mutable_copy(ckpt) as p:
        s = shards(p)[0]
        s.write_bytes(s.read_bytes()[:-1])
        assert val.main([str(p), "--skip-checksum"]) == ExitCode.CORRUPT


def test_plugin_validates_once_before_loading(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``RUQuantConfig.maybe_update_config`` (vLLM's first call with the model path) validates."""
    from vllm_ruquant.config import RUQuantConfig

    cfg = json.loads((ckpt / "config.json").read_text())
    qc = RUQuantConfig.from_config(cfg["quantization_config"])
    monkeypatch.setenv(val.VALIDATED_ENV, "")  # restored (removed) afterwards
    monkeypatch.setattr(val, "_VALIDATED", {})
    calls: list[Path] = []
    real = val.validate
    monkeypatch.setattr(val, "validate", lambda path, **kw: calls.append(path) or real(path, **kw))
    qc.maybe_update_config(str(ckpt))
    qc.maybe_update_config(str(ckpt))
    assert len(calls) == 1
    with mutable_copy(ckpt) as p:
        s = shards(p)[1]
        s.write_bytes(s.read_bytes()[:100])
        with pytest.raises(CheckpointError, match="ruquant: cannot serve .*model-00002-of-00003.safetensors"):
            qc.maybe_update_config(str(p))
