"""Streaming Hugging Face safetensors in, ruquant shards out (and the source's config.json).

``read_source`` reads the model to convert: its config.json and dimensions, refusing a
checkpoint that is quantized already.
``CheckpointReader`` memory-maps the source shards and hands out one tensor at a time,
so the converter holds one decoder layer, never the whole model. ``CheckpointWriter``
writes one shard per decoder layer into a temporary folder beside the destination and
renames it into place only when everything (index, config, tokenizer) is written: a
failed or interrupted conversion never leaves a half-written output directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from convert.errors import ConvertError, ExitCode
from vllm_ruquant.checkpoint.models import CONFIG_FILE, ModelDims, model_dims
from vllm_ruquant.checkpoint.shards import INDEX_FILE, sha256_file  # the checksum the loader verifies

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)


def read_config(model_dir: Path) -> dict[str, Any]:
    """A model directory's config.json as a dict (BAD_INPUT errors that name the file)."""
    path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise ConvertError(f"model directory {model_dir} does not exist", ExitCode.BAD_INPUT)
    if not path.is_file():
        raise ConvertError(f"{model_dir} has no config.json: not a Hugging Face model directory",
                           ExitCode.BAD_INPUT)
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}", ExitCode.BAD_INPUT) from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path} must hold a JSON object, got {type(cfg).__name__}", ExitCode.BAD_INPUT)
    return cfg


def read_source(model_dir: Path) -> tuple[dict[str, Any], ModelDims]:
    """config.json and dimensions of a model to convert: a supported 16/32-bit checkpoint."""
    cfg = read_config(model_dir)
    dims = model_dims(cfg)
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConvertError(f"the model is already quantized ({method}); convert a 16/32-bit checkpoint",
                           ExitCode.UNSUPPORTED)
    return cfg, dims


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file`` with its failures as one user error: safetensors reports a full disk as a
    ``SafetensorError`` ("I/O error: No space left on device"), not as an ``OSError``."""
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    except (OSError, SafetensorError) as e:
        raise ConvertError(f"cannot write {path}: {e}", ExitCode.IO_ERROR) from None


class CheckpointReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._handles: dict[str, Any] = {}
        index = model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConvertError(f"{index} is malformed: {e}", ExitCode.BAD_INPUT) from None
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise ConvertError(f"{model_dir} holds no *.safetensors weights (only safetensors are read)",
                                   ExitCode.BAD_INPUT)
            weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():
                    weight_map[name] = f.name
        self.weight_map = weight_map

    def _open(self, filename: str) -> Any:
        if filename not in self._handles:
            path = self.model_dir / filename
            try:
                handle = safe_open(str(path), framework="pt")
            except FileNotFoundError:
                raise ConvertError(f"shard {path} named by the index is missing", ExitCode.BAD_INPUT) from None
            except (SafetensorError, OSError, ValueError) as e:
                raise ConvertError(f"shard {path} is corrupt or truncated: {e}", ExitCode.BAD_INPUT) from None
            self._handles[filename] = handle
        return self._handles[filename]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> Iterator[str]:
        return iter(self.weight_map)

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConvertError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}",
                               ExitCode.BAD_INPUT)
        try:
            t = self._open(self.weight_map[name]).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConvertError(f"cannot read tensor {name!r} from {self.weight_map[name]} "
                               f"(corrupt or truncated shard?): {e}", ExitCode.BAD_INPUT) from None
        if dtype is not None:
            t = t.to(dtype)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ConvertError(f"tensor {name!r} contains NaN or Inf", ExitCode.NUMERICS)
        return t


class CheckpointWriter:
    """Writes shards into ``.<out>.partial`` beside ``out`` and renames it on ``commit()``.

    The partial folder also holds the resume state (``progress.json`` + tensors) after each
    finished layer, written atomically, so an interrupted conversion (Ctrl-C, kill -9)
    continues with ``resume=True`` and produces the same shards as an uninterrupted run.
    """

    PROGRESS = "progress.json"

    def __init__(self, out_dir: Path, overwrite: bool = False, resume: bool = False) -> None:
        self.out_dir = out_dir
        if out_dir.exists() and not overwrite:
            raise ConvertError(f"output directory {out_dir} already exists (use --overwrite)",
                               ExitCode.OUTPUT_EXISTS)
        parent = out_dir.parent
        if not parent.is_dir():
            raise ConvertError(f"parent directory {parent} of the output does not exist", ExitCode.BAD_INPUT)
        if not os.access(parent, os.W_OK):
            raise ConvertError(f"no permission to write in {parent}", ExitCode.IO_ERROR)
        self.tmp = parent / f".{out_dir.name}.partial"
        if self.tmp.exists() and not resume:
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.shards: list[str] = []
        self.shard_sha256: dict[str, str] = {}
        self.keep_partial = False  # set when an interruption should stay resumable

    # ------------------------------------------------------------------ resume state

    def save_progress(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Atomically record ``state`` (JSON) + ``tensors`` as the point to resume from."""
        step = int(state.get("step", 0))
        tensor_file = f"progress-{step:05d}.safetensors"
        _save(tensors, self.tmp / tensor_file)
        record = {"state": state, "tensors": tensor_file, "shards": self.shards, "weight_map": self.weight_map}
        tmp_json = self.tmp / (self.PROGRESS + ".tmp")
        tmp_json.write_text(json.dumps(record))
        os.replace(tmp_json, self.tmp / self.PROGRESS)
        for old in self.tmp.glob("progress-*.safetensors"):
            if old.name != tensor_file:
                old.unlink()

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A side file of the partial folder (e.g. the rotation plan), removed at commit."""
        _save(tensors, self.tmp / name)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.tmp / name
        return load_file(str(path)) if path.is_file() else None

    def load_progress(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The last recorded state (and restore the shard list), or None to start fresh."""
        path = self.tmp / self.PROGRESS
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        tensors = self.load_tensors(record["tensors"])
        if tensors is None:
            return None
        self.shards = list(record["shards"])
        self.weight_map = dict(record["weight_map"])
        for f in self.tmp.glob("shard-*.safetensors"):  # shards written after the last record
            if f.name not in self.shards:
                f.unlink()
        return record["state"], tensors

    def write_shard(self, tensors: dict[str, torch.Tensor]) -> str:
        """Write one shard (named by position; renamed to ``-of-N`` form at commit)."""
        name = f"shard-{len(self.shards):05d}.safetensors"
        _save(tensors, self.tmp / name)
        self.shards.append(name)
        for k in tensors:
            self.weight_map[k] = name
        return name

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A tensor written so far, in its stored dtype."""
        if name not in self.weight_map:
            raise KeyError(name)
        with safe_open(str(self.tmp / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def replace_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rewrite written tensors with new values (same names), one shard at a time, each atomically."""
        unknown = set(tensors) - set(self.weight_map)
        if unknown:
            raise KeyError(f"not written: {sorted(unknown)}")
        for shard in sorted({self.weight_map[k] for k in tensors}):
            content = load_file(str(self.tmp / shard))
            content.update({k: v for k, v in tensors.items() if self.weight_map[k] == shard})
            _save(content, self.tmp / f"{shard}.tmp")
            os.replace(self.tmp / f"{shard}.tmp", self.tmp / shard)

    def commit(self, config: dict[str, Any], source_dir: Path, extra_files: dict[str, str]) -> Path:
        """Finalise names, write index/config/tokenizer/extra files, then rename into place."""
        n = len(self.shards)
        final = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(self.shards)}
        for old, new in final.items():
            (self.tmp / old).rename(self.tmp / new)
            self.shard_sha256[new] = sha256_file(self.tmp / new)
        index = {
            "metadata": {"total_size": sum((self.tmp / f).stat().st_size for f in final.values()),
                         "sha256": self.shard_sha256},
            "weight_map": {k: final[v] for k, v in sorted(self.weight_map.items())},
        }
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (self.tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for fname in TOKENIZER_FILES:
            if (source_dir / fname).is_file():
                shutil.copy2(source_dir / fname, self.tmp / fname)
        for fname, content in extra_files.items():  # text, or bytes (e.g. a PNG plot)
            if isinstance(content, bytes):
                (self.tmp / fname).write_bytes(content)
            else:
                (self.tmp / fname).write_text(content)
        for f in [*self.tmp.glob("progress*"), *self.tmp.glob("plan*.safetensors")]:
            f.unlink()
        if self.out_dir.exists():  # --overwrite
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial folder, unless an interruption should stay resumable."""
        if not self.keep_partial:
            shutil.rmtree(self.tmp, ignore_errors=True)
