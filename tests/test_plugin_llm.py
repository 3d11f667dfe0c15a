"""vllm.LLM(..., quantization="ruquant") on the CPU matches the simulated-quantized forward.

One engine for the module (engine start dominates the wall time). Checkpoint: tiny random
Llama, w4a4, per-channel weight scales, Hadamard online rotation on down_proj.
"""

from __future__ import annotations

import pytest

from convert.tiny_models import make_tiny_llama
from plugin_helpers import check_against_simulation, in_process_llm, write_ruquant_checkpoint
from vllm_ruquant.checkpoint.format import ActivationSpec, RotationSpec, RUQuantFormat, WeightSpec

pytestmark = pytest.mark.vllm

INTERMEDIATE = 256
PROMPTS = [list(range(5, 25)), [3, 100, 200, 300, 7]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_llm")
    make_tiny_llama(root / "src", intermediate_size=INTERMEDIATE, arch="llama", seed=0)
    fmt = RUQuantFormat(weight=WeightSpec(bits=4), activation=ActivationSpec(bits=4),
                        online_rotations={"down_proj": RotationSpec("hadamard", INTERMEDIATE)})
    return write_ruquant_checkpoint(root / "src", root / "w4a4", fmt)


@pytest.fixture(scope="module")
def llm(ckpt):
    with in_process_llm(ckpt, quantization="ruquant") as engine:
        yield engine


def test_quant_method_is_ruquant(llm):
    assert llm.llm_engine.model_config.quantization == "ruquant"


def test_w4a4_matches_simulation(llm, ckpt):
    check_against_simulation(llm, ckpt, PROMPTS, n_tokens=32)


def test_text_generation_runs(llm):
    from vllm import SamplingParams

    out = llm.generate(["Hello world, the quick"], SamplingParams(temperature=0.0, max_tokens=8),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) > 0
