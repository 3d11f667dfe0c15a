"""int4-KV attention kernel benchmark: ours against vLLM's int4 kernel and FlashAttention on bf16.

One command on a GPU machine with vLLM (``python benchmarks/kv4_attention.py [--out DIR]``).
Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens), the
cache in vLLM's physical int4 layout (``(blocks, kv_heads, page, 2 x (64 + 4))`` bytes: K
nibbles, K scale, V nibbles, V scale). For each scenario of a serving step, in the same run:

* ``ours``: ``kernels.int4_kv_attention.paged_int4_attention`` with its default plan;
* ``ours_served`` (steps with prefill chunks): what the engine runs, the prefill sequences
  dequantized and attended by FlashAttention (``attention.attend_int4_cache``),
  the decodes by our kernel; the step's one host copy of the lengths is outside the timing
  (the engine pays it once per step, not per layer);
* ``vllm_int4``: vLLM 0.26's ``_launch_packed_attn`` on the same cache (3D split for small
  decode batches, as its backend launches it);
* ``fa_bf16``: vLLM's FlashAttention on a bf16 paged cache of the same shape (what a KV16
  engine runs);
* a sweep of our launch plans (the best is printed next to the default);
* ``*_graph_ms``: ours (the served path for steps with prefill chunks) and ``fa_bf16``
  replayed from a CUDA graph, i.e. GPU time without Python's launch overhead, which is what
  the engine's decode steps pay (they replay captured graphs). If a plain timing is far above
  its graph timing, the difference is host time;
* ``--plans``: instead of the generated sweep, the listed decode plans, each timed plainly
  and from a CUDA graph (a short list for one GPU call; the full sweep of a small-batch
  scenario compiles ~160 plans and does not fit one).

Also checks ours against vLLM's kernel on the same cache (max abs difference). Medians of
``triton.testing.do_bench``. Writes ``kv4_attention.json``; prints the table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from vllm_ruquant import compat
from vllm_ruquant import reference as ref
from vllm_ruquant.kernels import int4_kv_attention as ours

HEADS, KV_HEADS, D, PAGE = 32, 8, 128, 16
SCENARIOS = {  # name -> [(cached context, new queries)] per sequence
    "prefill 8x1024": [(0, 1024)] * 8,
    "mixed 4x1024 + 256 decodes @1152": [(0, 1024)] * 4 + [(1151, 1)] * 256,
    "decode 256 @1152": [(1151, 1)] * 256,
    "decode 512 @1280": [(1279, 1)] * 512,
    "decode 16 @1280": [(1279, 1)] * 16,
    "decode 1 @2048": [(2047, 1)],
}


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def bench_graph(fn) -> float | str:
    """Median ms of ``fn`` replayed from a CUDA graph; the error text if it cannot be captured."""
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a path that does not capture: record why, go on
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {str(e)[:120]}"


class Int4Cache:
    """Random keys/values quantized into vLLM's interleaved int4 page layout."""

    def __init__(self, num_blocks: int, generator: torch.Generator) -> None:
        half = D // 2
        self.raw = torch.empty(num_blocks, KV_HEADS, PAGE, 2 * (half + 4), dtype=torch.uint8, device="cuda")
        self.k, self.v, self.k_scales, self.v_scales = ref.int4_cache_views(self.raw, D)
        for i in range(0, num_blocks, 4096):  # quantize in slices: fp32 temporaries stay small
            sl = slice(i, min(i + 4096, num_blocks))
            for data, scales in ((self.k, self.k_scales), (self.v, self.v_scales)):
                x = torch.randn(*data[sl].shape[:-1], D, device="cuda", generator=generator)
                data[sl, ..., :half], scales[sl] = ref.quantize_kv_int4(x)


def metadata(specs: list[tuple[int, int]]) -> dict:
    pages = [-(-(c + n) // PAGE) for c, n in specs]
    table = torch.zeros(len(specs), max(pages), dtype=torch.int32)
    perm = torch.randperm(sum(pages))
    start = 0
    for i, p in enumerate(pages):
        table[i, :p] = perm[start:start + p]
        start += p
    q_lens = torch.tensor([n for _, n in specs])
    return {"cu_seqlens_q": torch.cat([torch.zeros(1), q_lens.cumsum(0)]).int().cuda(),
            "seq_lens": torch.tensor([c + n for c, n in specs], dtype=torch.int32).cuda(),
            "block_table": table.cuda(), "max_query_len": int(q_lens.max()),
            "max_seq_len": max(c + n for c, n in specs), "num_blocks": sum(pages)}


def vllm_int4(q, cache: Int4Cache, out, md: dict):  # noqa: ANN001, ANN201
    from vllm.v1.attention.ops import int4_per_token_head as int4_ops

    threshold, segments = 16, 16  # the backend's seq_threshold_3D (128 // 8) and NUM_PAR_SOFTMAX_SEGMENTS
    segm = torch.empty(threshold, HEADS, segments, D, device="cuda")
    segm_max = torch.empty(threshold, HEADS, segments, device="cuda")
    segm_sum = torch.empty_like(segm_max)

    def run() -> None:
        int4_ops._launch_packed_attn(
            q=q, k_cache=cache.k, v_cache=cache.v, out=out, cu_seqlens_q=md["cu_seqlens_q"],
            max_seqlen_q=md["max_query_len"], seqused_k=md["seq_lens"], softmax_scale=D ** -0.5,
            window_size=(-1, -1), block_table=md["block_table"], softcap=0.0, sinks=None, alibi_slopes=None,
            use_alibi_sqrt=False, qq_bias=None, output_scale=None, mm_prefix_range=None,
            k_scale_cache=cache.k_scales, v_scale_cache=cache.v_scales, seq_threshold_3D=threshold,
            num_par_softmax_segments=segments, softmax_segm_output=segm, softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_sum, packing_factor=2)
    return run


def fa_bf16(q, md: dict):  # noqa: ANN001, ANN201
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    k = torch.randn(md["num_blocks"], PAGE, KV_HEADS, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    return lambda: flash_attn_varlen_func(
        q=q, k=k, v=v, out=out, cu_seqlens_q=md["cu_seqlens_q"], max_seqlen_q=md["max_query_len"],
        seqused_k=md["seq_lens"], max_seqlen_k=md["max_seq_len"], softmax_scale=D ** -0.5, causal=True,
        block_table=md["block_table"], fa_version=3)


def served(q, cache: Int4Cache, out, md: dict, plan: ours.AttentionPlan):  # noqa: ANN001, ANN201
    from vllm_ruquant import attention

    flash = compat.flash_attn_varlen()
    split = attention.PrefillSplit.of(md["cu_seqlens_q"], md["seq_lens"], plan.decode_queries(HEADS // KV_HEADS))
    args = {k: md[k] for k in ("cu_seqlens_q", "seq_lens", "block_table", "max_query_len")}
    return lambda: attention.attend_int4_cache(flash, q, cache.k, cache.v, cache.k_scales, cache.v_scales, out,
                                                   plan=plan, split=split, **args, softmax_scale=D ** -0.5)


def plan_sweep(default: ours.AttentionPlan) -> list[ours.AttentionPlan]:
    """Decode-only steps: decode launch shapes; otherwise prefill launch shapes."""
    # around the 2026-11-30 H200 optima (decode m4 n32 w1 st1 prefetched, small batches split
    # into segments for ~1024 programs; prefill m128 n32 w4 st2): a full sweep did not fit a
    # 480 s call, a small-batch one not 200 s (--plans times a short list instead)
    if default.prefill is None:
        s = default.decode.num_segments
        segments = (1,) if s == 1 else (max(s // 2, 2), s, s * 2)
        # 4 rows = the 4 query heads of a 1-token decode (Triton pads the MMA): fewer registers
        # prefetch_kv (loads one tile ahead in registers) replaces cp.async staging: stages 1 only
        return [ours.AttentionPlan(ours.LaunchPlan(m, t, s, w, st, prefetch_kv=pf), None) for m, t, s, w, st, pf in
                itertools.product((HEADS // KV_HEADS, 16), (16, 32, 64), segments, (1, 2, 4), (1, 2), (False, True))
                if not (pf and st > 1)]
    return [ours.AttentionPlan(default.decode, ours.LaunchPlan(m, t, 1, w, st)) for m, t, w, st in
            itertools.product((64, 128), (32, 64), (4, 8), (2, 3))]


def parse_plans(text: str) -> list[ours.LaunchPlan]:
    """``rows,keys,segments,warps,stages,prefetch;...`` (LaunchPlan's field order) -> decode plans."""
    plans = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        fields = [int(x) for x in item.split(",")]
        if len(fields) != 6:
            raise ValueError(f"--plans item {item!r}: expected rows,keys,segments,warps,stages,prefetch")
        *shape, prefetch = fields
        plans.append(ours.LaunchPlan(*shape, prefetch_kv=bool(prefetch)))
    return plans


def _describe(plan: ours.AttentionPlan) -> str:
    def one(lp: ours.LaunchPlan | None) -> str:
        if lp is None:
            return "-"
        return (f"m{lp.block_m} n{lp.tile_n} s{lp.num_segments} w{lp.num_warps} st{lp.num_stages}"
                + (" pf" if lp.prefetch_kv else ""))
    return f"decode[{one(plan.decode)}] prefill[{one(plan.prefill)}]"


def run_scenario(name: str, specs: list[tuple[int, int]], sweep: bool,
                 listed: list[ours.LaunchPlan] | None = None) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    md = metadata(specs)
    cache = Int4Cache(md["num_blocks"], g)
    tokens = sum(n for _, n in specs)
    q = torch.randn(tokens, HEADS, D, device="cuda", generator=g).to(torch.bfloat16)
    out, out_vllm = torch.empty_like(q), torch.empty_like(q)
    args = {k: md[k] for k in ("cu_seqlens_q", "seq_lens", "block_table", "max_query_len")}

    def mine(plan: ours.AttentionPlan | None = None):  # noqa: ANN202
        return lambda: ours.paged_int4_attention(q, cache.k, cache.v, cache.k_scales, cache.v_scales, out,
                                                 **args, softmax_scale=D ** -0.5, plan=plan)

    row: dict = {"scenario": name, "tokens": tokens, "sequences": len(specs)}
    default = ours.plan_launch(md["max_query_len"], len(specs), KV_HEADS, HEADS // KV_HEADS)
    row["default_plan"] = _describe(default)
    vllm_run = vllm_int4(q, cache, out_vllm, md)
    row["vllm_int4_ms"] = bench(vllm_run)
    row["ours_ms"] = bench(mine())
    row["max_abs_diff_vs_vllm"] = float((out.float() - out_vllm.float()).abs().max())
    if default.prefill is None:
        row["ours_graph_ms"] = bench_graph(mine())
    if default.prefill is not None:
        served_run = served(q, cache, out, md, default)
        row["ours_served_ms"] = bench(served_run)
        row["served_max_abs_diff_vs_vllm"] = float((out.float() - out_vllm.float()).abs().max())
        row["ours_served_graph_ms"] = bench_graph(served_run)
    try:
        fa_run = fa_bf16(q, md)
        row["fa_bf16_ms"] = bench(fa_run)
        row["fa_bf16_graph_ms"] = bench_graph(fa_run)
    except Exception as e:  # noqa: BLE001 - a baseline that does not run here: record, go on
        row["fa_bf16_ms"], row["fa_error"] = None, f"{type(e).__name__}: {str(e)[:120]}"
    if listed and default.prefill is None:
        plans = [ours.AttentionPlan(lp, None) for lp in listed]
        row["listed"] = [{"plan": _describe(p), "ms": bench(mine(p)), "graph_ms": bench_graph(mine(p)),
                          "max_abs_diff_vs_vllm": float((out.float() - out_vllm.float()).abs().max())}
                         for p in plans]
    elif sweep:
        timed = [(row["ours_ms"], default)]
        for plan in plan_sweep(default):
            try:
                timed.append((bench(mine(plan)), plan))
            except Exception:  # noqa: BLE001 - out of shared memory etc.: skip that plan
                continue
        timed.sort(key=lambda x: x[0])
        row["best_ms"], row["best_plan"] = timed[0][0], _describe(timed[0][1])
        d = timed[0][1].decode  # in RUQUANT_INT4_KV_DECODE_PLAN's order (scripts/gpu_session.sh kv4serve)
        row["best_decode"] = [d.block_m, d.tile_n, d.num_warps, d.num_stages, int(d.prefetch_kv)]
        row["runners_up"] = [(round(t, 4), _describe(p)) for t, p in timed[1:4]]
    print(json.dumps(row), flush=True)
    return row


def _ms(x: float | str | None) -> str:
    return f"{x:8.3f}" if isinstance(x, float) else f"{'failed':>8}"  # the reason is in the JSON


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--no-sweep", action="store_true", help="time the default plans only")
    parser.add_argument("--only", default="", help="comma-separated scenario name prefixes")
    parser.add_argument("--plans", default="", help="decode plans to time instead of the sweep: "
                        "rows,keys,segments,warps,stages,prefetch;... e.g. '16,64,4,2,1,0;4,32,16,1,1,1'")
    args = parser.parse_args()
    listed = parse_plans(args.plans)
    names = [n for n in SCENARIOS if not args.only or any(n.startswith(p) for p in args.only.split(","))]
    rows = [run_scenario(n, SCENARIOS[n], not args.no_sweep, listed) for n in names]
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    (args.out / "kv4_attention.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    # served: what the engine runs (FlashAttention for prefill chunks); speed-ups > 1 mean ours is faster
    print(f"\n{info}\n{'scenario':36} {'kernel':>8} {'served':>8} {'vllm int4':>10} {'fa bf16':>8} "
          f"{'vllm/served':>11} {'fa/served':>9} {'best':>8} {'diff':>8}")
    for r in rows:
        fa, mine = r["fa_bf16_ms"] or float("nan"), r.get("ours_served_ms", r["ours_ms"])
        diff = max(r["max_abs_diff_vs_vllm"], r.get("served_max_abs_diff_vs_vllm", 0.0))
        print(f"{r['scenario']:36} {r['ours_ms']:8.3f} {mine:8.3f} {r['vllm_int4_ms']:10.3f} {fa:8.3f} "
              f"{r['vllm_int4_ms'] / mine:10.2f}x {fa / mine:8.2f}x "
              f"{r.get('best_ms', float('nan')):8.3f} {diff:8.1e}  best={r.get('best_plan')}")
        # GPU time alone (CUDA-graph replay): no Python launch overhead
        print(f"{'  from a CUDA graph':36} {'':8} {_ms(r.get('ours_served_graph_ms', r.get('ours_graph_ms')))} "
              f"{'':10} {_ms(r.get('fa_bf16_graph_ms'))}")
        for lp in r.get("listed", []):
            print(f"    {lp['plan']:32} {_ms(lp['ms'])} {_ms(lp['graph_ms'])} (plain, graph) "
                  f"diff {lp['max_abs_diff_vs_vllm']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
