"""Kernel benchmark: ruquant Triton GEMMs and rotate+quantize against their baselines.

One command on a GPU machine (``python benchmarks/kernels.py [--out DIR] [--quick]``):
for each Llama-3-8B / 70B linear shape (K x N) and M in 1..16384 it times, in the same
run, cuBLAS bf16 (``torch.matmul``), ``torch._int_mm`` int8, ``torch._scaled_mm`` fp8
(rowwise scales), vLLM's fp8 ``cutlass_scaled_mm`` if vLLM imports, and ours (W4A4 GEMM on
int8 and on fp8 tensor cores, the full W4A4 linear with the activation quantization,
W4A8, W4A16). Then the rotate+quantize kernel's achieved bandwidth against a
device-to-device copy. Medians of ``triton.testing.do_bench`` (which flushes L2 between
runs, so weights come from device memory as in serving). Writes ``kernels.json`` and
``kernels.png`` under ``--out`` and prints the ratio table and the issue-9 targets last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import layout
from vllm_ruquant.kernels.dequant_gemm import w4a16_gemm
from vllm_ruquant.kernels.gemm import qgemm
from vllm_ruquant.kernels.rotate_quant import rotate_quant

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (8192, 10240), (8192, 57344),
          (28672, 8192)]
MS = [1, 16, 64, 256, 1024, 4096, 16384]
METHODS = ["bf16", "int_mm", "fp8_scaled_mm", "vllm_fp8", "w4a4", "w4a4_fp8", "w4a4_linear", "w4a8",
           "w4a16"]


def bench(fn, rep: int = 50) -> float:
    """Median milliseconds of ``fn`` (events; L2 flushed before each run)."""
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def _try(fn) -> tuple[float | None, str | None]:
    try:
        return bench(fn), None
    except Exception as e:  # a baseline or config that does not run here: record, go on
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def ceilings() -> dict:
    """Copy bandwidth (read + write) and bf16 / fp8 matmul rates measured now."""
    n = 1 << 28  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 2 / t / 1e6
    s = 8192
    a = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    tb = bench(lambda: a @ b)
    out = {"copy_GBps": copy_gbs, "bf16_8192_TFLOPs": 2 * s**3 / tb / 1e9}
    a8 = a.to(torch.float8_e4m3fn)
    b8 = b.to(torch.float8_e4m3fn).T
    one = torch.ones((), device="cuda")
    t8, err = _try(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16))
    out["fp8_8192_TFLOPs"] = 2 * s**3 / t8 / 1e9 if t8 else None
    ai = torch.randint(-8, 8, (s, s), device="cuda", dtype=torch.int8)
    bi = torch.randint(-8, 8, (s, s), device="cuda", dtype=torch.int8).T
    ti, err = _try(lambda: torch._int_mm(ai, bi))
    out["int8_8192_TOPs"] = 2 * s**3 / ti / 1e9 if ti else None
    return out


def _vllm_ops():
    try:
        from vllm import _custom_ops as ops  # noqa: PLC0415

        return ops
    except Exception:
        return None


def _timed(fns: list, graph: bool) -> float:
    """Median ms of one call: L2-flushed events, or (small M) a CUDA graph over ``fns``.

    At small M a Triton launch costs more CPU time than the kernel runs, and serving
    replays decode steps as CUDA graphs: so time graph replays, cycling over several weight
    copies (together larger than L2) so the weights still come from device memory.
    """
    if not graph:
        return bench(fns[0])
    for f in fns:
        f()  # compile / autotune outside the capture
    torch.cuda.synchronize()

    def run_all() -> None:
        for f in fns:
            f()

    return float(triton.testing.do_bench_cudagraph(run_all, rep=40, return_mode="median")) / len(fns)


def gemm_row(K: int, N: int, M: int, vops) -> dict:
    """Times (ms) of every method for one (M, K, N); None where a method does not run."""
    dev = "cuda"
    res: dict = {"K": K, "N": N, "M": M, "ms": {}, "err": {}, "graph": M <= 64}
    graph = M <= 64
    copies = max(1, min(16, math.ceil(256e6 / (N * K / 2)))) if graph else 1

    def put(name: str, make) -> None:
        try:
            res["ms"][name] = _timed([make(i) for i in range(copies)], graph)
        except Exception as e:  # a baseline or config that does not run here: record, go on
            res["ms"][name] = None
            res["err"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
    put("bf16", lambda i: (lambda: torch.matmul(x, w[i].T)))
    m_i = max(M, 32)  # _int_mm needs M > 16: pad (the padded rows cost little at small M)
    xi = torch.randint(-8, 8, (m_i, K), device=dev, dtype=torch.int8)
    wi = [t.to(torch.int8) for t in w]
    put("int_mm", lambda i: (lambda: torch._int_mm(xi, wi[i].T)))
    wi.clear()
    m_f = max(16, (M + 15) // 16 * 16)  # fp8 rowwise needs dims that are multiples of 16
    xf = torch.randn(m_f, K, device=dev).to(torch.float8_e4m3fn)
    wf = [t.to(torch.float8_e4m3fn) for t in w]
    sa = torch.rand(m_f, 1, device=dev) + 0.5
    sb = torch.rand(1, N, device=dev) + 0.5
    put("fp8_scaled_mm", lambda i: (lambda: torch._scaled_mm(xf, wf[i].T, sa, sb, out_dtype=torch.bfloat16)))
    if vops is not None:
        put("vllm_fp8", lambda i: (lambda: vops.cutlass_scaled_mm(xf, wf[i].T, sa, sb, torch.bfloat16)))
    wf.clear()
    w_q = [torch.randint(-8, 8, (N, K), device=dev, dtype=torch.int8) for _ in range(copies)]
    w_s = torch.rand(N, 1, device=dev) * 0.01 + 1e-3
    a_q = torch.randint(-8, 8, (M, K), device=dev, dtype=torch.int8)
    a_s = torch.rand(M, device=dev) + 0.5
    a_p = ref.pack_int4(a_q)
    w_p = [ref.pack_int4(t) for t in w_q]
    w_c = [layout.pack_chunked(t, 128) for t in w_q]
    w_q.clear()
    w.clear()
    put("w4a4", lambda i: (lambda: qgemm(a_p, a_s, w_p[i], w_s, a_mode=1, b_mode=1, K=K)))
    put("w4a4_fp8", lambda i: (lambda: qgemm(a_p, a_s, w_p[i], w_s, a_mode=1, b_mode=1, K=K, use_fp8=True)))

    def linear(i: int):
        def f() -> torch.Tensor:
            q, s = rotate_quant(x, 4)
            return qgemm(q, s, w_p[i], w_s, a_mode=1, b_mode=1, K=K)
        return f

    put("w4a4_linear", linear)
    a8 = torch.randint(-128, 128, (M, K), device=dev, dtype=torch.int8)
    put("w4a8", lambda i: (lambda: qgemm(a8, a_s, w_c[i], w_s, a_mode=0, b_mode=2, K=K)))
    put("w4a16", lambda i: (lambda: w4a16_gemm(x, w_c[i], w_s, K=K)))
    return res


def rq_rows(copy_gbs: float, ms: list[int]) -> list[dict]:
    """rotate+quantize bandwidth: bytes = bf16 in + int4 out + fp32 scale, over the copy's."""
    rows = []
    cases = [(4096, None), (4096, "hadamard"), (14336, None), (14336, "hadamard"), (28672, "hadamard"),
             (11008, "hadamard")]
    for M in ms:
        for K, kind in cases:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            rot = ref.OnlineRotation(kind, K) if kind else None
            t, e = _try(lambda x=x, rot=rot: rotate_quant(x, 4, 1.0, rot))
            nbytes = M * K * 2 + M * K // 2 + M * 4
            gbs = nbytes / t / 1e6 if t else None
            rows.append({"M": M, "K": K, "rotation": kind or "none", "ms": t, "GBps": gbs,
                         "frac_copy": gbs / copy_gbs if gbs else None, "err": e})
    return rows


def plot(results: list[dict], out: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except Exception:
        return
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    for ax, (K, N) in zip(axes.flat, SHAPES, strict=False):
        rows = [r for r in results if r["K"] == K and r["N"] == N]
        for meth in METHODS[1:]:
            xs, ys = [], []
            for r in rows:
                tb, tm = r["ms"].get("bf16"), r["ms"].get(meth)
                if tb and tm:
                    xs.append(r["M"])
                    ys.append(tb / tm)
            if xs:
                ax.plot(xs, ys, marker="o", label=meth)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={K} N={N}: speed-up over cuBLAS bf16")
        ax.set_xlabel("M")
    axes.flat[0].legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=80)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="three shapes, four M values")
    ap.add_argument("--ms", default="", help="comma-separated M values (default: all seven)")
    ap.add_argument("--rq-ms", default="16,4096,16384", help="M values of the rotate+quant rows")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds after which no new GEMM row starts (0: none); fits a lease")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "ceilings": ceilings()}
    print("ceilings:", json.dumps(info["ceilings"]), flush=True)
    vops = _vllm_ops()
    info["vllm"] = vops is not None
    shapes = SHAPES[:3] if args.quick else SHAPES
    ms = [1, 16, 1024, 4096] if args.quick else MS
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    results = []
    for K, N in shapes:
        for M in ms:
            if args.deadline and time.time() - t0 > args.deadline:
                print(f"deadline: skipping K={K} N={N} M={M}")
                continue
            try:
                r = gemm_row(K, N, M, vops)
            except Exception:
                traceback.print_exc()
                continue
            results.append(r)
            print(f"K={K} N={N} M={M}: " + " ".join(
                f"{k}={v * 1e3:.1f}us" if v else f"{k}=-" for k, v in r["ms"].items()), flush=True)
            torch.cuda.empty_cache()
    rq = rq_rows(info["ceilings"]["copy_GBps"], [int(v) for v in args.rq_ms.split(",")])
    info["elapsed_s"] = time.time() - t0
    (out / "kernels.json").write_text(json.dumps({"info": info, "gemm": results, "rotate_quant": rq},
                                                 indent=1))
    plot(results, out)
    errs = sorted({f"{k}: {v}" for r in results for k, v in r["err"].items()})
    for e in errs[:12]:
        print("not run:", e)
    print_table(info, results, rq)
    return 0


def print_table(info: dict, results: list[dict], rq: list[dict]) -> None:
    """Ratios t_bf16 / t_method (higher is faster), then the issue's targets."""
    cols = [m for m in METHODS[1:] if any(r["ms"].get(m) for r in results)]
    print(f"\n{info['device']}  ceilings: " + ", ".join(
        f"{k}={v:.0f}" for k, v in info["ceilings"].items() if v))
    print("speed-up over cuBLAS bf16 (t_bf16 / t); bf16 time in us")
    print(f"{'K':>6} {'N':>6} {'M':>6} {'bf16us':>8} " + " ".join(f"{c[:11]:>11}" for c in cols))
    for r in results:
        tb = r["ms"].get("bf16")
        cells = [f"{tb / r['ms'][c]:11.2f}" if tb and r["ms"].get(c) else f"{'-':>11}" for c in cols]
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>6} {tb * 1e3 if tb else math.nan:8.1f} " + " ".join(cells))

    def ratios(meth: str, pred) -> list[float]:
        return [r["ms"]["bf16"] / r["ms"][meth] for r in results
                if pred(r["M"]) and r["ms"].get("bf16") and r["ms"].get(meth)]

    print("\ntargets (issue 9), min / median over shapes:")
    for name, meth, pred, goal in [
        ("W4A4 GEMM M>=2048", "w4a4", lambda m: m >= 2048, 1.6),
        ("W4A4 GEMM fp8 M>=2048", "w4a4_fp8", lambda m: m >= 2048, 1.6),
        ("W4A4 GEMM M<=16", "w4a4", lambda m: m <= 16, 2.5),
        ("W4A4 linear M<=16", "w4a4_linear", lambda m: m <= 16, 2.5),
        ("W4A4 linear M>=2048", "w4a4_linear", lambda m: m >= 2048, 1.6),
        ("W4A8 GEMM M>=2048", "w4a8", lambda m: m >= 2048, 1.5),
    ]:
        v = ratios(meth, pred)
        if v:
            mn, md = min(v), sorted(v)[len(v) // 2]
            print(f"  {name:24s} >= {goal}: min {mn:.2f} median {md:.2f}  "
                  f"{'met' if mn >= goal else ('met at median' if md >= goal else 'NOT met')}")
    print("rotate+quant (int4 out) vs copy bandwidth, goal >= 0.70:")
    for r in rq:
        f = r["frac_copy"]
        print(f"  M={r['M']:>5} K={r['K']:>5} {r['rotation']:9s} "
              + (f"{r['GBps']:7.0f} GB/s = {f:.2f} of copy" if f else f"not run {r['err']}"))


if __name__ == "__main__":
    os.environ.setdefault("RUQUANT_AUTOTUNE", "1")
    sys.exit(main())
