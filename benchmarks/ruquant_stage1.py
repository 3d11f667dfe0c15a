"""Time RUQuant stage 1 on a model shape with random weights (issue 8: 8B stage 1 < 2 min on one H100).

    python benchmarks/ruquant_stage1.py [--shape llama3-8b] [--layers N] [--device cuda] [--tokens 2048]

Builds the converter's ``RotationContext`` from seeded random layer tensors (made on the
device one layer at a time, as the converter streams them from disk) and random layer-input
states with a few outlier channels, then runs ``RUQuantStage1.plan`` -- the same code a
conversion runs -- and prints where the time goes (site inputs, R1 blocks, R4 blocks).
Disk reads and the GPTQ pass are not included: they are the converter's, not stage 1's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from convert.rotations.base import RotationContext
from convert.rotations.ruquant import RUQuantStage1
from convert.tiny_models import SHAPES, llama_config
from vllm_ruquant.checkpoint.format import scheme_format
from vllm_ruquant.checkpoint.models import model_dims


def random_context(shape: str, layers: int | None, tokens: int, seq_len: int, device: torch.device,
                   seed: int = 0) -> RotationContext:
    """A RotationContext over seeded random weights of ``shape`` (``layers`` overrides the depth)."""
    cfg = llama_config(SHAPES[shape])
    if layers:
        cfg["num_hidden_layers"] = layers
    dims = model_dims(cfg)
    d = dims.hidden_size

    def layer_tensors(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(seed * 1000 + i)
        sd = {}
        for prefix in dims.linear_prefixes(i):
            out_f, in_f = dims.linear_shape(prefix.rsplit(".", 1)[1])
            sd[f"{prefix}.weight"] = torch.randn(out_f, in_f, device=device, generator=g) / in_f**0.5
        return sd

    def layer_states() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        n_seq = max(1, tokens // seq_len)
        states = []
        for _ in range(dims.num_layers):
            h = torch.randn(n_seq, seq_len, d, generator=g)
            h[..., torch.randperm(d, generator=g)[:8]] *= 20.0  # residual outlier channels, as real models have
            states.append(h)
        return states

    return RotationContext(dims=dims, generator=torch.Generator().manual_seed(seed), device=device,
                           layer_states=layer_states, layer_tensors=layer_tensors, fmt=scheme_format("w4a4"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (the converter's default)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    ctx = random_context(args.shape, args.layers, args.tokens, args.seq_len, dev)
    t0 = time.perf_counter()
    plan = RUQuantStage1().plan(ctx)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    s1 = plan.report["stage1"]
    row = {"shape": args.shape, "layers": ctx.dims.num_layers, "device": str(dev),
           "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
           "total_s": round(total, 2), **{k: round(v, 2) for k, v in s1["timings"].items()},
           "r1_choice": s1["r1"]["choice"], "down_proj_kind": s1["down_proj"]["kind"]}
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
