"""Seconds per scale-tuning step with the Hadamards as butterflies vs as BLAS products, in one run.

    python benchmarks/scale_tuning_step.py CONVERTED_CKPT --calib-text TEXT [--steps 4] [--json OUT]

A step is what ``convert.scale_tuning`` repeats: the served model simulated with trainable scales
(``_TrainableModel.top_logits`` on ``BATCH`` calibration sequences) forward, KL-Top against fixed
targets, backward. The targets are the model's own distribution over 32 random token ids at the
start, so no source model is needed; the time does not depend on them. The first step of each
mode warms up and is not counted; the modes alternate (butterflies, matmul, butterflies, ...) so
that a change in machine speed hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from convert import scale_tuning
from convert.calibration import calibration_batches
from convert.distill import kl_top_gathered
from convert.evaluate import LoadedModel
from vllm_ruquant import reference as ref

MODES = {"butterflies": contextlib.nullcontext, "matmul": ref.hadamard_as_matmul}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path, help="a ruquant checkpoint (ruquant-convert output)")
    ap.add_argument("--calib-text", type=Path, required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up each)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    loaded = LoadedModel.open(args.ckpt)
    names = list(loaded.reader.keys())
    model = scale_tuning._TrainableModel(lambda n: loaded.reader.get(n, None), loaded.reader.__contains__,
                                         loaded.dims, loaded.fmt, scale_tuning.quantized_prefixes(names),
                                         args.seq_len, torch.device("cpu"))
    tokens = calibration_batches(args.ckpt, args.calib_text, scale_tuning.BATCH, args.seq_len)
    sigma = {p: torch.zeros_like(s, requires_grad=True) for p, s in model.scales.items()}
    target_idx = torch.randint(loaded.dims.vocab_size, (*tokens.shape, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target_logp = model.top_logits(tokens, target_idx, sigma).log_softmax(-1)

    def step() -> float:
        t0 = time.perf_counter()
        kl_top_gathered(target_logp, model.top_logits(tokens, target_idx, sigma)).backward()
        return time.perf_counter() - t0

    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for ctx in MODES.values():  # warm-up
        with ctx():
            step()
    for _ in range(args.steps):
        for m, ctx in MODES.items():
            with ctx():
                seconds[m].append(step())
    median = {m: statistics.median(s) for m, s in seconds.items()}
    result = {"ckpt": str(args.ckpt), "batch": scale_tuning.BATCH, "seq_len": args.seq_len,
              "threads": torch.get_num_threads(), "seconds": seconds, "median_s": median,
              "matmul_over_butterflies": median["matmul"] / median["butterflies"]}
    for m in MODES:
        print(f"{m:12s} {median[m]:.2f} s a step (median of {args.steps})")
    print(f"matmul / butterflies: {result['matmul_over_butterflies']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
