"""Peak host memory and time of one GPTQ call (act order) on a large linear, CPU.

    python benchmarks/gptq_memory.py [--n 4096 --k 14336] [--gptq-file OLD.py] --json OUT.json

Why: at a 70B down_proj (K = 28672) each fp64 K x K matrix of GPTQ's inverse-Hessian factorisation is
6.6 GB, and the converter's GPU peak (benchmarks/results/gpu-2026-12-04d/scale) came from how many of
them were alive at once. The same code runs on the CPU, so its working set can be measured here at a
smaller K: the rise of the process's peak RSS over the call. ``--gptq-file`` loads another version of
``convert/quantizers/gptq.py`` (e.g. ``git show REV:convert/quantizers/gptq.py > old.py``) for the A/B;
each run is one process, so the peaks do not mix. The checksum of the integers shows both versions
return the same weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import time
from pathlib import Path

import torch


def _gib(kib: int) -> float:
    return kib / 2**20  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="output channels")
    ap.add_argument("--k", type=int, default=14336, help="input features (Llama-3-8B down_proj)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the Hessian")
    ap.add_argument("--gptq-file", type=Path, help="another gptq.py to load instead of convert.quantizers.gptq")
    ap.add_argument("--json", type=Path, help="append the result to this JSON file")
    args = ap.parse_args(argv)
    if args.gptq_file:
        spec = importlib.util.spec_from_file_location("gptq_alt", args.gptq_file)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        from convert.quantizers import gptq as mod
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k)
    x = torch.randn(args.tokens, args.k) * (1 + torch.rand(args.k))
    h = (x.T @ x / args.tokens).float()
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    q, _ = mod.GPTQQuantizer(act_order=True).quantize(w, 4, -1, h)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"gptq": str(args.gptq_file or "convert/quantizers/gptq.py"), "n": args.n, "k": args.k,
           "tokens": args.tokens, "fp64_kxk_gib": args.k * args.k * 8 / 2**30,
           "peak_rss_gib": _gib(peak), "rss_before_gib": _gib(before), "rise_gib": _gib(peak - before),
           "seconds": seconds, "checksum": int(q.sum()), "threads": torch.get_num_threads()}
    print(json.dumps(row))
    if args.json:
        rows = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(rows + [row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
