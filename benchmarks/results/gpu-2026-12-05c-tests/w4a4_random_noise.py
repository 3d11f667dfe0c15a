"""Norm-noise sensitivity of test_gpu_vllm's random w4a4 model (make_tiny_llama(256, seed=5), untrained).

    PYTHONPATH=tests python w4a4_random_noise.py OUT.json
"""

import json
import sys
import tempfile
from pathlib import Path

from served_noise import N_TOKENS, PROMPTS, greedy_divergences, noisy_norms, sim_vs_sim, stats

from convert import cli
from convert.tiny_models import make_tiny_llama
from plugin_helpers import SimulatedQuantizedModel

RECIPES = {"default (act order + GBS)": [],
           "plain GPTQ (--clip none --no-act-order)": ["--clip", "none", "--no-act-order"]}
SHOWN = ("median", "worst", "above_0.0001", "above_0.05", "greedy")

root = Path(tempfile.mkdtemp(prefix="noise_w4a4_"))
src = make_tiny_llama(root / "src", intermediate_size=256, seed=5)
rows = {}
for i, (label, extra) in enumerate(RECIPES.items()):
    ck = root / f"ck_{i}"
    assert cli.main([str(src), str(ck), "--scheme", "w4a4", "--calib-samples", "8", "--calib-seq-len", "64",
                     *extra]) == 0
    sim = SimulatedQuantizedModel(ck)
    seqs = [(p, sim.greedy(p, N_TOKENS)) for p in PROMPTS]
    for eps in (1e-7, 1e-6):
        for seed in range(4):
            noisy = SimulatedQuantizedModel(noisy_norms(ck, eps, seed))
            r = stats(sim_vs_sim(noisy, sim, seqs), greedy_divergences(noisy, seqs))
            rows[f"{label} | norm-noise-{eps:g}-draw{seed}"] = r
            print(label, eps, seed, {k: r[k] for k in SHOWN}, flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
