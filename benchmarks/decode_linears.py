"""Decode-size linears of one Llama-3-8B layer: ours against cuBLAS bf16, vLLM fp8 and vLLM's Marlin.

    python benchmarks/decode_linears.py [--out DIR] [--ms 1,16] [--only gemm,gemv,...] [--gemv-sweep]

For each linear of a decoder layer (qkv 4096x6144, o 4096x4096, gate_up 4096x28672, down
14336x4096 with its online Hadamard) and each decode batch M, times one call, replayed from a
CUDA graph over weight copies larger than L2 (``kernels._timed``, as a served decode step
replays its graph with the weights in device memory):

* ``stream``: the floor, a kernel that only reads the layer's 4-bit weight bytes once (XOR-reduced);
* ``bf16``: cuBLAS ``x @ W^T``; ``vllm_fp8``: vLLM's ``cutlass_scaled_mm`` (GEMM only);
* ``rq``: our rotate+quantize alone, int8 out (``rq_one``: down_proj's Kronecker rotation one program per
  token instead of ``rotate_rows`` + quantization; ``rq_rb{1,2,4}``: rows per ``rotate_rows`` program);
  ``gemm``: our W4A4 GEMM alone (int8-held int4 activations,
  chunked int4 weights); ``linear``: both, through ``TritonBackend.apply`` (what a layer runs: at decode sizes an
  un-rotated layer quantizes inside the GEMM); ``linear_unfused``: rotate_quant, then the GEMM;
* ``gemv``: the CUDA-core decode GEMV (``kernels/gemv.py``) on the ``gemm`` row's operands (its default
  tile); ``linear_gemv``: ``TritonBackend.apply`` with ``RUQUANT_GEMV=1`` (the GEMV up to
  ``GEMV_MAX_M`` tokens, else the same as ``linear``);
* ``marlin_w4a16``: vLLM's Marlin on bf16 activations; ``marlin_w4a8``: Marlin on int8
  activations with per-token scales (``is_a_8bit``), the candidate to feed our 4-bit integers.

``--sweep`` instead times our GEMM over a grid of small-M tile configs (tile N, tile K,
split-K, pipeline stages) on the same shapes, and prints the best per shape: the data behind
``gemm._CONFIGS["small"]``. ``--gemv-sweep`` times the GEMV's tiles (``gemv.SWEEP``, 19) on the same
shapes at M = 1 and 4 (``--gemv-ms``), with the activations each layer gives it (float, quantized in the
kernel, for the un-rotated ones; int8 from rotate_quant for down_proj), and prints the best tile per
shape, the default tile and qgemm on the same inputs, and the bandwidth reached (4-bit weight bytes and
scales over the time); writes ``gemv_sweep.json``. ``--only`` keeps the run short (a scarce GPU):

    python benchmarks/decode_linears.py --only gemm,gemv,linear,linear_gemv --ms 1,2,4,8,16 --gemv-sweep

Marlin's Python API moved between vLLM releases; each call is adapted to the installed
signatures, and a method that does not run records its error instead of a time. Prints a
table (microseconds, and the layer's sum) and writes ``decode_linears.json``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
from pathlib import Path

import torch
import triton
import triton.language as tl
from kernels import _timed  # the sibling script's CUDA-graph timer (benchmarks/kernels.py)

from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import TritonBackend, layout
from vllm_ruquant.kernels import backend as backend_mod
from vllm_ruquant.kernels import gemv as gemv_mod
from vllm_ruquant.kernels import rotate_quant as rq_mod
from vllm_ruquant.kernels.gemm import qgemm
from vllm_ruquant.kernels.rotate_quant import rotate_quant
from vllm_ruquant.linear_backend import LinearSpec

LAYER = {"qkv": (4096, 6144, False), "o": (4096, 4096, False), "gate_up": (4096, 28672, False),
         "down": (14336, 4096, True)}
METHODS = ["stream", "bf16", "vllm_fp8", "rq", "rq_one", "rq_rb1", "rq_rb2", "rq_rb4", "gemm", "gemv",
           "linear", "linear_gemv", "linear_unfused", "marlin_w4a16", "marlin_w4a8"]


@triton.jit
def _stream_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """XOR of ``UNROLL`` blocks of ``BLOCK`` int32 words: reads the bytes and nothing else."""
    base = tl.program_id(0).to(tl.int64) * (BLOCK * UNROLL)
    acc = tl.zeros((BLOCK,), tl.int32)
    for u in tl.static_range(UNROLL):
        idx = base + u * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + idx, mask=idx < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def stream(w: torch.Tensor, out: torch.Tensor, block: int = 2048, unroll: int = 8) -> torch.Tensor:
    """The floor of a decode linear: one launch that reads its 4-bit weight bytes once (``stream``)."""
    words = w.view(torch.int32).view(-1)
    grid = (triton.cdiv(words.numel(), block * unroll),)
    _stream_kernel[grid](words, out, words.numel(), BLOCK=block, UNROLL=unroll, num_warps=8)
    return out


def _call(fn, **candidates):
    """``fn`` with the candidates its signature names (vLLM's Marlin API differs by release)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in candidates.items() if k in params})


class Marlin:
    """Random int4 weights in Marlin's layout, for bf16 or int8 activations (vLLM's helpers)."""

    def __init__(self, k: int, n: int, a_8bit: bool) -> None:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.scalar_type import scalar_types

        self.mu, self.k, self.n, self.a_8bit = mu, k, n, a_8bit
        self.wtype = scalar_types.uint4b8
        packed = torch.randint(0, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        self.w = _call(ops.gptq_marlin_repack, b_q_weight=packed, perm=torch.empty(0, dtype=torch.int, device="cuda"),
                       size_k=k, size_n=n, num_bits=4, is_a_8bit=a_8bit)
        s = (torch.rand(1, n, device="cuda") * 0.01 + 1e-3).to(torch.bfloat16)
        self.s = _call(mu.marlin_permute_scales, s=s, size_k=k, size_n=n, group_size=-1, is_a_8bit=a_8bit)
        self.empty = torch.empty(0, dtype=torch.int, device="cuda")
        self.workspace = mu.marlin_make_workspace_new(torch.device("cuda"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _call(self.mu.apply_gptq_marlin_linear, input=x, weight=self.w, weight_scale=self.s,
                     weight_zp=self.empty, g_idx=self.empty, g_idx_sort_indices=self.empty,
                     workspace=self.workspace, wtype=self.wtype, output_size_per_partition=self.n,
                     input_size_per_partition=self.k, is_k_full=True, bias=None,
                     input_global_scale=torch.ones(1, device="cuda") if self.a_8bit else None,
                     input_dtype=torch.int8 if self.a_8bit else None)


def row(name: str, k: int, n: int, rotated: bool, m: int, only: set[str] | None = None) -> dict:
    res: dict = {"linear": name, "K": k, "N": n, "M": m, "us": {}, "err": {}}
    copies = max(1, min(16, math.ceil(256e6 / (n * k / 2))))

    def want(*methods: str) -> bool:
        return only is None or any(meth in only for meth in methods)

    def put(method: str, make) -> None:
        if not want(method):
            return
        try:
            res["us"][method] = 1000 * _timed([make(i) for i in range(copies)], graph=True)
        except Exception as e:  # a method that does not run here: record, go on
            res["us"][method] = None
            res["err"][method] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if want("bf16", "vllm_fp8"):
        w = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        put("bf16", lambda i: (lambda: x @ w[i].T))
        try:
            from vllm import _custom_ops as ops

            m_f = max(16, (m + 15) // 16 * 16)
            xf = torch.randn(m_f, k, device="cuda").to(torch.float8_e4m3fn)
            wf = [t.to(torch.float8_e4m3fn) for t in w]
            sa, sb = torch.rand(m_f, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
            put("vllm_fp8", lambda i: (lambda: ops.cutlass_scaled_mm(xf, wf[i].T, sa, sb, torch.bfloat16)))
            wf.clear()
        except Exception as e:  # noqa: BLE001
            res["err"]["vllm_fp8"] = f"{type(e).__name__}: {e}"
        w.clear()
    rot = ref.OnlineRotation("hadamard", k) if rotated else None
    put("rq", lambda i: (lambda: rotate_quant(x, 4, 1.0, rot, pack=False)))
    if rotated:
        def rq_with(**settings):
            def f() -> None:  # rotate_quant settings changed around the call (captured as it runs)
                saved = {attr: getattr(rq_mod, attr) for attr in settings}
                for attr, value in settings.items():
                    setattr(rq_mod, attr, value)
                try:
                    rotate_quant(x, 4, 1.0, rot, pack=False)
                finally:
                    for attr, value in saved.items():
                        setattr(rq_mod, attr, value)
            return f

        # down_proj's Kronecker rotation one program per token (before 2026-12-04b), for the A/B
        put("rq_one", lambda i: rq_with(KRON_ROWS_MAX_M=0))
        for rb in (1, 2, 4):  # rows of H_m^T X per program in rotate_rows
            put(f"rq_rb{rb}", lambda i, rb=rb: rq_with(KRON_ROWS_PER_PROGRAM=rb))
    w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    w_s = torch.rand(n, 1) * 0.01 + 1e-3
    ws = w_s.cuda()
    a_q = torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8)
    a_s = torch.rand(m, device="cuda") + 0.5
    if want("gemm", "gemv", "stream"):
        w_c = [layout.pack_chunked(w_q, 128) for _ in range(copies)]
        sink = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
        put("stream", lambda i: (lambda: stream(w_c[i], sink)))
        put("gemm", lambda i: (lambda: qgemm(a_q, a_s, w_c[i], ws, a_mode=0, b_mode=2, K=k)))
        if m <= gemv_mod.MAX_ROWS:
            put("gemv", lambda i: (lambda: gemv_mod.qgemv(a_q, a_s, w_c[i], ws, a_mode=0, b_mode=2, K=k)))
        w_c.clear()
    if want("linear", "linear_gemv", "linear_unfused"):
        backend = TritonBackend()
        spec = LinearSpec(k, n, 4, -1, 4, rotation=rot)
        prepared = [backend.prepare(spec, ref.pack_int4(w_q), ws) for _ in range(copies)]
        put("linear", lambda i: (lambda: backend.apply(spec, prepared[i], x, None)))

        def with_setting(i: int, attr: str, value):
            def f() -> None:  # one backend setting changed around the call (captured as it runs)
                saved = getattr(backend_mod, attr)
                setattr(backend_mod, attr, value)
                try:
                    backend.apply(spec, prepared[i], x, None)
                finally:
                    setattr(backend_mod, attr, saved)
            return f

        put("linear_gemv", lambda i: with_setting(i, "GEMV", True))
        # the pre-2026-12-04 path: rotate_quant launch, then the GEMM
        put("linear_unfused", lambda i: with_setting(i, "FUSED_QUANT_MAX_M", 0))
        prepared.clear()
    for method, a_8bit in (("marlin_w4a16", False), ("marlin_w4a8", True)):
        if not want(method):
            continue
        try:
            mar = [Marlin(k, n, a_8bit) for _ in range(copies)]
            put(method, lambda i, mar=mar: (lambda: mar[i](x)))
        except Exception as e:  # noqa: BLE001 (vLLM absent or another API: record it)
            res["us"][method] = None
            res["err"][method] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return res


def _time_config(cfg, m: int, k: int, w_c: list[torch.Tensor], ws: torch.Tensor) -> float | None:
    """Microseconds of one qgemm config at batch m over the weight copies; None if it cannot run."""
    from vllm_ruquant.kernels import gemm as g

    if k % (cfg.kwargs["BK"] * cfg.kwargs["SPLIT_K"]):
        return None
    a_q = torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8)
    a_s = torch.rand(m, device="cuda") + 0.5
    cfg = triton.Config(dict(cfg.kwargs, ASM=1), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    try:
        return 1000 * _timed([lambda w=w: g.qgemm(a_q, a_s, w, ws, a_mode=0, b_mode=2, K=k, config=cfg)
                              for w in w_c], graph=True)
    except Exception:  # noqa: BLE001 (a config this GPU cannot hold: shared memory)
        return None


def sweep(ms: list[int], top: int = 5) -> list[dict]:
    """Our W4A4 GEMM (int8-held activations, chunked weights) over small-M configs, M = ms[0] for
    the whole grid, then the ``top`` of each shape again at the other Ms."""

    from vllm_ruquant.kernels import gemm as g

    grid = [g._cfg(16, bn, bk, 4, st, split, 1) for bn in (32, 64, 128) for bk in (128, 256, 512)
            for split in (1, 2, 4, 8) for st in (3, 5)]
    out = []
    for name, (k, n, _) in LAYER.items():
        copies = max(1, min(16, math.ceil(256e6 / (n * k / 2))))
        w_c = [layout.pack_chunked(torch.randint(-8, 8, (n, k), dtype=torch.int8), 128).cuda() for _ in range(copies)]
        ws = torch.rand(n, 1, device="cuda") * 0.01 + 1e-3

        def time_cfg(cfg: triton.Config, m: int, k: int = k, w_c: list = w_c, ws: torch.Tensor = ws) -> float | None:
            return _time_config(cfg, m, k, w_c, ws)

        timed = [(time_cfg(c, ms[0]), c) for c in grid]
        timed = sorted(((t, c) for t, c in timed if t is not None), key=lambda tc: tc[0])
        default = g._CONFIGS["small"][0]
        for rank, (t, c) in enumerate(timed[:top]):
            rec = {"linear": name, "K": k, "N": n, "rank": rank, "config": g._shape_key(c), f"us_m{ms[0]}": t}
            for m in ms[1:]:
                rec[f"us_m{m}"] = time_cfg(c, m)
            out.append(rec)
        out.append({"linear": name, "K": k, "N": n, "rank": "default", "config": g._shape_key(default),
                    **{f"us_m{m}": time_cfg(default, m) for m in ms}})
        w_c.clear()
        for r in out[-top - 1:]:
            print(r, flush=True)
    return out


def _timed_or_none(fns: list, what: str) -> float | None:
    """Microseconds of one call (graph replay over the weight copies), or None if it does not run."""
    try:
        return 1000 * _timed(fns, graph=True)
    except Exception as e:  # noqa: BLE001 (a tile this GPU cannot build: record, go on)
        print(f"  {what}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        return None


def _gemv_sweep_one(name: str, k: int, n: int, m: int, rotated: bool, w_c: list[torch.Tensor],
                    ws: torch.Tensor, int8: bool = False) -> dict:
    """One shape at one M: qgemm, the GEMV's default tile and each tile of ``gemv.SWEEP``."""
    if rotated or int8:  # int8 integers (a_mode 0): rotate_quant's, or quantized in the graph
        args = (torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8), torch.rand(m, device="cuda") + 0.5)
        kw = dict(a_mode=0, b_mode=2, K=k)
    else:  # float activations quantized in the kernel (a_mode 2), as the backend runs un-rotated layers
        args = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16), None)
        kw = dict(a_mode=2, b_mode=2, K=k, act_bits=4)
    what = f"{name} M={m}"
    rec = {"linear": name, "K": k, "N": n, "M": m, "a_mode": kw["a_mode"],
           "qgemm_us": _timed_or_none([functools.partial(qgemm, *args, w, ws, **kw) for w in w_c], what + " qgemm"),
           "default": gemv_mod.default_config(m, n, k, kw["a_mode"]).short(),
           "default_us": _timed_or_none([functools.partial(gemv_mod.qgemv, *args, w, ws, **kw) for w in w_c], what),
           "tiles": {}}
    for cfg in gemv_mod.SWEEP:
        rec["tiles"][cfg.short()] = _timed_or_none(
            [functools.partial(gemv_mod.qgemv, *args, w, ws, **kw, config=cfg) for w in w_c], f"{what} {cfg}")
    done = {c: t for c, t in rec["tiles"].items() if t is not None}
    if done:
        best = min(done, key=done.get)
        rec["best"], rec["best_us"] = best, done[best]
        rec["best_tb_s"] = (n * k / 2 + 4 * n) / (done[best] * 1e-6) / 1e12  # weights + scales
    print(f"{name:8s} M={m}: qgemm {_us(rec['qgemm_us'])}  gemv default {_us(rec['default_us'])} "
          f"({rec['default']})  best {_us(rec.get('best_us'))} ({rec.get('best')}, "
          f"{rec.get('best_tb_s', 0):.2f} TB/s)", flush=True)
    return rec


def gemv_sweep(ms: list[int], int8: bool = False) -> list[dict]:
    """The GEMV's tiles (``gemv.SWEEP``) on the layer's shapes at each M, beside its default tile and qgemm
    on the same inputs: float activations quantized in the kernel (a_mode 2) for the un-rotated linears,
    rotate_quant's int8 (a_mode 0) for down_proj, as ``TritonBackend`` runs them; ``int8``: int8 for
    every linear (a_mode 0), as they run with the quantization in the compiled graph."""
    out = []
    for name, (k, n, rotated) in LAYER.items():
        copies = max(1, min(16, math.ceil(256e6 / (n * k / 2))))
        w_q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        w_c = [layout.pack_chunked(w_q, 128) for _ in range(copies)]
        ws = torch.rand(n, 1, device="cuda") * 0.01 + 1e-3
        out += [_gemv_sweep_one(name, k, n, m, rotated, w_c, ws, int8) for m in ms]
        w_c.clear()
    for m in ms:
        recs = [r for r in out if r["M"] == m]
        tot = {key: sum(r[key] for r in recs) if all(r.get(key) is not None for r in recs) else None
               for key in ("qgemm_us", "default_us", "best_us")}
        print(f"layer    M={m}: qgemm {_us(tot['qgemm_us'])}  gemv default {_us(tot['default_us'])}  "
              f"best tiles {_us(tot['best_us'])}")
    return out


def _us(t: float | None) -> str:
    return f"{t:6.1f} us" if t is not None else "     - us"


def table(rows: list[dict], methods: list[str]) -> str:
    lines = [f"{'M':>3} {'linear':<8} " + " ".join(f"{m:>12}" for m in methods)]
    for m in sorted({r["M"] for r in rows}):
        total = dict.fromkeys(methods, 0.0)
        for r in (r for r in rows if r["M"] == m):
            cells = []
            for meth in methods:
                t = r["us"].get(meth)
                cells.append(f"{t:12.1f}" if t is not None else f"{'-':>12}")
                total[meth] = total[meth] + t if (t is not None and total[meth] is not None) else None
            lines.append(f"{m:>3} {r['linear']:<8} " + " ".join(cells))
        lines.append(f"{m:>3} {'layer':<8} " + " ".join(f"{t:12.1f}" if t is not None else f"{'-':>12}"
                                                         for t in total.values()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--only", default="", help=f"comma-separated methods of {','.join(METHODS)} (default: all)")
    ap.add_argument("--sweep", action="store_true", help="time our GEMM's small-M configs instead")
    ap.add_argument("--gemv-sweep", action="store_true", help="also time the GEMV's tiles (gemv.SWEEP)")
    ap.add_argument("--gemv-ms", default="1,4", help="M values of --gemv-sweep")
    ap.add_argument("--gemv-int8", action="store_true",
                    help="--gemv-sweep on int8 activations for every linear (graph-visible quantization)")
    args = ap.parse_args(argv)
    only = {m for m in args.only.split(",") if m} or None
    if only and only - set(METHODS):
        ap.error(f"unknown methods {sorted(only - set(METHODS))}; known: {METHODS}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        rows = sweep([int(m) for m in args.ms.split(",")])
        (args.out / "gemm_decode_sweep.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(),
                                                                     "rows": rows}, indent=2))
        return 0
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.gemv_sweep or only:
        rows = [row(name, k, n, rotated, m, only) for m in map(int, args.ms.split(","))
                for name, (k, n, rotated) in LAYER.items()]
        (args.out / "decode_linears.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
        for r in rows:
            for meth, e in r["err"].items():
                print(f"  {r['linear']} M={r['M']} {meth}: {e}")
        print(table(rows, [m for m in METHODS if only is None or m in only]), flush=True)
    if args.gemv_sweep:
        recs = gemv_sweep([int(m) for m in args.gemv_ms.split(",")], args.gemv_int8)
        (args.out / "gemv_sweep.json").write_text(json.dumps({"env": env, "rows": recs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
