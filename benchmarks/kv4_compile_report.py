"""Compile the int4-KV attention kernel for sm_90 on a machine without a GPU and report its resources.

GPU time is scarce; registers per thread and shared memory per CTA (which bound how many
CTAs an SM holds) and the instruction mix can be read from the cubin offline:

    python benchmarks/kv4_compile_report.py                 # the default decode (big / small batch) and prefill plans
    python benchmarks/kv4_compile_report.py --sweep         # decode shapes around them

Uses the Triton of this machine (3.9 on the CPU venv; the GPU machine runs 3.6, so codegen
can differ) and its bundled ``cuobjdump``. Runs with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import itertools

try:  # run as a script, or imported with benchmarks/ on sys.path
    import sm90_build
except ModuleNotFoundError:  # imported as benchmarks.kv4_compile_report from the repository root
    from benchmarks import sm90_build

from vllm_ruquant.kernels import int4_kv_attention as kv4

HEADS, KV_HEADS, D, PAGE = 32, 8, 128, 16
POINTERS = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*i32", "v_cache_ptr": "*i32",
            "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "block_table_ptr": "*i32", "seq_lens_ptr": "*i32",
            "cu_q_ptr": "*i32", "segm_acc_ptr": "*fp32", "segm_max_ptr": "*fp32", "segm_sum_ptr": "*fp32"}


# What Triton's JIT specializes on a real launch (ints and pointers divisible by 16) for vLLM's
# int4 layout at Llama-3-8B heads: slots are 34 words apart (not /16), heads 544, blocks 4352
DIVISIBLE_BY_16 = {*POINTERS, "stride_q_tok", "stride_q_head", "stride_o_tok", "stride_o_head",
                   "stride_kc_blk", "stride_kc_head", "stride_vc_blk", "stride_vc_head",
                   "stride_ks_blk", "stride_ks_head", "stride_vs_blk", "stride_vs_head"}


def report(lp: kv4.LaunchPlan, per_sequence: bool) -> str:
    fn = kv4._int4_kv_attention_kernel
    const = dict(NUM_Q_HEADS=HEADS, QPKV=HEADS // KV_HEADS, HEAD_DIM=D, PAGE=PAGE,
                 BLOCK_Q=lp.block_m * KV_HEADS // HEADS, BLOCK_M=lp.block_m, TILE_N=lp.tile_n,
                 NUM_SEGMENTS=lp.num_segments if per_sequence else 1,
                 FP32_DOTS=False, PRECISION=None, PER_SEQUENCE=per_sequence,
                 SKIP_Q_LEN_UPTO=0 if per_sequence else 4, CACHE_OFFSETS_INT32=True,
                 PREFETCH_KV=lp.prefetch_kv)
    k = sm90_build.build(fn, const, POINTERS, DIVISIBLE_BY_16, ("qk_scale_log2",), num_warps=lp.num_warps,
                         num_stages=lp.num_stages)
    regs = sm90_build.resource(sm90_build.cuobjdump(k)[0], "REG")
    ptx = k.asm["ptx"]
    per_sm = min(65536 // (int(regs) * 32 * lp.num_warps) if regs != "?" else 0,
                 233472 // max(k.metadata.shared, 1), 32)
    return (f"{'decode ' if per_sequence else 'prefill'} {lp}: regs {regs}, "
            f"shared {k.metadata.shared} B -> {per_sm} CTAs/SM ({per_sm * lp.num_warps} warps); "
            f"PTX cvt {ptx.count('cvt.')}, mma {ptx.count('mma.sync') + ptx.count('wgmma.mma_async')}, "
            f"cp.async {ptx.count('cp.async.c')}, bar.sync {ptx.count('bar.sync')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    qpkv = HEADS // KV_HEADS
    print(report(kv4.plan_launch(1, 512, KV_HEADS, qpkv).decode, True))  # big decode batches
    print(report(kv4.plan_launch(1, 8, KV_HEADS, qpkv).decode, True))  # small ones: split keys
    print(report(kv4.plan_launch(1024, 8, KV_HEADS, qpkv).prefill, False))
    if args.sweep:
        for m, n, w, st, pf in itertools.product((HEADS // KV_HEADS, 16), (16, 32, 64, 128), (1, 2, 4, 8), (1, 2),
                                                 (False, True)):
            if not (pf and st > 1):
                print(report(kv4.LaunchPlan(m, n, 1, w, st, prefetch_kv=pf), True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
