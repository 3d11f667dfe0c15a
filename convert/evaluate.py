"""Perplexity of a model directory, full precision or simulated-quantized (reference ops).

A ruquant checkpoint is evaluated through ``convert.simulate`` -- the very ops the plugin
serves with on the CPU -- so this number is what vLLM should reproduce. A plain HF
checkpoint is evaluated in full precision. Windows slide over the text with a stride;
only the tokens new to each window are scored, each with at least ``seq_len - stride``
tokens of context.

    ruquant-eval MODEL_DIR [--text FILE] [--seq-len 512] [--stride 256] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from convert import calibration
from convert.errors import ConvertError, ExitCode
from convert.model_io import CheckpointReader, read_config
from convert.modeling import decoder_layer, lm_logits, rope_tables
from convert.simulate import checkpoint_linear, kv_cache_quantizer
from vllm_ruquant.checkpoint import format as fmt_mod
from vllm_ruquant.checkpoint.errors import RUQuantError
from vllm_ruquant.checkpoint.models import ModelDims, model_dims


@dataclass
class LoadedModel:
    """A model directory opened for evaluation: dims, tensor access, format (if ruquant)."""

    dims: ModelDims
    reader: CheckpointReader
    fmt: fmt_mod.RUQuantFormat | None

    @classmethod
    def open(cls, model_dir: Path) -> LoadedModel:
        cfg = read_config(model_dir)
        qcfg = cfg.get("quantization_config")
        dims = model_dims(cfg)
        fmt = fmt_mod.parse_format(qcfg) if qcfg else None
        return cls(dims, CheckpointReader(model_dir), fmt)


class Evaluator:
    """Runs the whole model on token windows with cached tensors (fits small models)."""

    def __init__(self, model: LoadedModel, device: torch.device, kv_bits: int | None = None,
                 kv_online_rotation: bool = True) -> None:
        self.model = model
        self.device = device
        self._cache: dict[str, torch.Tensor] = {}
        fmt = model.fmt
        self.linear = checkpoint_linear(fmt, self.get, self.has)
        kv = fmt.kv_cache if fmt else fmt_mod.KVCacheSpec()
        if kv_bits is not None:
            kv = dataclasses.replace(kv, bits=kv_bits)
        self.kv_quant = kv_cache_quantizer(kv, online_rotation=kv_online_rotation)

    def has(self, name: str) -> bool:
        return name in self.model.reader

    def get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            dtype = None if name.endswith(fmt_mod.QWEIGHT) else torch.float32
            self._cache[name] = self.model.reader.get(name, dtype).to(self.device)
        return self._cache[name]

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        dims = self.model.dims
        tokens = tokens.to(self.device)
        h = self.get("model.embed_tokens.weight")[tokens]
        rope = rope_tables(dims, tokens.shape[-1], self.device)
        for i in range(dims.num_layers):
            h = decoder_layer(h, i, dims, self.linear, self.get, rope, self.kv_quant)
        return lm_logits(h, dims, self.get)


def perplexity(ev: Evaluator, ids: torch.Tensor, seq_len: int, stride: int,
               progress: bool = True) -> dict[str, float]:
    """Sliding-window perplexity over a 1-D token tensor."""
    if ids.numel() < 2:
        raise ConvertError("evaluation text is too short (fewer than 2 tokens)")
    nll, count = 0.0, 0
    starts = list(range(0, max(ids.numel() - 1, 1), stride))
    t0 = time.perf_counter()
    for s in tqdm(starts, desc="perplexity", unit="win", disable=not progress):
        window = ids[s: s + seq_len + 1]
        if window.numel() < 2:
            break
        inp, tgt = window[:-1], window[1:]
        logits = ev.logits(inp.unsqueeze(0))[0].float().cpu()
        first_new = 0 if s == 0 else seq_len - stride  # score only tokens not scored before
        loss = F.cross_entropy(logits[first_new:], tgt[first_new:], reduction="sum")
        nll += float(loss)
        count += tgt.numel() - first_new
        if s + seq_len + 1 >= ids.numel():
            break
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / count), "tokens": count, "seconds": seconds,
            "tokens_per_second": count / seconds}


def evaluate_dir(model_dir: Path, text: Path | None, seq_len: int, stride: int, max_tokens: int | None,
                 device: str = "auto", tokenizer_dir: Path | None = None,
                 kv_bits: int | None = None, kv_online_rotation: bool = True) -> dict[str, float]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model = LoadedModel.open(model_dir)
    ids = calibration.token_stream(tokenizer_dir or model_dir, calibration.read_text(text))
    if max_tokens:
        ids = ids[:max_tokens]
    return perplexity(Evaluator(model, dev, kv_bits, kv_online_rotation), ids, seq_len, stride)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ruquant-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text file (default: CPython's pydoc topics)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--kv-bits", type=int, default=None, help="override the simulated KV-cache bits")
    ap.add_argument("--kv-no-rotation", action="store_true",
                    help="ablation: quantize the KV cache without its online Q/K (and V) rotation")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    try:
        if not 0 < args.stride <= args.seq_len:
            raise ConvertError("--stride must be in (0, --seq-len]")
        res = evaluate_dir(args.model_dir, args.text, args.seq_len, args.stride, args.max_tokens,
                           args.device, kv_bits=args.kv_bits, kv_online_rotation=not args.kv_no_rotation)
    except (RUQuantError, fmt_mod.FormatError) as e:
        print(f"ruquant-eval: error: {e}", file=sys.stderr)
        return int(getattr(e, "code", ExitCode.BAD_INPUT))
    print(json.dumps(res) if args.json else
          f"perplexity {res['perplexity']:.4f} over {res['tokens']} tokens "
          f"({res['tokens_per_second']:.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
