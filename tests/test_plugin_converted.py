"""Issue 2, acceptance 2: a checkpoint written by ruquant-convert, served by vLLM on the CPU,
matches convert/evaluate.py's simulated-quantized forward (greedy tokens identical for 32
tokens, logprobs equal up to float noise; tolerance argued in plugin_helpers).

The model exercises the whole converter: Qwen2 (q/k/v biases), RMSNorm folding, randomised
Hadamard R1/R2, the online Hadamard R4 of a non-power-of-two size (344 = 2 * 172), GPTQ.
"""

from __future__ import annotations

import json

import pytest
import torch

from convert import cli
from convert.model_io import CheckpointReader
from convert.tiny_models import make_tiny_llama
from plugin_helpers import Tolerance, check_against_simulation, in_process_llm
from vllm_ruquant.checkpoint.format import RotationSpec, RUQuantFormat

pytestmark = pytest.mark.vllm

PROMPTS = [list(range(5, 29)), [3, 100, 200, 300, 7, 9]]


# the skeleton's recipe, then each seed method of issue 5 / issue 8 as the converter option it is
OPTIONS = {
    "hadamard-gptq": [],
    "ruquant": ["--rotation", "ruquant"],
    "ostquant": ["--transform", "ostquant"],  # issue 5 names the flag --transform (= --rotation)
    "septq": ["--weight-quantizer", "septq"],
    "lrq": ["--weight-quantizer", "lrq", "--lrq-steps", "20"],
    "gbs-clip": ["--clip", "gbs"],
    "dimension-expansion": ["--dimension-expansion"],
    # issue 24 item 1: RUQuant's stage-1 blocks fitted per layer on o_proj's input, served online
    "ruquant-online-o": ["--rotation", "ruquant-online-o"],
    # signed weight scales (each group's largest weight on -8): the kernels must not assume scales > 0
    "full-range": ["--clip", "gbs", "--full-range"],
}
# 170 is no Hadamard order: --dimension-expansion serves down_proj padded to 172 (Williamson H_172)
INTERMEDIATE = {"dimension-expansion": 170}


@pytest.fixture(scope="module", params=list(OPTIONS), ids=list(OPTIONS))
def ckpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"converted-{request.param}")
    make_tiny_llama(root / "src", arch="qwen2", intermediate_size=INTERMEDIATE.get(request.param, 344), seed=11)
    out = root / "w4a4"
    assert cli.main([str(root / "src"), str(out), "--scheme", "w4a4", "--calib-samples", "8",
                     "--calib-seq-len", "64", *OPTIONS[request.param]]) == 0
    return out


def test_converted_w4a4_served_matches_simulation(ckpt):
    # A rounding flip (vLLM's fp32 kernels vs torch moving one activation across a 4-bit
    # rounding boundary) changes that activation by a whole 4-bit step, 16x an 8-bit step:
    # plugin_helpers measured up to 8e-3 per flip at 8 bits, so up to ~0.13-0.5 at 4 bits
    # (0.49 seen once, LRQ). Greedy tokens must still agree, and at most 10% of positions
    # may move at all; a wrong packing/scale/rotation moves nearly every position by O(1).
    rot = RUQuantFormat.from_dict(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    if ckpt.parent.name.startswith("converted-dimension-expansion"):
        assert rot.online_rotations["down_proj"] == RotationSpec("hadamard", 172, padded_from=170)
    if ckpt.parent.name.startswith("converted-ruquant-online-o"):  # the per-layer blocks are served
        assert rot.online_rotations["o_proj"] == RotationSpec("block_diagonal", 128, block_size=128)
        reader = CheckpointReader(ckpt)
        blocks = [reader.get(n, None) for n in reader.keys() if n.endswith("o_proj.online_rotation")]
        assert len(blocks) == 2 and any(not torch.equal(b, torch.eye(128)[None]) for b in blocks)
    if ckpt.parent.name.startswith("converted-full-range"):
        reader = CheckpointReader(ckpt)
        scales = [reader.get(n, None) for n in reader.keys() if n.endswith(".weight_scale")]
        assert any(bool((s < 0).any()) for s in scales) and all(bool((s != 0).all()) for s in scales)
    with in_process_llm(ckpt, quantization="ruquant") as llm:
        assert llm.llm_engine.model_config.quantization == "ruquant"
        check_against_simulation(llm, ckpt, PROMPTS, n_tokens=32, tol=Tolerance(flip_atol=0.8))
