"""The Triton backend (fused rotate+quantize, then the GEMMs) in Triton's CPU interpreter.

The GPU tests (``test_kernels_gpu.py``) check the compiled kernels; these check, on any machine,
the backend's own logic around them: which path a layer takes, K zero-padded to the GEMM tile
for sizes such as 344, 172 or 576 (issue 20), weight groups padded with zero-weight groups,
and bf16 activations. Zeros change no absmax, product or sum, so a padded layer must give the
reference's result exactly wherever the rotation is exact (none, or a power-of-two Hadamard).
"""

from __future__ import annotations

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
]


# Triton 3.x's interpreter miscomputes a bf16 ``tl.dot`` on values cast to bf16 inside the kernel
# (the W4A16 kernel's dequantized weights; a 16x16 probe is off by 1e10), so weight-only layers
# run here in fp16 only; the GPU tests run them in bf16.
PARAMS = [pytest.param(case, dtype, id=f"{'-'.join(map(str, case))}-{str(dtype)[6:]}")
          for case in CASES for dtype in (torch.bfloat16, torch.float16)
          if not (case[1] >= 16 and dtype == torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_triton_backend_equals_the_reference(triton_interpreter: None, case: tuple, dtype: torch.dtype) -> None:
    from vllm_ruquant.kernels import TritonBackend
    from vllm_ruquant.kernels.backend import _path, padded_k

    wb, ab, g, rot_kind, k, n = case
    rot = ref.OnlineRotation("hadamard", k) if rot_kind == "hadamard" else None
    spec = LinearSpec(k, n, wb, g, ab, clip_ratio=0.95 if ab == 4 else 1.0, rotation=rot)
    assert _path(spec) != "reference", "an odd K must take a kernel path, padded"
    assert padded_k(spec) % 128 == 0 and padded_k(spec) - k < 128 * max(1, g // 64)
    gen = torch.Generator().manual_seed(k + n + wb + ab)
    w_q, w_s = ref.quantize_weight(torch.randn(n, k, generator=gen), wb, g)
    qweight = ref.pack_weight(w_q, wb)
    bias = torch.randn(n, generator=gen).to(dtype)
    x = (torch.randn(2, 3, k, generator=gen) * (1 + 3 * torch.rand(2, 3, 1, generator=gen))).to(dtype)

    expected = ReferenceBackend().apply(spec, ReferenceBackend().prepare(spec, qweight, w_s), x, bias)
    backend = TritonBackend()
    got = backend.apply(spec, backend.prepare(spec, qweight, w_s), x, bias)

    assert got.shape == expected.shape == (2, 3, n) and got.dtype == expected.dtype == dtype
    assert torch.isfinite(got).all()
    exact = ab < 16 and (rot is None or factor_size(k)[0] == 1)
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
