"""Milliseconds per ``reference.int_linear`` call on the CPU, for SmolLM2-135M's linear shapes.

    python benchmarks/int_linear_cpu.py [--rows 512] [--repeats 7] [--json OUT]

``int_linear`` is the integer half of every simulated quantized linear (``ruquant-eval``, the
served-vs-simulated tests, the GBS search), so its CPU speed is most of an evaluation's time. Each
shape runs per output channel and in groups of 64, on int4 activations (W4A4) and int8 ones (W4A8),
one thread; the median of ``--repeats`` timed calls after one warm-up. The commit is recorded, so
two runs (before / after a change, e.g. from a ``git worktree``) can be compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from vllm_ruquant import reference as ref

# (name, input K, output N) of SmolLM2-135M's linears (hidden 576, 9 + 2 x 3 heads of 64, intermediate 1536)
SHAPES = (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))


def time_int_linear(m: int, k: int, n: int, group: int, act_bits: int, repeats: int) -> float:
    """Median milliseconds of one ``int_linear`` of ``m`` tokens, ``k`` inputs, ``n`` outputs."""
    gen = torch.Generator().manual_seed(0)
    hi = 1 << (act_bits - 1)
    a = torch.randint(-hi, hi, (m, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    w_s = torch.rand(n, 1 if group == -1 else k // group, generator=gen)
    a_s = torch.rand(m, generator=gen)
    ref.int_linear(a, a_s, w, w_s, group)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ref.int_linear(a, a_s, w, w_s, group)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512, help="tokens per call (ruquant-eval's --seq-len is 512)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(ref.__file__).parent).stdout.strip()
    rows = []
    for name, k, n in SHAPES:
        for group in (-1, 64):
            for act_bits in (4, 8):
                ms = time_int_linear(args.rows, k, n, group, act_bits, args.repeats)
                rows.append({"linear": name, "k": k, "n": n, "group": group, "act_bits": act_bits, "ms": round(ms, 2)})
                print(f"{name:8s} {k:5d} x {n:5d} group {group:3d} a{act_bits}: {ms:7.2f} ms", flush=True)
    total = {f"g{g}_a{b}": round(sum(r["ms"] for r in rows if r["group"] == g and r["act_bits"] == b), 2)
             for g in (-1, 64) for b in (4, 8)}
    print("sum over the four linears (ms):", total)
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "rows_per_call": args.rows, "threads": 1,
                                         "linears": rows, "sum_ms": total}, indent=1) + "\n")


if __name__ == "__main__":
    main()
