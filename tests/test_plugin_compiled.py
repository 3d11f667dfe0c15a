"""The ruquant linear op inside vLLM's compiled graph (not eager): served == simulated.

Every other CPU engine test runs ``enforce_eager``; on the GPU vLLM compiles the model, and
the ``ruquant::linear`` op is then called from a Dynamo graph with a kind id shared by the
layers of one shape and each layer's own tensors (``ops.register_layer``). The checkpoint
has a block-diagonal down_proj rotation with different blocks in each layer, so serving a
layer with another layer's blocks would move every logprob.
"""

from __future__ import annotations

import pytest

from convert.tiny_models import make_tiny_llama
from plugin_helpers import check_against_simulation, in_process_llm, write_ruquant_checkpoint
from vllm_ruquant.checkpoint.format import ActivationSpec, RotationSpec, RUQuantFormat, WeightSpec

pytestmark = pytest.mark.vllm

INTERMEDIATE = 256
PROMPTS = [list(range(5, 25)), [3, 100, 200, 300, 7]]


def test_compiled_engine_matches_simulation(tmp_path):
    make_tiny_llama(tmp_path / "src", intermediate_size=INTERMEDIATE, arch="llama", seed=0)
    fmt = RUQuantFormat(weight=WeightSpec(bits=4), activation=ActivationSpec(bits=8),
                        online_rotations={"down_proj": RotationSpec("block_diagonal", INTERMEDIATE, 32)})
    ckpt = write_ruquant_checkpoint(tmp_path / "src", tmp_path / "w4a8", fmt, rotation_seed=3)
    with in_process_llm(ckpt, quantization="ruquant", enforce_eager=False) as llm:
        assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # a compiled graph served it
        check_against_simulation(llm, ckpt, PROMPTS, n_tokens=32)
