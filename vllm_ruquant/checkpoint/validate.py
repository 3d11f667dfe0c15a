"""Validate a ruquant checkpoint directory before vLLM allocates anything for it.

Why this exists: without it, a bad checkpoint fails deep inside vLLM -- a ``KeyError`` in a
model's ``load_weights``, a shape assertion in a weight loader, or (worst) silently wrong
output from a shard that was truncated or bit-flipped on copy -- after the engine has
already spent a minute building the model and grabbing memory. This module answers
"will this directory load, and is it the data the converter wrote?" in milliseconds, from
metadata alone, and says in one line what is wrong and where (config key, tensor, shard):

* ``config.json``: the model dimensions (``models.model_dims``, Llama-family decoder) and the
  ``quantization_config`` through ``format.parse_format`` (format version, schema) and
  ``format.check_model`` (online rotation sizes and group size vs the model).
* ``model.safetensors.index.json`` (if present): well formed, every shard it names exists,
  the index and the shards agree on which tensor lives where.
* every shard's safetensors header (``shards.read_safetensors_header``), never the tensor
  data: dtypes known, byte ranges consistent with shapes and dtypes, the file exactly as
  long as the header says (so a truncated copy is caught without hashing).
* every tensor the plugin and vLLM will ask for is present with the shape and dtype that
  ``format.linear_tensor_shapes`` (quantized linears) or the HF layout (embeddings, norms,
  lm_head) implies; no extra quantized tensors or stray layers (vLLM's ``load_weights``
  would die on them with a bare ``KeyError``).
* each shard's sha256 against the ``metadata.sha256`` the converter records in the index.
  This is the only check that reads whole files (tens of GB for a 70B model, ~1-2 GB/s per
  thread), so it runs on a few threads and can be skipped with ``RUQUANT_SKIP_CHECKSUM=1``.

Entry points: ``validate(path)`` (raises ``CheckpointError``), ``validate_for_serving``
(what the plugin calls, once per process, from ``RUQuantConfig.maybe_update_config``, the
first hook at which vLLM 0.26 and 0.32 hand us the model path), and the command line
``ruquant-validate CKPT`` / ``python -m vllm_ruquant.checkpoint.validate CKPT`` (exit codes:
``errors.ExitCode``).

This module must stay importable without vLLM (the CLI runs on machines without it) and
never imports ``convert/`` (the serving side does not depend on the converter); the
import-linter contracts in pyproject.toml check both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_ruquant import settings
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.errors import CheckpointError, ExitCode
from vllm_ruquant.checkpoint.models import CONFIG_FILE, ModelDims, model_dims, short_name
from vllm_ruquant.checkpoint.shards import (
    FLOAT_DTYPES,
    TORCH_TO_ST,
    TensorInfo,
    collect_tensors,
    read_index,
    read_json,
    verify_shard_checksums,
)

SKIP_CHECKSUM_ENV = "RUQUANT_SKIP_CHECKSUM"
SKIP_VALIDATE_ENV = "RUQUANT_SKIP_VALIDATE"
# Set after a successful validation so that child processes (vLLM's engine core / workers
# inherit the environment) do not validate and hash the same checkpoint again.
VALIDATED_ENV = settings.VALIDATED_ENV

_QUANT_SUFFIXES = (fmt_mod.QWEIGHT, fmt_mod.WEIGHT_SCALE, fmt_mod.ONLINE_ROTATION)
# tensors some HF exports carry that no loader reads
_HARMLESS_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class ValidationReport:
    """What was checked, for the log line and the CLI's summary."""

    path: Path
    fmt: fmt_mod.RUQuantFormat
    tensors: int = 0
    shards: int = 0
    checksums_verified: int = 0
    checksums_skipped: bool = False
    weights_present: bool = True
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        scheme = self.fmt.scheme
        if not self.weights_present:
            weights = "no weight files (config checked only)"
        else:
            sums = ("sha256 skipped (RUQUANT_SKIP_CHECKSUM)" if self.checksums_skipped
                    else f"sha256 of {self.checksums_verified} shard(s) verified" if self.checksums_verified
                    else "no sha256 recorded")
            weights = f"{self.tensors} tensors in {self.shards} shard(s), {sums}"
        return f"{self.path}: {scheme}, {weights}, in {self.seconds:.2f} s"


# ------------------------------------------------------------------------ helpers


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_format(cfg: dict[str, Any]) -> fmt_mod.RUQuantFormat:
    """The parsed ``quantization_config`` of config.json (top level, or in ``text_config`` for
    multimodal models), through ``format.parse_format`` like the plugin's."""
    qc = cfg.get("quantization_config")
    if qc is None and isinstance(cfg.get("text_config"), dict):
        qc = cfg["text_config"].get("quantization_config")
    if qc is None:
        raise CheckpointError(f"{CONFIG_FILE} has no quantization_config: not a ruquant checkpoint "
                              "(write one with ruquant-convert)")
    try:
        return fmt_mod.parse_format(qc)
    except fmt_mod.FormatError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None


Expected = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]


def expected_tensors(dims: ModelDims, fmt: fmt_mod.RUQuantFormat) -> tuple[Expected, Expected]:
    """``(required, optional)``: name -> (shape, allowed safetensors dtypes) for the checkpoint
    the converter writes for ``dims`` and ``fmt``. Quantized linears come from
    ``format.linear_tensor_shapes``; the rest is the Hugging Face Llama layout."""
    d, v = dims.hidden_size, dims.vocab_size
    required: Expected = {"model.embed_tokens.weight": ((v, d), FLOAT_DTYPES),
                          "model.norm.weight": ((d,), FLOAT_DTYPES)}
    optional: Expected = {}
    if not dims.tie_word_embeddings:
        required["lm_head.weight"] = ((v, d), FLOAT_DTYPES)
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        required[f"{p}.input_layernorm.weight"] = ((d,), FLOAT_DTYPES)
        required[f"{p}.post_attention_layernorm.weight"] = ((d,), FLOAT_DTYPES)
        if dims.qk_norm:
            for norm in ("q_norm", "k_norm"):
                required[f"{p}.self_attn.{norm}.weight"] = ((dims.head_dim,), FLOAT_DTYPES)
        for prefix in dims.linear_prefixes(i):
            n, k = dims.linear_shape(short_name(prefix))
            optional[f"{prefix}.{fmt_mod.BIAS}"] = ((n,), FLOAT_DTYPES)
            if fmt.is_ignored(prefix):
                required[f"{prefix}.weight"] = ((n, k), FLOAT_DTYPES)
                continue
            g = fmt.weight.group_size
            if fmt.weight.bits == 4 and k % 2:
                raise CheckpointError(f"{prefix}: int4 packing needs an even input size, the model's is {k}")
            if g != -1 and k % g:
                raise CheckpointError(f"{CONFIG_FILE}: weight.group_size {g} does not divide the input size "
                                      f"{k} of {prefix}")
            rot = fmt.rotation_for(prefix)
            for kind, (shape, dtype) in fmt_mod.linear_tensor_shapes(fmt, n, k, rot).items():
                required[fmt_mod.tensor_name(prefix, kind)] = (shape, (TORCH_TO_ST[dtype],))
    return required, optional


def _check_tensors(tensors: dict[str, TensorInfo], required: Expected, optional: Expected) -> None:
    """Missing, misshapen, mistyped and unexpected tensors, each named with its shard."""
    for name, (shape, dtypes) in required.items():
        if name not in tensors:
            raise CheckpointError(f"tensor {name!r} is missing (expected {list(shape)} {'/'.join(dtypes)})")
    for name, info in sorted(tensors.items()):
        spec = required.get(name) or optional.get(name)
        if spec is None:
            if name.endswith(_HARMLESS_SUFFIXES):
                continue
            last = name.rsplit(".", 1)[-1]
            what = "quantized tensor" if last in _QUANT_SUFFIXES else "tensor"
            raise CheckpointError(f"unexpected {what} {name!r} in shard {info.shard}: the config "
                                  "(layers, ignore list, online rotations) does not call for it")
        shape, dtypes = spec
        if info.shape != shape:
            raise CheckpointError(f"tensor {name!r} in shard {info.shard} has shape {list(info.shape)}, "
                                  f"the config implies {list(shape)}")
        if info.dtype not in dtypes:
            raise CheckpointError(f"tensor {name!r} in shard {info.shard} has dtype {info.dtype}, "
                                  f"expected {' or '.join(dtypes)}")


# ----------------------------------------------------------------------- validate


def validate(path: str | os.PathLike[str], *, verify_checksums: bool | None = None,
             require_weights: bool = True) -> ValidationReport:
    """Check a ruquant checkpoint directory from its metadata; raise ``CheckpointError`` on the
    first problem (config, index, headers, tensors, then checksums: cheapest and most specific
    first, so a truncated shard is reported as truncated rather than as a hash mismatch).

    ``verify_checksums`` None means "unless RUQUANT_SKIP_CHECKSUM=1". ``require_weights``
    False accepts a directory with no weight files at all (config checks only).
    """
    t0 = time.perf_counter()
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist", ExitCode.MISSING)
    cfg = read_json(ckpt / CONFIG_FILE, "config", ExitCode.INVALID)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{CONFIG_FILE} must be a JSON object")
    fmt = read_format(cfg)
    try:
        dims = model_dims(cfg)
    except CheckpointError as e:  # whatever is wrong with config.json, the checkpoint is not servable
        raise CheckpointError(str(e), ExitCode.INVALID) from None
    try:
        fmt.check_model(dims.hidden_size, dims.intermediate_size, dims.attention_size)
    except fmt_mod.FormatError as e:
        raise CheckpointError(f"{CONFIG_FILE}: {e}") from None
    required, optional = expected_tensors(dims, fmt)
    report = ValidationReport(ckpt, fmt)

    index = read_index(ckpt)
    collected = collect_tensors(ckpt, index, require_weights)
    if collected is None:
        report.weights_present = False
    else:
        tensors, shards = collected
        _check_tensors(tensors, required, optional)
        report.tensors, report.shards = len(tensors), len(shards)
        if verify_checksums is None:
            verify_checksums = not _env_flag(SKIP_CHECKSUM_ENV)
        sha = index[1] if index is not None else None
        if not verify_checksums:
            report.checksums_skipped = True
        elif sha:
            report.checksums_verified = verify_shard_checksums(ckpt, sha)
    report.seconds = time.perf_counter() - t0
    return report


_VALIDATED: dict[str, ValidationReport | None] = {}


def validate_for_serving(model: str, log: Callable[[str], None] | None = None) -> ValidationReport | None:
    """What the plugin runs when vLLM hands it the model path: once per process (and once per
    process tree: children inherit ``RUQUANT_VALIDATED_CHECKPOINT``).

    A model that is not a local directory (a hub id not yet resolved) is left to vLLM; a
    directory without weight files passes with config checks only (``--load-format dummy``);
    ``RUQUANT_SKIP_VALIDATE=1`` turns the whole check off.
    """
    if _env_flag(SKIP_VALIDATE_ENV):
        return None
    ckpt = Path(model)
    if not ckpt.is_dir():
        if log:
            log(f"ruquant: {model} is not a local directory; its checkpoint is not validated")
        return None
    key = str(ckpt.resolve())
    if key in _VALIDATED or os.environ.get(VALIDATED_ENV) == key:
        return _VALIDATED.get(key)
    try:
        report = validate(ckpt, require_weights=False)
    except CheckpointError as e:
        raise CheckpointError(f"ruquant: cannot serve {model}: {e}", e.code) from None
    _VALIDATED[key] = report
    os.environ[VALIDATED_ENV] = key
    if log:
        log(f"ruquant: checkpoint validated: {report.summary()}")
    return report


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``ruquant-validate CKPT``: one line on stdout and 0, or one line on stderr and a
    non-zero ``ExitCode``; never a traceback for a bad checkpoint."""
    ap = argparse.ArgumentParser(
        prog="ruquant-validate",
        description="Check a ruquant checkpoint (config, format version, tensor shapes and dtypes, shard "
                    "headers and sha256) without loading it. Exit codes: 0 ok, 1 invalid, 2 bad command "
                    "line, 7 corrupt shard or index, 8 missing files.")
    ap.add_argument("checkpoint", type=Path, help="directory written by ruquant-convert")
    ap.add_argument("--skip-checksum", action="store_true",
                    help=f"do not hash the shards (same as {SKIP_CHECKSUM_ENV}=1)")
    args = ap.parse_args(argv)
    try:
        report = validate(args.checkpoint, verify_checksums=False if args.skip_checksum else None)
    except CheckpointError as e:
        print(f"ruquant-validate: error: {e}", file=sys.stderr)
        return int(e.code)
    print(f"ok: {report.summary()}")
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
