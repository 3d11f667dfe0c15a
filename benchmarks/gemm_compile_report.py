"""Compile the prefill GEMM (``kernels/gemm.py``) for sm_90 on a machine without a GPU: does its wgmma overlap?

    python benchmarks/gemm_compile_report.py     # the "large" configs of gemm._CONFIGS, then the probe

Issue 23: at M >= 2048 our W4A8-kernel GEMM runs 1.3-1.9x above the int8 tensor-core floor while
``torch._scaled_mm`` on fp8 is near its own. Per config this prints, from Triton's final TTGIR and the
SASS (this machine's Triton and its bundled ``cuobjdump``): the wgmma count, the ``pendings`` of every
``warp_group_dot_wait`` (0: each wgmma is waited for before the next instruction, so unpacking, shared
memory loads and the tensor cores take turns; 1: the next iteration's work overlaps the running
wgmma), the cp.async stages, shared-memory stores of the weights (``STS``) and registers.

The probe compiles a plain K loop ``acc += dot(a, b^T)`` four ways, isolating what decides the wait: both
operands straight from memory as fp16, as fp8 e4m3, as int8, and as int8 converted to fp8 in registers.
Measured with Triton 3.6.0 (the GPU machines') and 3.9.0 alike, 2026-12-04: fp16 and fp8 get
``pendings = 1`` inside the loop, int8 and register-converted operands get 0. So in Triton an integer
wgmma never overlaps, whatever the tiles; an fp8 one does only when both operands come from shared
memory unchanged. Runs with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import re

try:  # run as a script, or imported with benchmarks/ on sys.path
    import sm90_build
except ModuleNotFoundError:  # imported as benchmarks.gemm_compile_report from the repository root
    from benchmarks import sm90_build

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vllm_ruquant.kernels import gemm  # noqa: E402

DIVISIBLE_BY_16 = ("a_ptr", "b_ptr", "as_ptr", "bs_ptr", "bias_ptr", "c_ptr", "ws_ptr", "cnt_ptr", "N", "K",
                   "stride_am", "stride_bn", "stride_cm")


def _compile(fn, pointers: dict[str, str], const: dict, num_warps: int, num_stages: int):  # noqa: ANN001, ANN202
    return sm90_build.build(fn, const, pointers, DIVISIBLE_BY_16, ("clip",), num_warps=num_warps,
                            num_stages=num_stages)


def waits(ttgir: str) -> list[int]:
    """``pendings`` of every ``warp_group_dot_wait`` in the TTGIR, in program order."""
    return [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*?pendings = (\d+)", ttgir)]


def report_config(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    const = dict(A_MODE=0, QMAX=7, B_MODE=2, CHUNK=128, GROUP=0, HAS_BIAS=False, USE_FP8=0, FP8_ACC=0, BM=kw["BM"],
                 BN=kw["BN"], BK=kw["BK"], SPLIT_K=kw["SPLIT_K"], GROUP_M=kw["GROUP_M"], SWAP=kw["SWAP"], ASM=1)
    pointers = {"a_ptr": "*i8", "b_ptr": "*u8", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16",
                "c_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"}
    kernel = _compile(gemm._qgemm_kernel, pointers, const, cfg.num_warps, cfg.num_stages)
    ttgir = kernel.asm["ttgir"]
    res, sass = sm90_build.cuobjdump(kernel)
    ops = sm90_build.opcodes(sass)
    return (f"BM {kw['BM']:3d} BN {kw['BN']:3d} BK {kw['BK']} SWAP {kw['SWAP']} warps {cfg.num_warps} stages "
            f"{cfg.num_stages}: wgmma waits {waits(ttgir)} | cp.async {ttgir.count('async_copy_global_to_local')} | "
            f"SASS GMMA {sum(v for o, v in ops.items() if 'GMMA' in o)} STS {ops['STS']} LDS {ops['LDS']} | "
            f"regs {sm90_build.resource(res, 'REG')}")


@triton.jit
def _probe_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INT_ACC: tl.constexpr, CONVERT: tl.constexpr):
    """``C = A @ B^T`` over K; ``CONVERT``: int8 operands turned into fp8 in registers before the dot;
    ``INT_ACC``: an int32 accumulator (int8 operands as they are)."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)) % M
    rn = (tl.program_id(1) * BN + tl.arange(0, BN)) % N
    k = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * stride_am + k[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + k[None, :]
    if INT_ACC:
        acc = tl.zeros((BM, BN), tl.int32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for _ in range(0, K // BK):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if CONVERT:
            a = a.to(tl.float16).to(tl.float8e4nv)
            b = b.to(tl.float16).to(tl.float8e4nv)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=acc.dtype)
        a_ptrs += BK
        b_ptrs += BK
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.float32))


def probe() -> list[str]:
    lines = []
    for name, dtype, convert in [("fp16 from memory", "*fp16", 0), ("fp8 e4m3 from memory", "*fp8e4nv", 0),
                                 ("int8 from memory", "*i8", 0), ("int8 -> fp8 in registers", "*i8", 1)]:
        int_acc = int(dtype == "*i8" and not convert)
        kernel = _compile(_probe_kernel, {"a_ptr": dtype, "b_ptr": dtype, "c_ptr": "*fp32"},
                          dict(BM=128, BN=128, BK=128, INT_ACC=int_acc, CONVERT=convert), 8, 4)
        lines.append(f"probe {name:26s}: wgmma waits {waits(kernel.asm['ttgir'])} (the first is inside the loop)")
    return lines


def main() -> int:
    print(f"triton {triton.__version__}, sm_90; W4A8-kernel GEMM (int8 activations, chunked int4 weights)")
    for cfg in gemm._CONFIGS["large"]:
        print(report_config(cfg), flush=True)
    for line in probe():
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
