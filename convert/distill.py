"""What end-to-end training against the fp model shares: the KL-Top loss and the memory it needs.

OSTQuant (``convert/rotations/ostquant.py``) trains its rotation and scalings this way before
quantization, the scale tuning (``convert/scale_tuning.py``) trains the weight scales after it; both
run the whole model forward and backward on calibration sequences and compare the next-token
distributions with the fp model's.

KL-Top: the KL divergence between the fp model's and the quantized model's next-token
distributions restricted to the fp model's top-k tokens (both renormalised over those k), mean over
tokens. OSTQuant uses it instead of cross-entropy because with few calibration samples the label
loss over-fits, and the full-vocabulary KL is dominated by the long tail; keeping only the fp side's
top-k ids and log-probabilities also lets the quantized side read k rows of the head, not all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vllm_ruquant.checkpoint.models import ModelDims

TOP_K = 64


def top_k(fp_logits: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp model's top-k token ids and their log-probabilities renormalised over those k."""
    idx = fp_logits.topk(min(k, fp_logits.shape[-1]), dim=-1).indices
    return idx, F.log_softmax(fp_logits.gather(-1, idx), dim=-1)


@torch.no_grad()
def top_k_targets(fp_logits: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                  chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` of the fp model on every input sequence, ``chunk`` sequences a forward (bounding memory):
    all an end-to-end training needs of the fp model, so it can be freed before the training starts.
    ``fp_logits`` maps a slice of ``inputs`` (token ids, or sequence indices) to logits."""
    tops = [top_k(fp_logits(c).float()) for c in inputs.split(chunk)]
    return torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])


def kl_top(fp_logits: torch.Tensor, q_logits: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """KL(p_fp || p_q) over the fp model's top-k tokens (both renormalised over those k)."""
    return kl_top_of(top_k(fp_logits, k), q_logits)


def kl_top_of(fp_top: tuple[torch.Tensor, torch.Tensor], q_logits: torch.Tensor) -> torch.Tensor:
    """``kl_top`` from the fp side's ``top_k`` (the full fp logits need not be kept)."""
    idx, logp = fp_top
    return kl_top_gathered(logp, q_logits.gather(-1, idx))


def kl_top_gathered(fp_logp: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """``kl_top`` from the fp top-k log-probabilities and the quantized logits at those k ids."""
    logq = F.log_softmax(q_top, dim=-1)
    return (fp_logp.exp() * (fp_logp - logq)).sum(-1).mean()


def training_bytes(dims: ModelDims, calib_tokens: int, step_tokens: int) -> int:
    """What an end-to-end training holds: every layer and the head in fp32 (unlike the converter's one
    layer at a time), the calibration embeddings, and the activations autograd keeps for one step of
    ``step_tokens`` tokens (about ``12 d + 6 f`` floats a token and layer)."""
    d, f = dims.hidden_size, dims.intermediate_size
    step = min(calib_tokens, step_tokens) * dims.num_layers * (12 * d + 6 * f)
    return 4 * (dims.num_layers * dims.linear_params_per_layer + dims.vocab_size * d + calib_tokens * d + step)


def too_large_to_train(dims: ModelDims, calib_tokens: int, step_tokens: int, device: torch.device | str) -> str | None:
    """Why the model cannot be trained end to end on ``device`` (more than 80% of its free memory), or None."""
    need, free = training_bytes(dims, calib_tokens, step_tokens), available_bytes(device)
    if need <= 0.8 * free:
        return None
    return (f"training needs ~{need / 2**30:.1f} GiB on {device}, {free / 2**30:.1f} GiB free: the model is too "
            "large to train end to end here")


def available_bytes(device: torch.device | str) -> int:
    """Free memory where the training runs: the GPU's free bytes, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # Linux: free memory plus what the page cache would give back
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
