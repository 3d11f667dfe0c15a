"""Compile the decode GEMV (``kernels/gemv.py``) for sm_90 on a machine without a GPU and report its resources.

    python benchmarks/gemv_compile_report.py            # default tiles, Llama-3-8B shapes, M = 1, 2, 4, 8
    python benchmarks/gemv_compile_report.py --sweep    # every tile of gemv.SWEEP at M = 1 and 4
    python benchmarks/gemv_compile_report.py --rotation # down_proj's decode rotation (_kron_rows_kernel)

Per build: registers and stack (spills) per thread, and the SASS of the weight loop (from the loop's
head to its block-counter atomic): instructions per weight word a thread streams, ``IDP`` (dp4a) and
``SHFL`` counts, and the static size of the prologue (in-kernel quantization for a_mode 2). Streaming
4.8 TB/s needs ~4.6 weight words a clock per H200 SM against an issue limit of 128 instructions.
Uses this machine's Triton and its bundled ``cuobjdump`` (the GPU machine runs 3.6: codegen may differ;
a side venv with ``triton==3.6.0`` reproduces it). Runs with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import collections
import re

try:  # run as a script, or imported with benchmarks/ on sys.path
    import sm90_build
except ModuleNotFoundError:  # imported as benchmarks.gemv_compile_report from the repository root
    from benchmarks import sm90_build

import triton  # noqa: E402

from vllm_ruquant.kernels import gemv  # noqa: E402
from vllm_ruquant.kernels import rotate_quant as rq  # noqa: E402

LAYER = {"qkv": (4096, 6144, 2), "o": (4096, 4096, 2), "gate_up": (4096, 28672, 2), "down": (14336, 4096, 0)}
POINTERS = {"a_ptr": "*i32", "b_ptr": "*i32", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": "*bf16",
            "c_ptr": "*bf16", "ws_ptr": "*i32", "wsf_ptr": "*fp32", "cnt_ptr": "*i32"}
DIVISIBLE_BY_16 = {*POINTERS, "N", "K", "stride_am", "stride_bn", "stride_cm"}  # as a real launch specializes


def _sass_loop(sass: str) -> tuple[int, int, collections.Counter]:
    """(prologue instructions, loop instructions to the counter atomic, opcode counts of that loop)."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    for addr, txt in ins:
        br = re.search(r"BRA 0x([0-9a-f]+)", txt)
        if not br or int(br.group(1), 16) >= addr:
            continue
        lo = int(br.group(1), 16)
        atoms = [a for a, t in ins if lo <= a <= addr and "ATOMG.E.ADD" in t]
        if atoms:
            body = [t for a, t in ins if lo <= a <= atoms[0]]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            return sum(1 for a, _ in ins if a < lo), len(body), ops
    return 0, 0, collections.Counter()


def report(cfg: gemv.GemvConfig, m: int, k: int, n: int, a_mode: int, group: int = 0) -> str:
    ls = gemv.launch_shape(cfg, m, n, k, group, 128 if a_mode != 1 else 8, a_mode=a_mode)
    fn = gemv._qgemv_kernel
    const = dict(gemv.kernel_constexprs(ls, a_mode, 1 if a_mode == 1 else 2, 128, group, 4, False), ASM=1)
    ptrs = dict(POINTERS, a_ptr="*bf16") if a_mode == 2 else POINTERS
    kernel = sm90_build.build(fn, const, ptrs, DIVISIBLE_BY_16, ("clip",), num_warps=cfg.num_warps, num_stages=1,
                              enable_fp_fusion=False)
    res, sass = sm90_build.cuobjdump(kernel)
    prologue, loop, ops = _sass_loop(sass)
    words = ls["BN"] * ls["BK"] / 8 / (32 * cfg.num_warps)  # weight words a thread streams per tile
    return (f"{cfg.short():30s} M={m} K={k} N={n} a_mode {a_mode}: BK {ls['BK']} LV {ls['LV']} split {ls['SPLIT_K']} "
            f"grid {ls['grid0']}x{ls['SPLIT_K']} | regs {sm90_build.resource(res, 'REG')} stack "
            f"{sm90_build.resource(res, 'STACK')} | loop {loop / words:.1f} instr/word (IDP {ops['IDP']}, SHFL "
            f"{ops['SHFL']}, {words:.0f} words) | prologue {prologue}")


def report_rotation(p: int, rb: int, warps: int, m: int = 28) -> str:
    """``_kron_rows_kernel`` (H_m (x) H_p, ``rb`` rows a program): barriers and shared-memory round trips
    of its butterflies, instructions in all."""
    fn = rq._kron_rows_kernel
    const = dict(HM=m, RB=rb, P=p, LOG_P=p.bit_length() - 1, NA=-(-m // rb))
    ptrs = {"x_ptr": "*bf16", "y_ptr": "*fp32", "amax_ptr": "*fp32", "h_ptr": "*fp32"}
    kernel = sm90_build.build(fn, const, ptrs, {*ptrs, "stride_xm", "stride_ym"}, ("sqrt_n",), num_warps=warps)
    ops = sm90_build.opcodes(sm90_build.cuobjdump(kernel)[1])
    chosen = " (rotate_rows' choice)" if warps == rq._kron_rows_warps(p) else ""
    return (f"kron rows m={m} P={p} RB={rb} warps {warps}{chosen}: {sum(ops.values())} instructions, BAR {ops['BAR']}, "
            f"STS {ops['STS']}, LDS {ops['LDS']}, SHFL {ops['SHFL']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="every tile of gemv.SWEEP at M = 1 and 4")
    ap.add_argument("--rotation", action="store_true", help="down_proj's decode rotation at 4 / 8 / 16 warps")
    args = ap.parse_args()
    print(f"triton {triton.__version__}")
    if args.rotation:
        for p, rb in ((512, 1), (512, 2), (1024, 1)):
            for warps in (4, 8, 16):
                print(report_rotation(p, rb, warps), flush=True)
        return 0
    if args.sweep:
        for cfg in gemv.SWEEP:
            for m in (1, 4):
                for k, n, a_mode in (LAYER["qkv"], LAYER["down"]):
                    print(report(cfg, m, k, n, a_mode), flush=True)
        return 0
    for m in (1, 2, 4, 8):
        for k, n, a_mode in LAYER.values():
            print(report(gemv.default_config(m, n, k, a_mode), m, k, n, a_mode), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
