"""The main job on a small default, end to end on a CPU: build -> convert -> evaluate -> serve.

No model hub is reachable here, so the "small default" is a tiny random-weight Llama built
locally (the text it generates is gibberish; the pipeline is real). With a real model::

    ruquant-convert /path/to/Llama-3-8B out-w4a4 --scheme w4a4
    vllm serve out-w4a4 --quantization ruquant

Run: ``.venv/bin/python examples/quickstart.py [--workdir runs/quickstart] [--scheme w4a4]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--scheme", default="w4a4")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from convert import cli
    from convert.evaluate import evaluate_dir
    from convert.tiny_models import make_tiny_llama

    src = args.workdir / "tiny-llama"
    out = args.workdir / f"tiny-llama-{args.scheme}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if not (src / "config.json").exists():
        make_tiny_llama(src, intermediate_size=344)  # 344 = 2*172: a non-power-of-two online Hadamard
    timings["build tiny model"] = time.perf_counter() - t

    t = time.perf_counter()
    rc = cli.main([str(src), str(out), "--scheme", args.scheme, "--overwrite",
                   "--calib-samples", "16", "--calib-seq-len", "128"])
    if rc:
        return rc
    timings["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    ppl_fp = evaluate_dir(src, None, 128, 128, 2048)["perplexity"]
    ppl_q = evaluate_dir(out, None, 128, 128, 2048)["perplexity"]
    timings["evaluate (2 x 2048 tokens)"] = time.perf_counter() - t

    t = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out), quantization="ruquant", enforce_eager=True, max_model_len=256,
              dtype="float32", seed=0)
    prompts = ["The quick brown fox", "Quantization maps floating point numbers"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    timings["vLLM start + generate"] = time.perf_counter() - t

    print("\n== vllm-ruquant quickstart ==")
    print(f"checkpoint: {out}")
    for p, o in zip(prompts, outs, strict=True):
        print(f"  {p!r} -> {o.outputs[0].text!r}")
    print(f"perplexity (random tiny model, pydoc text): fp32 {ppl_fp:.1f}   {args.scheme} simulated {ppl_q:.1f}")
    for k, v in timings.items():
        print(f"  {k:<28} {v:6.1f} s")
    print(f"serve it: vllm serve {out} --quantization ruquant   (on vllm-cpu: ruquant-vllm serve {out} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
