"""The Triton backend (fused rotate+quantize, then the GEMMs) in Triton's CPU interpreter.

The GPU tests (``test_kernels_gpu.py``) check the compiled kernels; these check, on any machine,
the backend's own logic around them: which path a layer takes, K zero-padded to the GEMM tile
for sizes such as 344, 172 or 576 (issue 20), weight groups padded with zero-weight groups,
and bf16 activations. Zeros change no absmax, product or sum, so a padded layer must give the
reference's result exactly wherever the rotation is exact (none, or a power-of-two Hadamard).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.hadamard import factor_size
from vllm_ruquant.linear_backend import LinearSpec, ReferenceBackend

# (weight bits, act bits, group, rotation, K, N): odd K first, then ones that tile already
CASES = [
    (4, 4, -1, "hadamard", 344, 48),  # H_344 (Paley), K padded to 384
    (4, 8, -1, "hadamard", 344, 48),
    (4, 16, -1, "hadamard", 344, 48),
    (4, 4, -1, None, 172, 32),  # padded to 256
    (4, 4, 64, None, 576, 32),  # 9 groups of 64, padded to 10 (640)
    (4, 8, -1, "hadamard", 576, 32),  # H_36 (x) H_16
    (4, 16, 64, None, 576, 32),
    (8, 8, -1, None, 576, 32),
    (4, 4, 128, "hadamard", 1536, 32),  # H_12 (x) H_128, tiles already
    (4, 4, -1, "hadamard", 256, 32),  # exact power-of-two Hadamard
    (4, 4, -1, None, 512, 48),  # no rotation: decode sizes quantize inside the GEMM (a_mode 2)
    (4, 8, 128, None, 384, 32),
]


# Triton 3.x's interpreter miscomputes a bf16 ``tl.dot`` on values cast to bf16 inside the kernel
# (the W4A16 kernel's dequantized weights; a 16x16 probe is off by 1e10), so weight-only layers
# run here in fp16 only; the GPU tests run them in bf16.
PARAMS = [pytest.param(case, dtype, id=f"{'-'.join(map(str, case))}-{str(dtype)[6:]}")
          for case in CASES for dtype in (torch.bfloat16, torch.float16)
          if not (case[1] >= 16 and dtype == torch.bfloat16)]


# issue 24's served forms: per-layer RUQuant blocks (a block-diagonal online rotation, rotated inside
# rotate_quant) and the full-range weight grid of the w4a8 / w4a16 defaults (a group's scale is negative
# where its largest weight is); (weight bits, act bits, group, rotation, K, N, full range)
ISSUE_24_CASES = [
    (4, 4, -1, "block_diagonal", 256, 32, False),  # two blocks of 128
    (4, 8, 64, None, 576, 32, True),  # the w4a8 default: groups of 64, signed scales, K padded
    (4, 4, -1, "hadamard", 256, 32, True),
    (4, 16, 64, "hadamard", 576, 32, True),  # the w4a16 default (fp16 here, see PARAMS)
]


def _rotation(kind: str | None, k: int, gen: torch.Generator) -> ref.OnlineRotation | None:
    if kind == "hadamard":
        return ref.OnlineRotation("hadamard", k)
    if kind == "block_diagonal":
        blocks = torch.linalg.qr(torch.randn(k // 128, 128, 128, generator=gen, dtype=torch.float64))[0]
        return ref.OnlineRotation("block_diagonal", k, blocks.float())
    return None


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_triton_backend_equals_the_reference(triton_interpreter: None, case: tuple, dtype: torch.dtype) -> None:
    _check_triton_backend(case, dtype)


@pytest.mark.parametrize("case", ISSUE_24_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_backend_serves_the_issue_24_forms(triton_interpreter: None, case: tuple) -> None:
    *layer, full_range = case
    _check_triton_backend(tuple(layer), torch.float16, full_range)


def _check_triton_backend(case: tuple, dtype: torch.dtype, full_range: bool = False) -> None:
    """The Triton backend against the reference backend on one layer ``case`` (as in CASES)."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels.backend import _path, padded_k

    wb, ab, g, rot_kind, k, n = case
    gen = torch.Generator().manual_seed(k + n + wb + ab)
    rot = _rotation(rot_kind, k, gen)
    spec = LinearSpec(k, n, wb, g, ab, clip_ratio=0.95 if ab == 4 else 1.0, rotation=rot)
    assert _path(spec) != "reference", "an odd K must take a kernel path, padded"
    assert padded_k(spec) % 128 == 0 and padded_k(spec) - k < 128 * max(1, g // 64)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), wb, g, full_range=full_range)
    if full_range:  # the served form under test: about half the scales negative
        assert 0.25 < (w_s < 0).float().mean() < 0.75
    qweight = ref.pack_weight(w_q, wb)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = (torch.randn(2, 3, k, generator=gen) * (1 + 3 * torch.rand(2, 3, 1, generator=gen))).to(dtype)

    expected = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, bias)
    backend = TritonBackend()
    got = backend.apply(spec, backend.prepare(spec, qweight, w_s), x, bias)

    assert got.shape == expected.shape == (2, 3, n) and got.dtype == expected.dtype == dtype
    assert torch.isfinite(got).all()
    exact = ab < 16 and (rot is None or (rot.kind == "hadamard" and factor_size(k)[0] == 1))
    if exact and dtype == torch.float16:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    elif exact:  # the interpreter casts fp32 -> bf16 by truncation: one bf16 step (the GPU test: exact)
        torch.testing.assert_close(got, expected, rtol=2.0**-7, atol=0)
    else:  # dense H_m factor: an integer may differ by one step; weight-only: half-precision products
        rel = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
        assert rel < 2e-2, f"relative error {rel:.2e}"


def test_small_weight_groups_keep_the_reference_path(triton_interpreter: None) -> None:
    """Groups that are not a multiple of 64 have no kernel tiling: the reference math, same numbers."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels.backend import _path

    spec = LinearSpec(256, 32, 4, 32, 4, rotation=None)
    assert _path(spec) == "reference"
    w_q, w_s = ref.quantize_weight(torch.randn(32, 256), 4, 32)
    qweight = ref.pack_weight(w_q, 4)
    x = torch.randn(5, 256).to(torch.float16)
    backend = TritonBackend()
    got = backend.apply(spec, backend.prepare(spec, qweight, w_s), x, None)
    expected = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 6, 16, 17])
@pytest.mark.parametrize("bits,group", [(4, -1), (8, 128)])
def test_decode_sizes_quantize_inside_the_gemm(triton_interpreter: None, monkeypatch, m: int, bits: int,
                                               group: int) -> None:
    """Up to FUSED_QUANT_MAX_M tokens an un-rotated layer is one launch (qgemm a_mode 2), above it
    rotate_quant + qgemm; both give the reference's result exactly (same integers and scales)."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels import backend as backend_mod

    calls: list[int] = []
    real_qgemm = backend_mod.qgemm

    def spy(*args, **kwargs):
        calls.append(kwargs["a_mode"])
        return real_qgemm(*args, **kwargs)

    monkeypatch.setattr(backend_mod, "qgemm", spy)
    # qgemm's own in-kernel quantization (off by default where the GEMV does not serve)
    monkeypatch.setattr(backend_mod, "GEMV", False)
    monkeypatch.setattr(backend_mod, "FUSED_QUANT_MAX_M", 16)
    k, n = 384, 32
    spec = LinearSpec(k, n, 4, group, bits, clip_ratio=0.9, rotation=None)
    gen = torch.Generator().manual_seed(m * 10 + bits)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), 4, group)
    qweight = ref.pack_weight(w_q, 4)
    x = (torch.randn(m, k, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    backend = TritonBackend()
    got = backend.apply(spec, backend.prepare(spec, qweight, w_s), x, bias)
    expected = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, bias)
    assert calls == [2 if m <= backend_mod.FUSED_QUANT_MAX_M else 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_autotune_is_on_unless_turned_off(monkeypatch) -> None:
    """One switch for every M bucket, the decode one too (its first config was 29% slower at M = 16)."""
    from vllm_ruquant.kernels import gemm

    monkeypatch.setattr(gemm, "_INTERPRET", False)
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "1")
    assert gemm._autotune_enabled()
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "0")
    assert not gemm._autotune_enabled()
    monkeypatch.setenv("RUQUANT_AUTOTUNE", "1")
    monkeypatch.setattr(gemm, "_INTERPRET", True)  # the interpreter runs the heuristic configs
    assert not gemm._autotune_enabled()


@pytest.mark.parametrize("k", [28 * 512, 36 * 16, 12 * 128, 20 * 64])
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("rows_per_program", [0, 8])
def test_decode_kronecker_rotation_spread_over_programs(triton_interpreter: None, monkeypatch, k: int, m: int,
                                                        rows_per_program: int) -> None:
    """Decode sizes spread H_m (x) H_p over programs (``rotate_rows``: a few rows of the (m, p) view
    each, mixed by H_m first, then the butterflies) and quantize in chunks on the programs' maxima:
    the reference's rotation to fp32 rounding, also where the rows do not divide evenly (8 of 12, 20,
    28, 36), and the reference's integers up to a rare one-step rounding difference."""
    from vllm_ruquant.kernels import rotate_quant as rq

    monkeypatch.setattr(rq, "KRON_ROWS_PER_PROGRAM", rows_per_program)
    gen = torch.Generator().manual_seed(k + m)
    x = (torch.randn(m, k, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))).to(torch.bfloat16)
    rot = ref.OnlineRotation("hadamard", k)
    assert rq.kron_rows_apply(x, rot)
    y, amax = rq.rotate_rows(x, rot)
    y_ref = rot.apply(x)
    assert y.dtype == torch.float32 and y.shape == (m, k)
    assert torch.equal(amax.amax(dim=1), y.abs().amax(dim=1))  # the programs' maxima make the token's
    assert ((y - y_ref).abs().max() / y_ref.abs().max()).item() < 1e-6
    for bits, pack in ((4, True), (8, False)):
        q, s = rq.rotate_quant(x, bits, 0.9, rot, pack=pack)
        q_ref, s_ref = ref.quantize_activation(y_ref, bits, 0.9)
        q_int = (ref.unpack_int4(q) if pack else q).int()
        diff = (q_int - q_ref.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-2
        torch.testing.assert_close(s, s_ref.reshape(s.shape).float(), rtol=1e-6, atol=0)
    y16, none = rq.rotate_quant(x, 16, rotation=rot)  # weight-only layers: the rotation in x's dtype
    assert none is None and y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y_ref.to(torch.bfloat16).float(), rtol=2.0**-7, atol=1e-6)


@pytest.mark.parametrize("act_bits", [4, 8])
def test_decode_token_of_a_kronecker_layer_takes_the_gemv(triton_interpreter: None, monkeypatch,
                                                          act_bits: int) -> None:
    """One token through a down_proj-like layer (H_12 (x) H_128): ``rotate_rows``, the plain quantization,
    then the GEMV on the int8-held integers; the reference's result up to one-step integer differences."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels import backend as be

    calls: list[tuple[torch.dtype, int]] = []
    qgemv = be.gemv.qgemv
    monkeypatch.setattr(be.gemv, "qgemv", lambda a, *args, **kw: calls.append((a.dtype, kw["a_mode"])) or
                        qgemv(a, *args, **kw))

    k, n = 12 * 128, 64
    rot = ref.OnlineRotation("hadamard", k)
    spec = LinearSpec(k, n, 4, -1, act_bits, clip_ratio=0.95, rotation=rot)
    gen = torch.Generator().manual_seed(act_bits)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), 4, -1)
    x = torch.randn(1, k, generator=gen).to(torch.float16)
    assert be.GEMV and be.TritonBackend._fuses_quantization(1, k, -1)
    expected = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, ref.pack_weight(w_q, 4), w_s), x, None)
    backend = TritonBackend()
    got = backend.apply(spec, backend.prepare(spec, ref.pack_weight(w_q, 4), w_s), x, None)
    rel = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert got.shape == (1, n) and rel < 2e-2, f"relative error {rel:.2e}"
    assert calls == [(torch.int8, 0)]


class _LayerStub(torch.nn.Module):
    """What ``RUQuantLinearMethod.process_weights_after_loading`` leaves on a vLLM linear layer."""

    def __init__(self, backend, spec: LinearSpec, prepared: dict[str, torch.Tensor]) -> None:
        from vllm_ruquant.linear import attach_prepared

        super().__init__()
        attach_prepared(self, backend, spec, prepared)


@pytest.mark.parametrize("act_bits,group,tokens", [(4, -1, 1), (4, -1, 5), (8, 128, 3)])
def test_compiled_layer_quantizes_in_the_graph(triton_interpreter: None, monkeypatch, act_bits: int, group: int,
                                               tokens: int) -> None:
    """By default (``RUQUANT_GRAPH_QUANT=0`` turns it off), under torch.compile an un-rotated W4A4 / W4A8
    layer quantizes its activations with torch ops (for Inductor to fuse into the RMSNorm before it) and runs
    ``ruquant::int_linear`` on the integers; loading such a layer makes Inductor round like eager, so the
    result is the reference's exactly. Eager it stays one ``ruquant::linear`` call, exactly as well."""
    import torch._inductor.config as inductor_config
    from torch._inductor.virtualized import V

    from vllm_ruquant import ops
    from vllm_ruquant.kernels import TritonBackend, inductor_setup
    from vllm_ruquant.kernels import backend as be
    from vllm_ruquant.linear import RUQuantLinearMethod

    k, n = 512, 48
    spec = LinearSpec(k, n, 4, group, act_bits, clip_ratio=0.9)
    assert TritonBackend().quantizes_in_graph(spec) == be.GRAPH_QUANT  # on unless RUQUANT_GRAPH_QUANT=0
    monkeypatch.setattr(be, "GRAPH_QUANT", False)
    assert not TritonBackend().quantizes_in_graph(spec)
    monkeypatch.setattr(be, "GRAPH_QUANT", True)
    assert not TritonBackend().quantizes_in_graph(
        LinearSpec(k, n, 4, group, act_bits, rotation=ref.OnlineRotation("hadamard", k)))
    gen = torch.Generator().manual_seed(act_bits + tokens)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), 4, group)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    gamma = (torch.rand(k, generator=gen) + 0.5).to(torch.float16)
    h = (torch.randn(tokens, k, generator=gen) * 3).to(torch.float16)
    ref_backend = ReferenceBackend()
    ref_prepared = ref_backend.prepare(spec, ref.pack_weight(w_q, 4), w_s)

    with inductor_config.patch(emulate_precision_casts=False):  # restored afterwards
        backend = TritonBackend()
        layer = _LayerStub(backend, spec, backend.prepare(spec, ref.pack_weight(w_q, 4), w_s))
        assert layer.ruquant_graph_quant and inductor_config.emulate_precision_casts  # set at load time
        assert isinstance(V.choices, inductor_setup.RowPersistentChoices)  # norm + quantization rows in one pass
        backend = ops._KINDS[layer.ruquant_kind_id].backend  # the op runs the first backend of this kind
        paths: list[str] = []
        for name in ("apply", "apply_quantized"):
            fn = getattr(backend, name)
            monkeypatch.setattr(backend, name, lambda *a, fn=fn, name=name, **kw: paths.append(name) or fn(*a, **kw))

        def norm_then_layer(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hf = h.float()
            x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * gamma
            return RUQuantLinearMethod.apply(None, layer, x, bias), x

        torch._dynamo.reset()
        got, x = torch.compile(norm_then_layer, fullgraph=True)(h)
        assert paths == ["apply_quantized"]
        torch.testing.assert_close(got, ref_backend.apply(spec, ref_prepared, x, bias), rtol=0, atol=0)
        eager, x_eager = norm_then_layer(h)
        assert paths == ["apply_quantized", "apply"]
        torch.testing.assert_close(eager, ref_backend.apply(spec, ref_prepared, x_eager, bias), rtol=0, atol=0)


@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_compiled_quantization_keeps_the_integers(clip: float) -> None:
    """``reference.quantize_activation`` compiled by Inductor (fused, as in a served model) gives the
    eager integers, and scales within one ulp."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 4096, generator=gen) * (1 + 5 * torch.rand(9, 1, generator=gen))).to(torch.float16)
    q, s = ref.quantize_activation(x, 4, clip)
    q_c, s_c = torch.compile(ref.quantize_activation, fullgraph=True)(x, 4, clip)
    torch.testing.assert_close(s_c, s, rtol=2.0**-23, atol=0)
    assert (q_c.int() - q.int()).abs().max() <= 1 and (q_c != q).float().mean() < 1e-3


@pytest.mark.parametrize("emulate", [False, True])
def test_compiled_norm_then_quantization_against_eager(emulate: bool) -> None:
    """What ``RUQUANT_GRAPH_QUANT=1`` needs to match the simulation: fused behind a bf16 RMSNorm, Inductor
    quantizes the norm's unrounded fp32 output (a few integers and the scales differ from eager's),
    unless ``emulate_precision_casts`` makes it round to bf16 first: then the integers are eager's."""
    import torch._inductor.config as inductor_config

    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(16, 4096, generator=gen) * 3).to(torch.bfloat16)
    gamma = (torch.rand(4096, generator=gen) + 0.5).to(torch.bfloat16)

    def norm_then_quantize(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hf = h.float()
        x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * gamma
        return (*ref.quantize_activation(x, 4, 0.9), x)

    torch._dynamo.reset()
    with inductor_config.patch(emulate_precision_casts=emulate):
        q, s, x = torch.compile(norm_then_quantize, fullgraph=True)(h)
    q_eager, s_eager = ref.quantize_activation(x, 4, 0.9)
    mismatched = int((q != q_eager).sum())
    if emulate:
        assert mismatched == 0 and torch.equal(s, s_eager)
    else:  # measured: 173 of 65536 integers, scales up to 0.3% off
        assert 0 < mismatched < q.numel() // 100 and (q.int() - q_eager.int()).abs().max() <= 1


def _random_weights(spec: LinearSpec) -> tuple[torch.Tensor, torch.Tensor]:
    w_q, w_s = ref.quantize_weight(torch.randn(spec.out_features, spec.in_features), spec.weight_bits,
                                   spec.group_size)
    return ref.pack_weight(w_q, spec.weight_bits), w_s


def _recording_backend(monkeypatch):
    """A TritonBackend whose matrix kernels only record what they were called with."""
    from vllm_ruquant.kernels import TritonBackend, gemm
    from vllm_ruquant.kernels import backend as be

    calls: list[tuple] = []
    monkeypatch.setattr(gemm, "_autotune_enabled", lambda: True)  # as on a GPU (the interpreter never tunes)
    monkeypatch.setattr(be, "_PRETUNED", set())
    monkeypatch.setattr(TritonBackend, "_int_gemm", lambda self, spec, a, s, prepared, **kw: calls.append(
        ("int", tuple(a.shape), a.dtype, s.dtype, kw["a_mode"], kw["b_mode"], kw["out_dtype"], kw["bias"] is None)))
    monkeypatch.setattr(be, "w4a16_gemm", lambda x, w, s, **kw: calls.append(("w4a16", tuple(x.shape), x.dtype)))
    return TritonBackend(), calls


def test_warm_up_tunes_every_bucket_a_step_reaches_once_per_shape(triton_interpreter: None, monkeypatch) -> None:
    """At load, each layer shape's GEMM runs once in every M bucket up to the engine's largest step, with the
    arguments a served call passes (int8 rows, fp32 scales, the model dtype): the autotuner's keys are then
    the served ones and no request waits for it. Once per shape; nothing when autotuning or the switch is off."""
    from vllm_ruquant.kernels import backend as be

    backend, calls = _recording_backend(monkeypatch)
    w4a4 = LinearSpec(in_features=256, out_features=128, weight_bits=4, group_size=-1, act_bits=4)
    prepared = backend.prepare(w4a4, *_random_weights(w4a4))
    assert backend.warm_up(w4a4, prepared, max_tokens=3000, dtype=torch.bfloat16) == 9
    assert [c[1] for c in calls] == [(m, 256) for m in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
    assert all(c[2:] == (torch.int8, torch.float32, 0, 2, torch.bfloat16, True) for c in calls)
    assert backend.warm_up(w4a4, prepared, max_tokens=3000, dtype=torch.bfloat16) == 0  # this shape is tuned
    other = LinearSpec(in_features=256, out_features=384, weight_bits=4, group_size=-1, act_bits=4)
    assert backend.warm_up(other, backend.prepare(other, *_random_weights(other)), max_tokens=16,
                           dtype=torch.bfloat16) == 1
    w4a16 = LinearSpec(in_features=256, out_features=128, weight_bits=4, group_size=128, act_bits=16)
    calls.clear()
    assert backend.warm_up(w4a16, backend.prepare(w4a16, *_random_weights(w4a16)), max_tokens=100,
                           dtype=torch.float16) == 4
    assert calls == [("w4a16", (m, 256), torch.float16) for m in (16, 32, 64, 128)]
    assert backend.warm_up(dataclasses.replace(w4a16, out_features=64), {}, max_tokens=16, dtype=torch.float32) == 0
    monkeypatch.setattr(be, "PRETUNE", False)  # RUQUANT_PRETUNE=0
    assert backend.warm_up(other, {}, max_tokens=16, dtype=torch.float16) == 0


def test_loading_a_layer_warms_it_up_for_the_engines_batch(vllm_ctx, monkeypatch) -> None:
    """``process_weights_after_loading`` hands the backend the step size and dtype of the engine config it
    loads under (vLLM's --max-num-batched-tokens, --dtype)."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_ruquant import ops
    from vllm_ruquant.checkpoint.format import scheme_format
    from vllm_ruquant.config import RUQuantConfig

    seen: list[tuple] = []

    class Recording(ReferenceBackend):
        def warm_up(self, spec, prepared, *, max_tokens, dtype, bias=None):
            seen.append((spec.in_features, max_tokens, dtype))
            return 0

    monkeypatch.setattr(ops, "select_backend", lambda device: Recording())
    get_current_vllm_config().scheduler_config.max_num_batched_tokens = 4096
    cfg = RUQuantConfig.from_config(scheme_format("w4a8").to_dict())
    layer = RowParallelLinear(256, 64, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    layer.quant_method.process_weights_after_loading(layer)
    assert seen == [(256, 4096, torch.bfloat16)]
