"""Perplexity of a ruquant checkpoint served by vLLM vs the converter's simulation, same windows.

Both sides score the same non-overlapping token windows of a held-out text: vLLM through
``prompt_logprobs`` (the engine's own forward, our plugin's linear layers), the simulation
through ``convert.evaluate`` (the reference ops in plain torch). Agreement within 1% says
what the converter reports is what users get when they serve the checkpoint. This is the
in-process engine; ``served_perplexity_api.py`` does the same through ``vllm serve``'s
OpenAI endpoint (and splits the two sides across machines).

    python examples/served_vs_simulated.py CKPT --text heldout.txt [--tokens 4096] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from served_perplexity_api import heldout_windows, simulated_nll


def served_nll(ckpt: Path, windows: list[list[int]], dtype: str) -> tuple[list[float], float]:
    """Summed NLL of each window from vLLM's prompt logprobs."""
    from vllm import LLM, SamplingParams

    quantized = "quantization_config" in json.loads((ckpt / "config.json").read_text())
    llm = LLM(model=str(ckpt), quantization="ruquant" if quantized else None, dtype=dtype, enforce_eager=True,
              max_model_len=max(len(w) for w in windows) + 8, seed=0, enable_prefix_caching=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    nll = []
    for w, out in zip(windows, outs, strict=True):
        nll.append(-sum(lps[w[pos]].logprob for pos, lps in enumerate(out.prompt_logprobs)
                        if pos > 0 and lps is not None))
    return nll, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", help="float32 makes both sides compute in the same precision")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    windows = heldout_windows(args.ckpt, args.text, args.tokens, args.seq_len)

    t0 = time.perf_counter()
    sim_nll = simulated_nll(args.ckpt, windows)
    sim_s = time.perf_counter() - t0
    served_nll_, served_s = served_nll(args.ckpt, windows, args.dtype)
    count = len(windows) * (args.seq_len - 1)
    sim, served = math.exp(sum(sim_nll) / count), math.exp(sum(served_nll_) / count)
    rel = abs(served - sim) / sim
    # per-window served minus simulated mean NLL: float noise gives both signs, a wrong
    # computation one sign everywhere
    per_window = [(b - a) / (args.seq_len - 1) for a, b in zip(sim_nll, served_nll_, strict=True)]
    res = {"ckpt": str(args.ckpt), "windows": len(windows), "seq_len": args.seq_len,
           "simulated_ppl": sim, "served_ppl": served, "relative_difference": rel,
           "per_window_nll_difference": per_window, "simulated_s": sim_s, "served_s": served_s}
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0 if rel <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
