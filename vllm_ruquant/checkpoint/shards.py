"""The safetensors side of a checkpoint: shard headers, the shard index and its sha256 checksums.

Read from metadata alone: a shard's header (8-byte little-endian length + JSON) is parsed
here, never its tensor data, with the structural rules the safetensors loader enforces, so
that a truncated or damaged copy is named (shard, tensor) in milliseconds. The sha256 of each
shard is the one check that reads whole files; the converter records it in the index with
``sha256_file`` and the validator recomputes it with the same function.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_ruquant.checkpoint.errors import CheckpointError, ExitCode

INDEX_FILE = "model.safetensors.index.json"
# safetensors refuses headers above 100 MB; so do we, before reading one into memory.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# torch dtype names (as ``format.linear_tensor_shapes`` gives them) -> safetensors dtype names
TORCH_TO_ST = {"uint8": "U8", "int8": "I8", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FLOAT_DTYPES = ("F16", "BF16", "F32")
# (weight_map, sha256 by shard or None) of a checkpoint's index
Index = tuple[dict[str, str], dict[str, str] | None]


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (no data is read)."""

    dtype: str
    shape: tuple[int, ...]
    shard: str


def read_json(path: Path, what: str, corrupt_code: ExitCode) -> Any:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", ExitCode.MISSING) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}", ExitCode.MISSING) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} {path} is not UTF-8 text", corrupt_code) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}", corrupt_code) from None



def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor dtypes and shapes of one shard from its header alone, with the same structural
    rules the safetensors loader enforces (so what passes here also opens there): a known
    dtype, byte ranges that match shape x dtype size, no holes or overlaps, and a file
    exactly as long as the ranges say -- the last catches truncated copies without hashing.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"shard {name} is truncated: {size} bytes, shorter than the "
                                      "8-byte safetensors header length", ExitCode.CORRUPT)
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"shard {name} is corrupt or truncated: its header claims {n} bytes "
                                      f"but the file has {size - 8} after the length field", ExitCode.CORRUPT)
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"shard {name} is missing from {path.parent}", ExitCode.MISSING) from None
    except OSError as e:
        raise CheckpointError(f"cannot read shard {name}: {e.strerror or e}", ExitCode.MISSING) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"shard {name} has a corrupt safetensors header (not JSON: {e})",
                              ExitCode.CORRUPT) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {name} has a corrupt safetensors header (not a JSON object)",
                              ExitCode.CORRUPT)

    def bad(tensor: str, why: str) -> CheckpointError:
        return CheckpointError(f"shard {name}: tensor {tensor!r} has a corrupt header entry: {why}",
                               ExitCode.CORRUPT)

    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"shard {name}: __metadata__ must map names to strings", ExitCode.CORRUPT)
    tensors: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for tname, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(tname, "expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise bad(tname, f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise bad(tname, f"shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise bad(tname, f"data_offsets {offsets!r} is not a [begin, end] byte range")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(tname, f"shape {shape} of {dtype} needs {nbytes} bytes, the byte range holds "
                             f"{offsets[1] - offsets[0]}")
        tensors[tname] = TensorInfo(dtype, tuple(shape), name)
        ranges.append((offsets[0], offsets[1], tname))
    data_bytes = size - 8 - n
    pos = 0
    for begin, end, tname in sorted(ranges):
        if begin != pos:
            raise bad(tname, f"byte range starts at {begin}, expected {pos} (hole or overlap)")
        if end > data_bytes:
            raise CheckpointError(f"shard {name} is truncated: tensor {tname!r} ends at byte {end} of the "
                                  f"data but the file holds {data_bytes}", ExitCode.CORRUPT)
        pos = end
    if pos != data_bytes:
        raise CheckpointError(f"shard {name} is corrupt: {data_bytes - pos} bytes after the last tensor "
                              "(wrong header or appended data)", ExitCode.CORRUPT)
    return tensors



def read_index(ckpt: Path) -> Index | None:
    """``(weight_map, sha256 or None)`` from the index, or None when there is no index."""
    path = ckpt / INDEX_FILE
    if not path.is_file():
        return None
    index = read_json(path, "index", ExitCode.CORRUPT)
    if not isinstance(index, dict):
        raise CheckpointError(f"{INDEX_FILE} must be a JSON object", ExitCode.CORRUPT)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{INDEX_FILE} weight_map must map tensor names to shard file names",
                              ExitCode.CORRUPT)
    for tensor, shard in wm.items():
        # a shard must be a plain file of this directory (no "../", no absolute paths)
        if not shard or Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{INDEX_FILE} maps {tensor!r} to {shard!r}, which is not a file name "
                                  "in the checkpoint directory", ExitCode.CORRUPT)
    meta = index.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{INDEX_FILE} metadata must be an object", ExitCode.CORRUPT)
    sha = meta.get("sha256")
    if sha is not None:
        if not isinstance(sha, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64
                and all(c in "0123456789abcdef" for c in v.lower()) for k, v in sha.items()):
            raise CheckpointError(f"{INDEX_FILE} metadata.sha256 must map shard names to 64-digit hex "
                                  "sha256 digests", ExitCode.CORRUPT)
        shards = set(wm.values())
        for s in sorted(shards - set(sha)):
            raise CheckpointError(f"{INDEX_FILE} metadata.sha256 has no checksum for shard {s}",
                                  ExitCode.CORRUPT)
        for s in sorted(set(sha) - shards):
            raise CheckpointError(f"{INDEX_FILE} metadata.sha256 names shard {s}, which weight_map "
                                  "does not use", ExitCode.CORRUPT)
    return wm, sha


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed (hashlib releases the GIL, so shards hash in parallel)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shard_checksums(ckpt: Path, sha: dict[str, str]) -> int:
    """Hash every shard the index records (a few threads) and name the first mismatch."""
    shards = sorted(sha)
    workers = max(1, min(4, os.cpu_count() or 1, len(shards)))

    def one(s: str) -> str:
        try:
            return sha256_file(ckpt / s)
        except OSError as e:
            raise CheckpointError(f"cannot read shard {s} to verify its sha256: {e.strerror or e}",
                                  ExitCode.MISSING) from None

    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(one, shards))
    for s, got in zip(shards, digests, strict=True):
        if got != sha[s].lower():
            raise CheckpointError(
                f"shard {s} is corrupt: its sha256 {got[:16]}... differs from {sha[s][:16]}... recorded "
                f"by the converter in {INDEX_FILE} (re-copy the checkpoint, or re-convert)", ExitCode.CORRUPT)
    return len(shards)


def collect_tensors(ckpt: Path, index: Index | None,
                     require_weights: bool) -> tuple[dict[str, TensorInfo], list[str]] | None:
    """Every tensor of the checkpoint with its shard, checking the index against the shards.

    None when the directory holds no weights at all and ``require_weights`` is False (vLLM's
    ``--load-format dummy``, e.g. benchmarks/serving.py): then only the config is checked.
    """
    if index is not None:
        wm = index[0]
        shards = sorted(set(wm.values()))
        if not shards:
            raise CheckpointError(f"{INDEX_FILE} weight_map is empty", ExitCode.CORRUPT)
        for s in shards:
            if not (ckpt / s).is_file():
                t = next(k for k, v in wm.items() if v == s)
                raise CheckpointError(f"shard {s} named by {INDEX_FILE} (for {t!r}) is missing",
                                      ExitCode.MISSING)
    else:
        wm = None
        shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
        if not shards:
            if not require_weights:
                return None
            raise CheckpointError(f"{ckpt} holds no *.safetensors weights (ruquant checkpoints are safetensors)",
                                  ExitCode.MISSING)
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        for name, info in read_safetensors_header(ckpt / s).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is stored twice, in {tensors[name].shard} and {s}",
                                      ExitCode.CORRUPT)
            if wm is not None and wm.get(name) != s:
                where = f"in {wm[name]}" if name in wm else "nowhere"
                raise CheckpointError(f"shard {s} holds tensor {name!r}, which {INDEX_FILE} places {where}",
                                      ExitCode.CORRUPT)
            tensors[name] = info
    if wm is not None:
        for name, s in sorted(wm.items()):
            if name not in tensors:
                raise CheckpointError(f"tensor {name!r} is missing from shard {s} ({INDEX_FILE} says it is there)",
                                      ExitCode.CORRUPT)
    return tensors, shards
