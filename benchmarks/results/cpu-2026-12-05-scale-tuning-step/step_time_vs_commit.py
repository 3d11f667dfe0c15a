"""Seconds of four scale-tuning forward + backward passes of whichever ``convert`` is on PYTHONPATH.

    python step_time_vs_commit.py CKPT SRC_MODEL CALIB_TEXT {butterfly|matmul} THREADS

Written to time the code before a change (a git worktree of the older commit on PYTHONPATH, where
``reference.hadamard_as_matmul`` does not exist yet: "butterfly" only) against the code after it.
"""

import contextlib
import sys
import time
from pathlib import Path

import torch

from convert import scale_tuning
from convert.calibration import calibration_batches
from convert.evaluate import LoadedModel
from vllm_ruquant import reference as ref

ckpt, src, text, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
torch.set_num_threads(int(sys.argv[5]))
loaded = LoadedModel.open(ckpt)
names = list(loaded.reader.keys())
tokens = calibration_batches(src, text, 8, 256)
model = scale_tuning._TrainableModel(lambda n: loaded.reader.get(n, None), loaded.reader.__contains__,
                                     loaded.dims, loaded.fmt, scale_tuning.quantized_prefixes(names), 256,
                                     torch.device("cpu"))
sigma = {p: torch.zeros_like(model.scales[p], requires_grad=True) for p in model.prefixes}
idx = torch.randint(0, 1000, (4, 256, 32))
with ref.hadamard_as_matmul() if mode == "matmul" else contextlib.nullcontext():
    seconds = []
    for _ in range(4):
        t0 = time.perf_counter()
        model.top_logits(tokens[:4], idx, sigma).float().pow(2).mean().backward()
        seconds.append(time.perf_counter() - t0)
print(mode, "s/step", [round(t, 2) for t in seconds])
