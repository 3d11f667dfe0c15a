"""Run several ``vllm bench throughput`` / ``vllm bench latency`` invocations on one engine.

Starting a vLLM engine for the Llama-3-8B shape (torch.compile, CUDA-graph capture, kernel
autotuning) took 1.5-3 minutes on an H100: more than most workloads it then serves, and the
reason a full table (8 configs x 4 workloads = 32 ``vllm bench`` processes, ~53 minutes)
did not fit a 30-minute device lease. Here each invocation is parsed by vLLM's own bench
parser and run by vLLM's own bench ``main``; only ``LLM.from_engine_args`` is wrapped so that
the second and later invocations get the engine the first one built. That is refused
(``EngineMismatch``) unless the engine arguments are identical, so every number is still
what ``vllm bench`` computes for those flags, minus the repeated start.

    python benchmarks/one_engine.py PLAN.json

``PLAN.json`` holds ``{"runs": [{"kind": "throughput" | "latency", "argv": [...]}, ...],
"report": "PATH"}``; each ``argv`` is what would follow ``vllm bench KIND`` and should carry
its own ``--output-json``. The report (written after every run, so a timeout keeps what
finished) gives the engine start time and, per run, its wall time and error, if any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


class EngineMismatch(RuntimeError):
    """A run cannot have the plan's engine: it asked for another, or the engine never started."""


class SharedEngine:
    """Stands in for ``LLM.from_engine_args``: builds the engine once, then hands it out again."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self.llm: Any = None
        self.args: dict[str, Any] | None = None
        self.start_s: float | None = None
        self.failed: str | None = None

    def __call__(self, engine_args: Any, *rest: Any, **kwargs: Any) -> Any:
        fields = _engine_fields(engine_args)
        if self.failed is not None:  # another start would fail the same way, minutes later
            raise EngineMismatch(f"the engine failed to start: {self.failed}")
        if self.llm is None:
            t0 = time.perf_counter()
            try:
                self.llm = self._build(engine_args, *rest, **kwargs)
            except Exception as exc:
                self.failed = f"{type(exc).__name__}: {exc}"[:200]
                raise
            self.start_s = time.perf_counter() - t0
            self.args = fields
            return self.llm
        diff = sorted(k for k in fields.keys() | self.args.keys() if fields.get(k) != self.args.get(k))
        if diff:
            raise EngineMismatch("this run needs a different engine than the first run of the plan "
                                 f"(engine arguments differ: {', '.join(diff)})")
        return self.llm


def _engine_fields(engine_args: Any) -> dict[str, Any]:
    """The engine arguments as comparable values (dataclass fields, repr for the odd object)."""
    out = {}
    for f in dataclasses.fields(engine_args):
        v = getattr(engine_args, f.name)
        out[f.name] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    return out


def _bench_module(kind: str) -> Any:
    from vllm.benchmarks import latency, throughput  # noqa: PLC0415 (heavy; only when running)

    return {"throughput": throughput, "latency": latency}[kind]


def parse_run(kind: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``vllm bench KIND`` parses it."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: PLC0415

    parser = FlexibleArgumentParser(prog=f"vllm bench {kind}")
    _bench_module(kind).add_cli_args(parser)
    return parser.parse_args(argv)


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Run every entry of ``plan`` on one shared engine; the report is rewritten after each."""
    from vllm import LLM  # noqa: PLC0415

    report_path = Path(plan["report"])
    report: dict[str, Any] = {"engine_start_s": None, "runs": []}
    original = LLM.__dict__["from_engine_args"]  # the classmethod object, restored as it was
    shared = SharedEngine(LLM.from_engine_args)
    LLM.from_engine_args = shared  # vLLM's bench mains call it as LLM.from_engine_args(engine_args)
    try:
        for run in plan["runs"]:
            t0 = time.perf_counter()
            entry: dict[str, Any] = {"kind": run["kind"], "argv": run["argv"], "error": None}
            try:
                _bench_module(run["kind"]).main(parse_run(run["kind"], run["argv"]))
            except Exception as exc:  # noqa: BLE001 (one failed run must not lose the others)
                traceback.print_exc()
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            entry["wall_s"] = time.perf_counter() - t0
            report["runs"].append(entry)
            report["engine_start_s"] = shared.start_s
            report_path.write_text(json.dumps(report, indent=2))
            print(f"one_engine: {run['kind']} done in {entry['wall_s']:.1f} s"
                  f"{'' if entry['error'] is None else ' -- ' + entry['error']}", flush=True)
    finally:
        LLM.from_engine_args = original
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path)
    args = ap.parse_args(argv)
    report = run_plan(json.loads(args.plan.read_text()))
    return 0 if all(r["error"] is None for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
