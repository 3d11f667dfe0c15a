"""Drive ``vllm serve CKPT --quantization ruquant`` over HTTP with ``vllm bench serve``.

Starts the server on 127.0.0.1 (free port), waits for /health, runs ``vllm bench serve``
(random dataset) at each request rate, collects completed/failed counts and latencies,
stops the server (SIGTERM to its process group), and prints one table (JSON beside it).

    python benchmarks/serve_openai.py CKPT [--rates 4,16,inf] [--num-prompts 256] [--load-format dummy]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vllm_ruquant.serve_process import ServerFailed, start, stop, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def serve_args(extra: list[str]) -> list[str]:
    """The flags of ``vllm serve CKPT``: ruquant, then what followed a lone ``--``."""
    return ["--quantization", "ruquant", *extra]


def bench_command(ckpt: Path, port: int, rate: str, num_prompts: int, input_len: int, output_len: int,
                  result_dir: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
            "--base-url", f"http://127.0.0.1:{port}", "--model", str(ckpt), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--request-rate", rate, "--save-result",
            "--result-dir", str(result_dir), "--result-filename", name]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, and the ``vllm serve`` flags given after a lone ``--``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--rates", default="4,16,inf")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "serve_openai.json")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.epilog = "Flags after a lone -- go to `vllm serve` unchanged."
    argv = list(sys.argv[1:] if argv is None else argv)
    # split by hand: a REMAINDER positional would also swallow this script's own flags after CKPT
    cut = argv.index("--") if "--" in argv else len(argv)
    return ap.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    log = args.results.with_suffix(".server.log")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    server = start(args.ckpt, log, *serve_args(extra))
    port, proc = server.port, server.proc
    try:
        try:
            wait_healthy(server, args.start_timeout)
        except ServerFailed as e:
            print(e.excerpt, file=sys.stderr)
            raise
        for rate in args.rates.split(","):
            name = f"serve-rate-{rate}.json"
            rc = subprocess.run(bench_command(args.ckpt, port, rate, args.num_prompts, args.input_len,
                                              args.output_len, args.results.parent, name)).returncode
            res = json.loads((args.results.parent / name).read_text()) if rc == 0 else {}
            rows.append({"rate": rate, "rc": rc, "completed": res.get("completed"),
                         "failed": res.get("failed", args.num_prompts - (res.get("completed") or 0)),
                         "req_s": res.get("request_throughput"), "out_tok_s": res.get("output_throughput"),
                         "median_ttft_ms": res.get("median_ttft_ms"), "median_tpot_ms": res.get("median_tpot_ms")})
    finally:
        code = stop(proc, group=True).returncode  # SIGTERM to its process group, SIGKILL after 30 s
    args.results.write_text(json.dumps({"ckpt": str(args.ckpt), "server_exit": code, "rows": rows}, indent=2))
    print(f"{'rate':>6} {'done':>6} {'failed':>6} {'req/s':>7} {'tok/s':>8} {'TTFT ms':>8} {'TPOT ms':>8}")
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        print(f"{r['rate']:>6} {fmt(r['completed'], '6d')} {fmt(r['failed'], '6d')} {fmt(r['req_s'], '7.2f')} "
              f"{fmt(r['out_tok_s'], '8.0f')} {fmt(r['median_ttft_ms'], '8.1f')} {fmt(r['median_tpot_ms'], '8.1f')}")
    print(f"server stopped by PID {proc.pid}, exit code {code}")
    return 0 if rows and all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
