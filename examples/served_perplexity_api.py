"""Perplexity of a checkpoint read THROUGH the OpenAI endpoint of ``vllm serve``, next to the simulation.

Issue 20 item 3: what a user gets from ``vllm serve CKPT`` must be what the converter's
simulation (``convert.evaluate``, the reference ops) promises. Both sides score the same
non-overlapping windows of ``--seq-len`` tokens of a held-out text, each window on its own
(positions 1..L-1 given the window's prefix). The served side sends each window as a
token-id prompt to ``/v1/completions`` with ``echo=True, logprobs=1, max_tokens=1`` and
sums the echoed prompt-token logprobs -- the way ``lm_eval`` scores a served model.

The two sides can run on different machines, at different times:

    # CPU, beforehand: the windows (token ids) and their simulated NLL
    python examples/served_perplexity_api.py simulate CKPT --text wiki_eval.txt --tokens 32768 --out sim.json
    # GPU, later: starts `vllm serve CKPT` (or talks to --url), scores sim.json's windows, merges
    python examples/served_perplexity_api.py serve CKPT --simulated-json sim.json --out merged.json \
        [--url http://HOST:PORT] [-- extra `vllm serve` flags, e.g. --dtype bfloat16]

``serve`` without ``--simulated-json`` builds the windows from ``--text`` itself and writes
the served side alone. The merged JSON holds both perplexities, the token counts and the
relative difference; ``examples/render_results.py`` renders the table from it. Needs the
``openai`` client (a vLLM dependency, so it is there wherever vLLM is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from convert import calibration
from convert.evaluate import Evaluator, LoadedModel
from convert.provenance import stamp
from vllm_ruquant.serve_process import ServerFailed, vllm_server

START_TIMEOUT_S = 900  # a fresh GPU machine's first engine took ~4 min (issue 20 item 4)
STOP_TIMEOUT_S = 60


def heldout_windows(ckpt: Path, text: Path | None, tokens: int, seq_len: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``text`` (None: CPython's pydoc text), in windows of ``seq_len``."""
    ids = calibration.token_stream(ckpt, calibration.read_text(text))[:tokens]
    n = (ids.numel() // seq_len) * seq_len
    if n == 0:
        raise SystemExit(f"{text} has fewer than {seq_len} tokens")
    return ids[:n].view(-1, seq_len).tolist()


def windows_sha256(windows: list[list[int]]) -> str:
    """Fingerprint of the token windows: both sides of a merge must have scored the same ones."""
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()


def simulated_token_logprobs(ev: Evaluator, window: list[int]) -> list[float]:
    """Logprob of each token of one window at positions 1..L-1 under the simulation (fp32 reference ops)."""
    t = torch.tensor(window)
    logp = ev.logits(t.unsqueeze(0))[0].float().log_softmax(-1)
    return logp[:-1].gather(-1, t[1:, None])[:, 0].tolist()


def simulated_nll(ckpt: Path, windows: list[list[int]]) -> list[float]:
    """Summed NLL of each window under ``convert.evaluate``'s simulation (CPU)."""
    ev = Evaluator(LoadedModel.open(ckpt), torch.device("cpu"))
    return [-math.fsum(simulated_token_logprobs(ev, w)) for w in windows]


def api_token_logprobs(client, model: str, window: list[int]) -> list[float]:
    """Logprob of each token of one window at positions 1..L-1, echoed by ``/v1/completions``."""
    r = client.completions.create(model=model, prompt=window, echo=True, logprobs=1, max_tokens=1, temperature=0.0)
    lps = r.choices[0].logprobs.token_logprobs[: len(window)]  # the prompt's; the one generated token follows
    if lps[0] is not None or any(lp is None for lp in lps[1:]):
        raise RuntimeError(f"unexpected echoed logprobs (first {lps[:3]})")
    return lps[1:]


def api_client(base_url: str):  # -> (openai.OpenAI, served model name)
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY", timeout=600, max_retries=0)
    return client, client.models.list().data[0].id


def served_nll(base_url: str, windows: list[list[int]], concurrency: int) -> tuple[str, list[float]]:
    """(served model name, summed NLL per window) through the OpenAI client, ``concurrency`` requests at a time."""
    client, model = api_client(base_url)
    with ThreadPoolExecutor(concurrency) as pool:
        return model, list(pool.map(lambda w: -math.fsum(api_token_logprobs(client, model, w)), windows))


def serve_args(ckpt: Path, seq_len: int, extra: list[str]) -> list[str]:
    """The flags of ``vllm serve CKPT`` here: ``--quantization ruquant`` for a converted checkpoint,
    room for one window, no prefix cache (every window is scored from scratch), then ``extra``."""
    quantized = "quantization_config" in json.loads((ckpt / "config.json").read_text())
    return [*(["--quantization", "ruquant"] if quantized else []), "--max-model-len", str(seq_len + 8),
            "--no-enable-prefix-caching", *extra]


def _side(nll: list[float], seq_len: int, seconds: float) -> dict:
    scored = len(nll) * (seq_len - 1)
    return {"perplexity": math.exp(sum(nll) / scored), "window_nll": nll, "seconds": seconds}


def recipe_of(ckpt: Path) -> dict:
    """Scheme and recipe the converter recorded in the checkpoint's config (``fp`` for a plain HF model)."""
    q = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
    if not q:
        return {"scheme": "fp", "recipe": "none"}
    c = q.get("converter", {})
    return {"scheme": c.get("scheme", "?"), "recipe": f"{c.get('rotation', '?')} + {c.get('weight_quantizer', '?')}"}


def served_on(args: argparse.Namespace, extra: list[str]) -> dict:
    """Machine, vLLM version and dtype of the served side (what the table's reader needs to know)."""
    if args.url is None:
        from vllm_ruquant.compat import VLLM_VERSION

        version = VLLM_VERSION
    else:
        try:
            with urllib.request.urlopen(args.url.rstrip("/") + "/version", timeout=5) as r:
                version = json.load(r)["version"]
        except (OSError, ValueError, KeyError):
            version = "?"
    device = args.served_on or ("?" if args.url else
                                torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")
    cfg = json.loads((args.ckpt / "config.json").read_text())
    dtype = (extra[extra.index("--dtype") + 1] if "--dtype" in extra[:-1] else
             "?" if args.url else f"auto ({cfg.get('torch_dtype') or cfg.get('dtype')})")
    return {"device": device, "vllm": version, "dtype": dtype}


def merge(sim: dict, served: dict) -> dict:
    """One record with both sides, the relative difference and the per-window served-minus-simulated mean NLL."""
    if sim["windows_sha256"] != served["windows_sha256"]:
        raise SystemExit("the served and simulated sides scored different token windows")
    per_tok = sim["seq_len"] - 1
    diff = [(b - a) / per_tok for a, b in zip(sim["simulated"]["window_nll"], served["served"]["window_nll"],
                                              strict=True)]
    s, v = sim["simulated"]["perplexity"], served["served"]["perplexity"]
    out = {k: v for k, v in sim.items() if k != "window_token_ids"}
    out.update(served=served["served"], served_with=served["served_with"],
               relative_difference=(v - s) / s, per_window_nll_difference=diff)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["simulate", "serve"])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--text", type=Path, help="held-out UTF-8 text (not needed with --simulated-json)")
    ap.add_argument("--tokens", type=int, default=32768, help="first N tokens of the text, cut into windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--simulated-json", type=Path, help="serve: score this file's windows and merge with it")
    ap.add_argument("--url", help="serve: a running server (default: start `vllm serve CKPT` here)")
    ap.add_argument("--concurrency", type=int, default=8, help="serve: requests in flight")
    ap.add_argument("--served-on", help="serve: the machine, for the table (default: this one's GPU, or 'CPU')")
    ap.add_argument("--out", type=Path, required=True)
    ap.epilog = "serve: flags after a lone -- go to `vllm serve` unchanged (e.g. --dtype bfloat16 --enforce-eager)."
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    sim = json.loads(args.simulated_json.read_text()) if args.simulated_json else None
    if sim is not None:
        windows, seq_len = sim["window_token_ids"], sim["seq_len"]
    elif args.text is None:
        ap.error("--text is needed unless --simulated-json gives the windows")
    else:
        windows, seq_len = heldout_windows(args.ckpt, args.text, args.tokens, args.seq_len), args.seq_len
    head = {"ckpt": args.ckpt.name, **recipe_of(args.ckpt), "seq_len": seq_len, "windows": len(windows),
            "scored_tokens": len(windows) * (seq_len - 1), "windows_sha256": windows_sha256(windows)}
    if sim is None:
        head["text"] = args.text.name

    t0 = time.perf_counter()
    if args.mode == "simulate":
        res = {**head, "simulated": _side(simulated_nll(args.ckpt, windows), seq_len, time.perf_counter() - t0),
               "simulated_with": stamp(), "window_token_ids": windows}
        line = f"simulated perplexity {res['simulated']['perplexity']:.4f}"
    else:
        if args.url:
            model, nll = served_nll(args.url, windows, args.concurrency)
            how = {"url": args.url}
        else:
            log = args.out.with_suffix(".server.log")
            # stopped by a SIGTERM to its whole process group (the engine children too)
            try:
                with vllm_server(args.ckpt, log, *serve_args(args.ckpt, seq_len, extra),
                                 startup_timeout=START_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S, group=True) as srv:
                    t0 = time.perf_counter()  # the scoring, not the engine start
                    model, nll = served_nll(srv.base, windows, args.concurrency)
            except ServerFailed as e:
                raise SystemExit(f"{e.report()}\nlog: {log}") from None
            cmd = srv.proc.args
            how = {"command": " ".join(["vllm", *cmd[cmd.index("serve"):]]).replace(str(args.ckpt), args.ckpt.name)}
        served = {**head, "served": _side(nll, seq_len, time.perf_counter() - t0),
                  "served_with": {**stamp(), **how, **served_on(args, extra), "served_model": model}}
        res = merge(sim, served) if sim is not None else served
        line = f"served perplexity {served['served']['perplexity']:.4f}"
        if sim is not None:
            line += (f", simulated {res['simulated']['perplexity']:.4f}, "
                     f"relative difference {res['relative_difference']:+.3%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # the windows' token ids make a simulated file long: one line for the machine; others for people
    args.out.write_text(json.dumps(res) if "window_token_ids" in res else json.dumps(res, indent=1))
    print(f"{args.ckpt.name}: {line} over {head['scored_tokens']} tokens ({head['windows']} windows of {seq_len})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
