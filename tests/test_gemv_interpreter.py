"""The decode GEMV (``kernels/gemv.py``) in Triton's CPU interpreter: bit for bit ``qgemm`` and the reference.

The GEMV must return exactly what the tensor-core GEMM returns for the problems it serves (same
integers, same fp32 epilogue in the reference's order), so the backend can switch between them at any
M. Small shapes with pinned tiles cover what Llama-size shapes exercise on the GPU
(``test_kernels_gpu.py``): several channel blocks per program, K split over programs, a last block
past N, rows padded to a power of two, grouped scales, and a second call (the block counters must
come back zeroed).
"""

from __future__ import annotations

import pytest
import torch

from vllm_ruquant import reference as ref
from vllm_ruquant.linear_backend import LinearSpec, ReferenceBackend


def _problem(m: int, k: int, n: int, group: int, a_mode: int, dtype: torch.dtype, seed: int,
             full_range: bool = False):
    """(args of qgemm / qgemv, keyword args, the reference's output); ``full_range``: signed weight scales."""
    from vllm_ruquant.kernels import layout

    gen = torch.Generator().manual_seed(seed)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), 4, group, full_range=full_range)
    x = (torch.randn(m, k, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    g = k if group == -1 else group
    chunk = layout.chunk_for(k, g)
    kw = dict(K=k, group_size=g, chunk=chunk, bias=bias, out_dtype=dtype)
    if a_mode == 1:  # W4A4 with packed activations (RUQUANT_W4A4_PACKED_ACT=1)
        a_q, a_s = ref.quantize_activation(x, 4, 0.9)
        args = (ref.pack_int4(a_q), a_s[:, 0].contiguous(), ref.pack_int4(w_q), w_s)
        kw.update(a_mode=1, b_mode=1)
    elif a_mode == 0:  # int8-held activations from rotate_quant
        a_q, a_s = ref.quantize_activation(x, 8)
        args = (a_q, a_s[:, 0].contiguous(), layout.pack_chunked(w_q, chunk), w_s)
        kw.update(a_mode=0, b_mode=2)
    else:  # float activations, quantized inside the kernel (4-bit here: W4A4's decode path)
        a_q, a_s = ref.quantize_activation(x, 4, 0.9)
        args = (x, None, layout.pack_chunked(w_q, chunk), w_s)
        kw.update(a_mode=2, b_mode=2, act_bits=4, clip_ratio=0.9)
    return args, kw, ref.int_linear(a_q, a_s, w_q, w_s, group, bias, dtype)


# (M, K, N, group, a_mode, tile): K 384 is the backend's padding of 344 / 172-like sizes (3 chunks, so
# K splits into 3 programs); N past the last whole block; M = 3 and 5 are rows padded to 4 and 8.
TILE_SPLIT = dict(BN=16, BK=128, LV=16, NBP=2)  # 2..3 blocks a program, K split in 128s
TILE_LANES8 = dict(BN=8, BK=256, LV=32, NBP=3, num_warps=2)  # K over 8 lanes
TILE_TREE = dict(BN=16, BK=512, LV=16, NBP=2)  # 4 lane groups a row (2 with 4 rows held), joined
TILE_LOOP = dict(BN=16, BK=128, LV=16, NBP=2, k_loop=True)  # every K slice in one program, 2..3 blocks
TILE_LOOP_TREE = dict(BN=8, BK=256, LV=16, NBP=3, k_loop=True)  # the same, 2 lane groups a row
CASES = [
    (1, 384, 40, -1, 0, TILE_SPLIT),
    (3, 384, 40, -1, 0, TILE_LANES8),
    (4, 512, 40, -1, 0, TILE_SPLIT),
    (1, 384, 40, -1, 2, TILE_SPLIT),
    (3, 512, 24, -1, 2, TILE_LANES8),
    (4, 384, 40, -1, 2, None),  # the default tile
    (1, 512, 40, 64, 0, TILE_SPLIT),
    (4, 384, 40, 64, 2, TILE_SPLIT),
    (3, 512, 40, 128, 2, TILE_LANES8),
    (2, 256, 40, 128, 0, None),
    (3, 512, 40, -1, 1, TILE_SPLIT),
    (5, 384, 40, -1, 2, TILE_SPLIT),
    (8, 256, 24, -1, 0, None),
    (1, 512, 40, -1, 2, TILE_TREE),
    (3, 512, 40, -1, 0, TILE_TREE),
    (2, 1024, 24, -1, 1, TILE_TREE),
    (1, 384, 40, -1, 0, TILE_LOOP),
    (3, 512, 40, -1, 0, TILE_LOOP),
    (1, 1024, 40, -1, 0, TILE_LOOP_TREE),
    (2, 1024, 24, -1, 1, TILE_LOOP_TREE),
    (1, 384, 40, -1, 2, TILE_LOOP),  # float activations: k_loop ignored, K split as before
    (1, 512, 40, 64, 0, TILE_LOOP),  # weight groups: k_loop ignored
]


# the full-range weight grid (issue 24's w4a8 / w4a16 defaults): about half the scales negative
SIGNED_SCALE_CASES = [(1, 512, 40, 64, 0, TILE_SPLIT), (3, 384, 40, -1, 2, None), (2, 1024, 24, -1, 1, TILE_TREE)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}-k{}-n{}-g{}-a{}".format(*c[:5]) + ("-tile" if c[5] else ""))
def test_qgemv_equals_qgemm_and_the_reference(triton_interpreter: None, case: tuple) -> None:
    _check_qgemv(case)


@pytest.mark.parametrize("case", SIGNED_SCALE_CASES, ids=lambda c: "m{}-k{}-n{}-g{}-a{}".format(*c[:5]))
def test_qgemv_with_signed_weight_scales(triton_interpreter: None, case: tuple) -> None:
    _check_qgemv(case, full_range=True)


def _check_qgemv(case: tuple, full_range: bool = False) -> None:
    """qgemv bit for bit qgemm (twice: the block counters) and the reference, on one case of CASES."""
    from vllm_ruquant.kernels.gemm import qgemm
    from vllm_ruquant.kernels.gemv import GemvConfig, qgemv, supports

    m, k, n, group, a_mode, tile = case
    dtype = torch.float16 if (m + k) % 2 else torch.bfloat16
    args, kw, expected = _problem(m, k, n, group, a_mode, dtype, seed=m * 1000 + k + n + group, full_range=full_range)
    assert bool((args[3] < 0).any()) == full_range
    assert supports(m, k, kw["group_size"], kw["a_mode"], kw["b_mode"])
    config = GemvConfig(**tile) if tile else None
    want = qgemm(*args, **kw)
    for _ in range(2):  # the second call needs the block counters left at zero
        out = torch.full((m, n), float("nan"), dtype=dtype)
        got = qgemv(*args, **kw, config=config, out=out)
        assert got.data_ptr() == out.data_ptr() and not torch.isnan(got).any()
        assert torch.equal(got, want), f"{int((got != want).sum())} of {got.numel()} differ from qgemm"
    if dtype == torch.float16:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # the interpreter casts fp32 -> bf16 by truncation (qgemm likewise): one bf16 step
        torch.testing.assert_close(got, expected, rtol=2.0**-7, atol=0)


def test_supports_and_tiles() -> None:
    """What the GEMV serves, and how a tile is fitted to K, the groups and the activation rows."""
    from vllm_ruquant.kernels.gemv import GemvConfig, default_config, launch_shape, supports

    assert supports(1, 4096, -1, 2, 2) and supports(4, 14336, -1, 0, 2) and supports(8, 4096, 128, 1, 1)
    assert not supports(9, 4096, -1, 0, 2)  # more rows than the kernel holds
    assert not supports(1, 4096, -1, 0, 0)  # int8 weights: qgemm
    assert not supports(1, 4096, 192, 0, 2) and not supports(1, 4096, 32, 0, 2)  # groups not one lane group
    assert not supports(1, 344, -1, 0, 2)  # unpadded K
    assert not supports(1, 1 << 20, -1, 0, 2)  # int32 headroom
    # Llama-3-8B decode shapes: K split in whole chunks; one wave of programs on 132 SMs
    for m, (k, n), a_mode in [(1, (4096, 6144), 2), (1, (4096, 28672), 2), (4, (14336, 4096), 0), (4, (4096, 4096), 2),
                              (1, (14336, 4096), 0)]:
        cfg = default_config(m, n, k, a_mode)
        ls = launch_shape(cfg, m, n, k, 0, a_mode=a_mode)
        assert k % ls["BK"] == 0 and ls["BK"] % 128 == 0 and ls["SPLIT_K"] * ls["BK"] * ls.get("KSTEPS", 1) == k
        assert ls["MP"] * ls["BK"] // ls["LV"] <= 64  # activation words in registers
        assert ls["grid0"] * ls["SPLIT_K"] >= 132  # every SM has work
        # within one wave, unless the tile pins its blocks a program (down_proj at M = 1: one block a
        # program measured faster on the H200 than one wave of four)
        assert ls["grid0"] * ls["SPLIT_K"] <= 132 * cfg.ctas_per_sm or ls["NBP"] == 8 or cfg.NBP == ls["NBP"] == 1
        assert a_mode != 2 or cfg.BN * ls["NBP"] >= 256 or ls["grid0"] * ls["SPLIT_K"] < 2 * 132
    ls = launch_shape(GemvConfig(BN=64, BK=512, LV=16), 1, 4096, 384, 64, chunk=64)
    assert (ls["BK"], ls["LV"], ls["SPLIT_K"]) == (64, 8, 6)  # group 64: one group a K slice
    ls = launch_shape(GemvConfig(BN=64, BK=512, LV=32), 8, 4096, 4096, 0)
    assert ls["BK"] == 256 and ls["MP"] == 8
    loop = GemvConfig(BN=16, BK=4096, LV=128, NBP=1, k_loop=True)
    ls = launch_shape(loop, 1, 4096, 14336, 0, a_mode=0)  # down_proj: 7 slices of 2048 in one program
    assert (ls["BK"], ls["KSTEPS"], ls["SPLIT_K"], ls["grid0"]) == (2048, 7, 1, 256)
    assert launch_shape(loop, 1, 4096, 14336, 0, a_mode=2)["KSTEPS"] == 1  # float activations: split K


def test_tile_names_and_the_long_k_override(monkeypatch) -> None:
    """Every swept tile reads back from its name (what the sweep's JSON and ``RUQUANT_GEMV_LONG_K_TILE``
    carry); the override takes down_proj's decode tile only, and a bad name says what a name looks like."""
    from vllm_ruquant.kernels import gemv

    for cfg in gemv.SWEEP:
        assert gemv.GemvConfig.parse(cfg.short()) == cfg
    loop = gemv.GemvConfig(BN=32, BK=4096, LV=128, num_warps=8, NBP=1, k_loop=True)
    monkeypatch.setattr(gemv, "LONG_K_TILE", gemv.GemvConfig.parse(loop.short()))
    assert gemv.default_config(1, 4096, 14336, 0) == loop
    assert gemv.default_config(1, 6144, 4096, 0) != loop and gemv.default_config(1, 4096, 14336, 2) != loop
    with pytest.raises(ValueError, match="bn64-bk512"):
        gemv.GemvConfig.parse("bn16-kloop")


@pytest.mark.parametrize("case", [
    (4, -1, None, 172, 48),  # K padded to 256: rotate_quant into a zeroed buffer, then a_mode 0
    (8, -1, "hadamard", 256, 40),  # rotated: rotate_quant, then a_mode 0
    (4, -1, None, 384, 40),  # un-rotated: quantized inside the kernel (a_mode 2)
    (4, 64, None, 576, 32),  # 9 groups of 64 padded to 10 (640)
], ids=lambda c: "-".join(map(str, c)))
def test_backend_routes_decode_sizes_through_the_gemv(triton_interpreter: None, monkeypatch, case: tuple) -> None:
    """With RUQUANT_GEMV=1 up to GEMV_MAX_M tokens take qgemv, above it qgemm; same output as without."""
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels import backend as backend_mod
    from vllm_ruquant.kernels import gemv as gemv_mod

    ab, g, rot_kind, k, n = case
    rot = ref.OnlineRotation("hadamard", k) if rot_kind else None
    spec = LinearSpec(k, n, 4, g, ab, clip_ratio=0.9, rotation=rot)
    gen = torch.Generator().manual_seed(k + n)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), 4, g)
    qweight = ref.pack_weight(w_q, 4)
    bias = torch.randn(n, generator=gen).to(torch.float16)
    backend = TritonBackend()
    prepared = backend.prepare(spec, qweight, w_s)
    calls: list[int] = []
    real = gemv_mod.qgemv

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gemv_mod, "qgemv", spy)
    max_m = backend_mod.GEMV_MAX_M
    for m in (1, max_m, max_m + 1):
        x = (torch.randn(m, k, generator=gen) * 2).to(torch.float16)
        monkeypatch.setattr(backend_mod, "GEMV", False)
        default = backend.apply(spec, prepared, x, bias)
        monkeypatch.setattr(backend_mod, "GEMV", True)
        got = backend.apply(spec, prepared, x, bias)
        assert torch.equal(got, default), f"M={m}: the GEMV path differs from the default path"
        if rot is None:
            want = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, bias)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert calls == [1, max_m]


@pytest.mark.parametrize("m", [3, 16])
def test_every_small_gemm_tile_gives_the_same_bits(triton_interpreter: None, m: int) -> None:
    """Every tile the autotuner may pick for a few tokens (wgmma's 64 / 128 channels, mma.sync's 32; split
    K 1, 2, 4) gives ``qgemm`` the same output, bit for bit, and that is the reference's."""
    from vllm_ruquant.kernels.gemm import configs_for, qgemm

    args, kw, expected = _problem(m, 1024, 64, -1, 0, torch.float16, seed=m)
    configs = configs_for(m, 1024, kw["group_size"], kw["b_mode"], kw["chunk"])
    assert {c.kwargs["BN"] for c in configs} == {32, 64, 128} and {c.kwargs["SPLIT_K"] for c in configs} == {1, 2, 4}
    for cfg in configs:
        got = qgemm(*args, **kw, config=cfg)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda s, cfg=cfg: f"{cfg}: {s}")
