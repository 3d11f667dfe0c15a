"""Would CUDA eager's division-by-a-scalar (a multiply by the reciprocal) move the random w4a4 model?"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from served_noise import N_TOKENS, PROMPTS, greedy_divergences, sim_vs_sim, stats

from convert import cli
from convert.tiny_models import make_tiny_llama
from plugin_helpers import SimulatedQuantizedModel
from vllm_ruquant import reference as ref

root = Path(tempfile.mkdtemp(prefix="recip_w4a4_"))
src = make_tiny_llama(root / "src", intermediate_size=256, seed=5)
ck = root / "ck"
assert cli.main([str(src), str(ck), "--scheme", "w4a4", "--calib-samples", "8", "--calib-seq-len", "64"]) == 0
sim = SimulatedQuantizedModel(ck)
seqs = [(p, sim.greedy(p, N_TOKENS)) for p in PROMPTS]
orig = ref.quantize_activation

def recip(x, bits, clip_ratio=1.0, qmax_divisor=None):
    qmax = ref.qmax_for(bits)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp_min(absmax * clip_ratio * torch.tensor(1.0 / qmax, dtype=torch.float32), ref.FLT_MIN)
    q = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax).to(torch.int8)
    return q, scale

base = [sim.logits(p + t) for p, t in seqs]

class Frozen:
    def __init__(self, logits):
        self.it = iter(logits)

    def logits(self, ids):
        return next(self.it)

ref.quantize_activation = recip
other = SimulatedQuantizedModel(ck)
r = stats(sim_vs_sim(other, Frozen(base), seqs), greedy_divergences(other, seqs))
ref.quantize_activation = orig
check = stats(sim_vs_sim(SimulatedQuantizedModel(ck), Frozen(base), seqs))
print("unpatched vs frozen (must be 0):", check["worst"])
print("reciprocal scale vs simulation:", r, flush=True)
json.dump(r, open(sys.argv[1], "w"), indent=1)
