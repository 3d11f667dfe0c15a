"""Serving benchmark: ruquant vs bf16, fp8, GPTQ-Marlin and compressed-tensors, one table.

For one model shape (default Llama-3-8B) this writes a model directory per quantization
config (config.json + a synthetic word-level tokenizer; weights come from
``--load-format dummy``, right for speed, wrong for quality), then runs the chosen
``vllm bench throughput`` / ``vllm bench latency`` workloads of each config on one engine
(``one_engine.py``: vLLM's own bench code, one engine start per config instead of one per
workload), appends every result to one JSON file, and prints a table of req/s, tok/s and
latency with the ratio to bf16 measured in the same results file.

An 8B engine start costs 1.5-3 minutes on an H100, the four workloads about 1.5 more, so a
device call (10 minutes at most) takes two or three configs: split with ``--only`` and keep
``--results`` the same across the calls of one lease; ``--report`` re-prints the table and
writes the bar chart from what has accumulated. Flags after a lone ``--`` go to every
engine (e.g. ``-- --enforce-eager``).

    python benchmarks/serving.py --only bf16,fp8,ruquant-w4a4 --workloads tp-1024-256
    python benchmarks/serving.py --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.tiny_models import SHAPES, llama_config
from vllm_ruquant import settings
from vllm_ruquant.checkpoint.format import RotationSpec, scheme_format

ROOT = Path(__file__).resolve().parents[1]

@dataclass(frozen=True)
class QuantConfig:
    """How one row of the table is served: extra config.json keys and extra CLI flags.

    ``weight_bits`` and ``kernel`` are what the row claims, checked against its engine log
    (``row_evidence``): a row whose model memory or kernel contradicts its name is failed.
    """

    quantization_config: dict[str, Any] | None = None
    cli: tuple[str, ...] = ()
    note: str = ""
    weight_bits: int = 16  # of the decoder linears (embeddings and lm_head stay bf16)
    kernel: str | None = None  # a regex the engine log must match, naming the linear kernel


# The decoder linears of a Llama block, as GPTQ names them. vLLM 0.26's ``auto_gptq`` rebuilds an
# absent list from the safetensors metadata, and with ``--load-format dummy`` there are no files:
# the list came back empty and every linear was served unquantized (14.96 GiB, bf16's memory).
GPTQ_MODULES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _gptq(bits: int = 4, group: int = 128) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq", "modules_in_block_to_quantize": GPTQ_MODULES}


def _compressed_tensors(w_bits: int, a_bits: int, act_type: str = "int", group: int | None = None) -> dict[str, Any]:
    """A compressed-tensors config as llm-compressor writes it (symmetric static weights, dynamic per-token acts).

    ``group=None`` quantizes weights per output channel, else per group of ``group`` inputs.
    """
    weights = {"num_bits": w_bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if group is None else "group"}
    if group is not None:
        weights["group_size"] = group
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized" if w_bits == 4 else "int-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": {"num_bits": a_bits, "type": act_type, "symmetric": True, "strategy": "token",
                                  "dynamic": True},
        }},
        "ignore": ["lm_head"],
    }


def _ruquant(scheme: str, intermediate_size: int) -> dict[str, Any]:
    base = scheme_format(scheme)
    rot = {} if base.weight_only else {"down_proj": RotationSpec("hadamard", intermediate_size)}
    # as ruquant-convert writes it: the default rotations fold R2 into V/O ("offline" V)
    return dataclasses.replace(base, online_rotations=rot,
                               kv_cache=dataclasses.replace(base.kv_cache, value_rotation="offline"),
                               converter={"tool": "benchmarks/serving.py", "weights": "dummy"}).to_dict()


INT4_KV = ("--kv-cache-dtype", "int4_per_token_head")


RUQUANT_KERNEL = r"ruquant: linear layers run on the 'triton' backend"


def quant_configs(shape: dict[str, Any]) -> dict[str, QuantConfig]:
    inter = shape["intermediate_size"]
    return {
        "bf16": QuantConfig(),
        "fp8": QuantConfig(cli=("--quantization", "fp8"), note="dynamic fp8 W8A8 (vLLM)", weight_bits=8,
                           kernel=r"Selected \w*FP8\w*Kernel"),
        "fp8-kvfp8": QuantConfig(cli=("--quantization", "fp8", "--kv-cache-dtype", "fp8"),
                                 note="dynamic fp8 W8A8 + fp8 KV cache (vLLM)", weight_bits=8,
                                 kernel=r"Selected \w*FP8\w*Kernel"),
        "gptq-marlin-w4a16": QuantConfig(_gptq(), note="GPTQ 4-bit g128, Marlin kernel", weight_bits=4,
                                         kernel=r"Marlin"),
        # vLLM 0.26 runs W4A8-int (signed int4 weights) only on CPU / XPU kernels: no CUDA kernel
        # implements scalar type int4 x bf16, so on the GPU this row fails at engine start ...
        "ct-w4a8-int": QuantConfig(_compressed_tensors(4, 8), note="compressed-tensors int4 x int8 (CPU/XPU only)",
                                   weight_bits=4),
        # ... and compressed-tensors' W4A8 on Hopper is int4 weights (g128) x fp8 activations (CUTLASS)
        "ct-w4a8-fp8": QuantConfig(_compressed_tensors(4, 8, act_type="float", group=128),
                                   note="compressed-tensors int4 g128 x fp8, CUTLASS (sm90)", weight_bits=4,
                                   kernel=r"CutlassW4A8LinearKernel"),
        "ct-w8a8-int8": QuantConfig(_compressed_tensors(8, 8), note="compressed-tensors int8 x int8", weight_bits=8),
        "ruquant-w4a16": QuantConfig(_ruquant("w4a16", inter), weight_bits=4, kernel=RUQUANT_KERNEL),
        "ruquant-w4a8": QuantConfig(_ruquant("w4a8", inter), weight_bits=4, kernel=RUQUANT_KERNEL),
        "ruquant-w4a4": QuantConfig(_ruquant("w4a4", inter), weight_bits=4, kernel=RUQUANT_KERNEL),
        "ruquant-w4a4kv4": QuantConfig(_ruquant("w4a4kv4", inter), note="int4 KV, V rotated offline",
                                       weight_bits=4, kernel=RUQUANT_KERNEL),
        # the same linears with vLLM's built-in int4 KV path (online Q/K/V rotation + inverse)
        "ruquant-w4a4-vllm-int4kv": QuantConfig(_ruquant("w4a4", inter), cli=INT4_KV,
                                                note="vLLM's int4_per_token_head", weight_bits=4,
                                                kernel=RUQUANT_KERNEL),
        "bf16-vllm-int4kv": QuantConfig(cli=INT4_KV, note="vLLM's int4_per_token_head"),
    }


def expected_model_gib(shape: dict[str, Any], weight_bits: int) -> float:
    """Weight memory of a Llama of ``shape``: decoder linears at ``weight_bits``, embeddings and
    lm_head in bf16 (scales and norms, < 2%, left out)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (h * (h + 2 * kv) + h * h + 3 * h * inter)
    embeddings = 2 * shape["vocab_size"] * h
    return (linear * weight_bits / 8 + embeddings * 2) / 2**30


MEMORY_TOLERANCE = 0.12  # relative; group scales add ~3% at g128, vLLM's own buffers a little


ENGINE_READY = "init engine (profile, create kv cache, warmup model) took"


def autotune_seconds(log_text: str) -> dict[str, float]:
    """Seconds Triton's autotuner spent (``TRITON_PRINT_AUTOTUNING``) before the engine was ready
    (load, profile run, graph capture: outside any benchmark clock) and after (while serving: inside)."""
    import re

    ready = log_text.rfind(ENGINE_READY)
    split = ready if ready >= 0 else len(log_text)
    seconds = [(m.start() < split, float(m.group(1))) for m in re.finditer(r"finished after ([\d.]+)s", log_text)]
    return {"at_start": round(sum(t for before, t in seconds if before), 2),
            "while_serving": round(sum(t for before, t in seconds if not before), 2)}


def row_evidence(log_text: str, qc: QuantConfig, shape: dict[str, Any], on_gpu: bool = True) -> dict[str, Any]:
    """What the engine log proves about a row: model memory, the kernel line, and any contradiction.

    ``contradiction`` is None when the log's "Model loading took X GiB" is within
    ``MEMORY_TOLERANCE`` of ``qc.weight_bits``' expected memory and ``qc.kernel`` (if any) is
    in the log; else a sentence saying which claim the log refutes. vLLM's CPU model runner
    logs no model memory, so off the GPU a missing line proves nothing either way.
    """
    import re

    mem = re.findall(r"Model loading took ([\d.]+) GiB", log_text)
    model_gib = float(mem[-1]) if mem else None
    kernel_line = None
    if qc.kernel is not None:
        found = re.search(rf"[^\n]*{qc.kernel}[^\n]*", log_text)
        kernel_line = found.group(0).split("] ", 1)[-1].strip()[:200] if found else None
    expected = expected_model_gib(shape, qc.weight_bits)
    contradiction = None
    if model_gib is None and on_gpu:
        contradiction = "no 'Model loading took' line in the engine log"
    elif model_gib is not None and abs(model_gib / expected - 1) > MEMORY_TOLERANCE:
        contradiction = (f"model memory {model_gib:.2f} GiB is not that of {qc.weight_bits}-bit linears "
                         f"({expected:.2f} GiB expected)")
    elif qc.kernel is not None and kernel_line is None:
        contradiction = f"the engine log never names the kernel /{qc.kernel}/"
    return {"model_gib": model_gib, "expected_model_gib": round(expected, 3), "kernel_line": kernel_line,
            "autotune_s": autotune_seconds(log_text), "contradiction": contradiction}


@dataclass(frozen=True)
class Workload:
    kind: str  # "throughput" | "latency"
    input_len: int
    output_len: int
    num_prompts: int = 0  # throughput
    batch_size: int = 0  # latency

    def args(self) -> list[str]:
        if self.kind == "throughput":
            return ["--dataset-name", "random", "--random-input-len", str(self.input_len),
                    "--random-output-len", str(self.output_len), "--num-prompts", str(self.num_prompts)]
        return ["--input-len", str(self.input_len), "--output-len", str(self.output_len),
                "--batch-size", str(self.batch_size), "--num-iters-warmup", "2", "--num-iters", "5"]


WORKLOADS: dict[str, Workload] = {
    "tp-1024-256": Workload("throughput", 1024, 256, num_prompts=512),
    "tp-128-1024": Workload("throughput", 128, 1024, num_prompts=256),
    "lat-b1": Workload("latency", 128, 256, batch_size=1),
    "lat-b16": Workload("latency", 128, 256, batch_size=16),
}
# Where the KV cache, not the scheduler, limits a step (issue 23): run alone, every config with
# ``--max-model-len 4096 -- --max-num-seqs 1024`` (one engine per config serves one set of limits).
KV_BOUND_WORKLOADS: dict[str, Workload] = {
    "tp-2048-512": Workload("throughput", 2048, 512, num_prompts=1024),
}
# seconds on the tiny shape: the CPU test runs the whole path through a real engine with these
SMOKE_WORKLOADS: dict[str, Workload] = {
    "tp-smoke": Workload("throughput", 32, 8, num_prompts=8),
    "lat-smoke": Workload("latency", 16, 8, batch_size=2),
}
ALL_WORKLOADS = {**WORKLOADS, **KV_BOUND_WORKLOADS, **SMOKE_WORKLOADS}


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` synthetic words (no hub needed).

    ``vllm bench`` draws random token ids and decodes/encodes them; a word-level vocabulary
    with whitespace splitting round-trips every id exactly.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1 << 20}))


def write_model_dir(root: Path, name: str, shape: dict[str, Any], qc: QuantConfig) -> Path:
    """config.json (+ tokenizer) for ``--load-format dummy``; idempotent."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape)
    if qc.quantization_config is not None:
        cfg["quantization_config"] = qc.quantization_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if not (out / "tokenizer.json").exists():
        write_tokenizer(out, shape["vocab_size"])
    return out


def engine_argv(model_dir: Path, qc: QuantConfig, max_model_len: int, gpu_mem: float,
                engine_extra: tuple[str, ...] = ()) -> list[str]:
    """The engine arguments (vLLM's CLI spelling) of one config: dummy weights, no prefix caching.

    Prefix caching is off for every workload (``vllm bench latency``'s default; the random
    throughput prompts share no prefix) and the tokenizer is named (throughput sets it, latency
    would leave it unset), so the workloads of a config ask for the same engine and share it.
    ``benchmarks/decode_profile.py`` builds its engines from the same list.
    """
    return ["--model", str(model_dir), "--tokenizer", str(model_dir), "--load-format", "dummy",
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_mem),
            "--no-enable-prefix-caching", *qc.cli, *engine_extra]


def bench_argv(model_dir: Path, qc: QuantConfig, wl: Workload, result_json: Path, max_model_len: int,
               gpu_mem: float, engine_extra: tuple[str, ...] = ()) -> list[str]:
    """What follows ``vllm bench {throughput,latency}`` for one (config, workload)."""
    return [*engine_argv(model_dir, qc, max_model_len, gpu_mem, engine_extra),
            "--output-json", str(result_json), *wl.args()]


def summarize(kind: str, raw: dict[str, Any]) -> dict[str, float]:
    if kind == "throughput":
        return {"req_s": raw["requests_per_second"], "tok_s": raw["tokens_per_second"],
                "elapsed_s": raw["elapsed_time"]}
    return {"latency_s": raw["avg_latency"], "p90_s": raw.get("percentiles", {}).get("90", float("nan"))}


@dataclass
class Results:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Results:
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        return self

    def add(self, config: str, workload: str, row: dict[str, Any]) -> None:
        self.data.setdefault("rows", {}).setdefault(config, {})[workload] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


# The benchmark's requests sample without top-k / top-p, where vLLM 0.26 never calls
# FlashInfer's sampler (``TopKTopPSampler.forward_cuda`` falls back to torch); but the
# engine's sampler warm-up does (top_p 0.9), and on a fresh GPU machine that JIT-compiles
# FlashInfer's sampling kernels: ~2 minutes after graph capture for the first engine of
# each lease (2026-11-30d: 125 s; with it off, 19 s in 2026-11-30e). Off by default here;
# the environment may set it back.
ENGINE_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0",
              # Triton prints each autotuning it does (which kernel, key, seconds): the log then shows
              # how much of a row's clock the autotuner took (``autotune_seconds``)
              "TRITON_PRINT_AUTOTUNING": "1"}


def engine_environment() -> dict[str, str]:
    """The engine subprocess's environment: ``ENGINE_ENV`` under the caller's own values."""
    return {**ENGINE_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}


def ruquant_settings() -> str:
    """The plugin's ``RUQUANT_*`` switches the engine ran under (a row says which variant it timed)."""
    return settings.describe(engine_environment())


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("torch", "vllm", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 (report what is there)
            env[mod] = "absent"
    try:
        import torch

        env["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        env["gpu"] = "unknown"
    engine = engine_environment()
    env["engine_env"] = " ".join(f"{k}={engine[k]}" for k in ENGINE_ENV)
    return env


def table(results: dict[str, Any]) -> str:
    rows = results.get("rows", {})
    base = rows.get("bf16", {})
    lines = [f"{'config':<20} {'workload':<12} {'req/s':>8} {'tok/s':>9} {'lat s':>7} {'x bf16':>7}  status"]
    for cfg, wls in rows.items():
        for wl, r in wls.items():
            if r.get("status") != "ok":
                lines.append(f"{cfg:<20} {wl:<12} {'':>8} {'':>9} {'':>7} {'':>7}  {r.get('status')}")
                continue
            b = base.get(wl, {})
            if "req_s" in r:
                ratio = r["req_s"] / b["req_s"] if b.get("status") == "ok" else float("nan")
                lines.append(f"{cfg:<20} {wl:<12} {r['req_s']:8.2f} {r['tok_s']:9.0f} {'':>7} {ratio:7.2f}  ok")
            else:
                ratio = r["latency_s"] / b["latency_s"] if b.get("status") == "ok" else float("nan")
                lines.append(f"{cfg:<20} {wl:<12} {'':>8} {'':>9} {r['latency_s']:7.3f} {ratio:7.2f}  ok")
    return "\n".join(lines)


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("rows", {})
    wls = [w for w in ALL_WORKLOADS if any(w in r and r[w].get("status") == "ok" for r in rows.values())]
    if not wls:
        return
    fig, axes = plt.subplots(1, len(wls), figsize=(4.5 * len(wls), 4), squeeze=False)
    for ax, wl in zip(axes[0], wls, strict=True):
        names = [c for c in rows if rows[c].get(wl, {}).get("status") == "ok"]
        key = "req_s" if ALL_WORKLOADS[wl].kind == "throughput" else "latency_s"
        ax.bar(range(len(names)), [rows[c][wl][key] for c in names],
               color=["tab:orange" if c.startswith("ruquant") else "tab:gray" for c in names])
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{wl} ({'req/s, higher' if key == 'req_s' else 'latency s, lower'} is better)", fontsize=9)
    fig.suptitle(f"{results.get('env', {}).get('gpu', '?')}  vLLM {results.get('env', {}).get('vllm', '?')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    engine_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--only", default="all", help="comma-separated config names (default all)")
    ap.add_argument("--workloads", default="all",
                    help=f"comma-separated of {', '.join(ALL_WORKLOADS)} (all = the first {len(WORKLOADS)})")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/ruquant-bench-models"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--timeout", type=int, default=600,
                    help="seconds per config, engine start and all its workloads (a first 8B ruquant "
                         "start on a fresh machine took ~3 min)")
    ap.add_argument("--dry-run", action="store_true", help="write configs and print the bench commands only")
    ap.add_argument("--report", action="store_true", help="print the table and write the plot, run nothing")
    args = ap.parse_args(argv)
    args.engine_extra = tuple(engine_extra)
    known = quant_configs(SHAPES[args.shape])
    args.configs = list(known) if args.only == "all" else args.only.split(",")
    args.workload_names = list(WORKLOADS) if args.workloads == "all" else args.workloads.split(",")
    bad = [c for c in args.configs if c not in known] + [w for w in args.workload_names if w not in ALL_WORKLOADS]
    if bad:
        ap.error(f"unknown config/workload {bad}; configs: {', '.join(known)}; "
                 f"workloads: {', '.join(ALL_WORKLOADS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(args.results).load()
    if args.report:
        print(table(results.data))
        plot(results.data, args.results.with_suffix(".png"))
        return 0
    shape = SHAPES[args.shape]
    configs = quant_configs(shape)
    if not args.dry_run:
        results.data.setdefault("env", environment())
        results.data["shape"] = {"name": args.shape, **shape}
    for name in args.configs:
        model_dir = write_model_dir(args.models_dir, name, shape, configs[name])
        runs = [{"kind": ALL_WORKLOADS[w].kind, "workload": w,
                 "argv": bench_argv(model_dir, configs[name], ALL_WORKLOADS[w], args.models_dir / f"{name}.{w}.json",
                                    args.max_model_len, args.gpu_memory_utilization, args.engine_extra)}
                for w in args.workload_names]
        if args.dry_run:
            print(f"# {name}: one engine for {len(runs)} run(s) (benchmarks/one_engine.py)")
            for r in runs:
                print(shlex.join(["vllm", "bench", r["kind"], *r["argv"]]))
            continue
        for w, row in run_config(name, runs, args.models_dir, args.timeout, configs[name], shape).items():
            results.add(name, w, row)
            print(f"{name:<20} {w:<12} {row['status'][:100]} ({row['wall_s']:.0f} s)", flush=True)
    if not args.dry_run:
        print(table(results.data))
        plot(results.data, args.results.with_suffix(".png"))
    return 0


def run_config(name: str, runs: list[dict[str, Any]], models_dir: Path, timeout: int, qc: QuantConfig,
               shape: dict[str, Any], python: str = sys.executable) -> dict[str, dict[str, Any]]:
    """Run one config's workloads on one engine (``one_engine.py``, its own process); a row each."""
    for r in runs:
        Path(r["argv"][r["argv"].index("--output-json") + 1]).unlink(missing_ok=True)
    plan, report_path, log = (models_dir / f"{name}.{suffix}" for suffix in ("plan.json", "report.json", "log"))
    report_path.unlink(missing_ok=True)
    plan.write_text(json.dumps({"runs": runs, "report": str(report_path)}, indent=2))
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = run_to_completion([python, str(Path(__file__).with_name("one_engine.py")), str(plan)], f, timeout)
    wall = time.perf_counter() - t0
    report = json.loads(report_path.read_text()) if report_path.exists() else {"runs": []}
    kv_tokens = _kv_tokens(log)
    evidence = None
    if log.exists():
        text = log.read_text(errors="replace")
        evidence = row_evidence(text, qc, shape, on_gpu=_cuda_available())
    rows = {}
    for i, r in enumerate(runs):
        out_json = Path(r["argv"][r["argv"].index("--output-json") + 1])
        done = report["runs"][i] if i < len(report["runs"]) else None
        if done is not None and done["error"] is None and out_json.exists() and evidence["contradiction"]:
            row = {"status": f"failed: contradicts its name: {evidence['contradiction']}",
                   "measured_but_not_reported": summarize(r["kind"], json.loads(out_json.read_text()))}
        elif done is not None and done["error"] is None and out_json.exists():
            row = {"status": "ok", **summarize(r["kind"], json.loads(out_json.read_text()))}
        elif done is not None:
            row = {"status": f"failed: {done['error']}"}
        elif rc is None:
            row = {"status": f"timeout: the config's {timeout} s ran out"}
        else:
            row = {"status": f"failed rc={rc}: " + _last_error(log)}
        row["wall_s"] = done["wall_s"] if done is not None else wall
        row["engine_start_s"] = report.get("engine_start_s")
        row["kv_cache_tokens"] = kv_tokens
        row["ruquant_env"] = ruquant_settings()
        if evidence is not None:
            row.update({k: v for k, v in evidence.items() if k != "contradiction"})
        rows[r["workload"]] = row
    return rows


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_to_completion(cmd: list[str], log, timeout: int) -> int | None:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and return None.

    vLLM's engine core is a child process holding the GPU memory: killing only the parent
    (what ``subprocess.run(timeout=...)`` does) leaves it alive and the next config then
    fails to start for lack of free memory (seen on an H100).
    """
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=engine_environment())
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else "see log")[-200:]


def _kv_tokens(log: Path) -> int | None:
    import re

    if not log.exists():
        return None
    m = re.findall(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
    return int(m[-1].replace(",", "")) if m else None


if __name__ == "__main__":
    sys.exit(main())
