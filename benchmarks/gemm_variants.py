"""Time every GEMM variant and config on a few shapes, without autotuning (kernel work).

``python benchmarks/gemm_variants.py [--shapes M,K,N ...]``: for each shape, cuBLAS bf16
and each (variant, config) of ``vllm_ruquant.kernels.gemm`` / ``dequant_gemm``, with the
first error of a variant printed in full. What the notes file's per-version rows come from.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import torch
import triton

from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import dequant_gemm, gemm, layout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["4096,4096,4096", "16,4096,4096", "1,14336,4096"])
    ap.add_argument("--variants", default="w4a4,w4a4_i8act,w4a8,w8a8,w4a4_fp8,w4a4_fp8_imprecise,w4a16")
    args = ap.parse_args()
    torch.manual_seed(0)
    for shp in args.shapes:
        run_shape(*map(int, shp.split(",")), args.variants.split(","))
    return 0


def run_shape(M: int, K: int, N: int, variants: list[str]) -> None:
    """All variants and configs on one (M, K, N)."""
    if True:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        tb = triton.testing.do_bench(lambda: x @ w.T, warmup=10, rep=50, return_mode="median")
        print(f"\n== M={M} K={K} N={N}: bf16 {tb * 1e3:.1f} us ({2 * M * N * K / tb / 1e9:.0f} TFLOP/s)")
        w_q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
        a4 = torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8)
        a8 = torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8)
        a_s = torch.rand(M, device="cuda") + 0.5
        w_s = torch.rand(N, 1, device="cuda") * 0.01
        w_p, w_c, a_p = ref.pack_int4(w_q), layout.pack_chunked(w_q, 128), ref.pack_int4(a4)
        calls = {
            "w4a4": (a_p, w_p, dict(a_mode=1, b_mode=1)),
            "w4a4_i8act": (a4, w_c, dict(a_mode=0, b_mode=2)),
            "w4a8": (a8, w_c, dict(a_mode=0, b_mode=2)),
            "w8a8": (a8, w_q, dict(a_mode=0, b_mode=0)),
            "w4a4_fp8": (a_p, w_p, dict(a_mode=1, b_mode=1, use_fp8=True)),
            "w4a4_fp8_imprecise": (a_p, w_p, dict(a_mode=1, b_mode=1, use_fp8=True, fp8_acc=0)),
        }
        for name in variants:
            if name == "w4a16":
                cfgs = dequant_gemm.configs_for(M, K, -1)
                run = [(c, (lambda c=c: dequant_gemm.w4a16_gemm(x, w_c, w_s, K=K, config=c))) for c in cfgs]
            else:
                a, b, kw = calls[name]
                cfgs = gemm.configs_for(M, K, -1, kw["b_mode"])
                run = [(c, (lambda c=c, a=a, b=b, kw=kw: gemm.qgemm(a, a_s, b, w_s, K=K, config=c, **kw)))
                       for c in cfgs]
            shown = False
            for c, fn in run:
                try:
                    t = triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")
                    print(f"  {name:20s} {str(c.kwargs):90s} w{c.num_warps} s{c.num_stages}: "
                          f"{t * 1e3:8.1f} us  x{tb / t:5.2f} bf16")
                except Exception as e:
                    print(f"  {name:20s} {str(c.kwargs):90s}: FAILED {type(e).__name__}")
                    if not shown:
                        shown = True
                        print("".join(traceback.format_exception(e))[-2500:])


if __name__ == "__main__":
    sys.exit(main())
