"""Moving a calibration Hessian to where it is factorised, without a second full copy on the way.

A 70B down_proj's Hessian is 28672 x 28672: 3.3 GB in fp32, 6.6 GB in fp64. The converter keeps the
fp32 Hessians on the host (``convert.pipeline``); a quantizer that needs one in fp64 on the GPU gets it
here, gathered a block of rows at a time, so the device holds the fp64 result and one block, not also a
full fp32 (or permuted) copy.
"""

from __future__ import annotations

import torch


def float64_copy(hessian: torch.Tensor, device: torch.device, perm: torch.Tensor | None = None,
                 rows: int = 1024) -> torch.Tensor:
    """``hessian`` (or ``hessian[perm][:, perm]``) as a new fp64 matrix on ``device``: the same values,
    with temporaries of ``rows`` rows only."""
    k = hessian.shape[0]
    out = torch.empty(k, k, dtype=torch.float64, device=device)
    cols = None if perm is None else perm.to(hessian.device)
    for r0 in range(0, k, rows):
        block = hessian[r0:r0 + rows] if cols is None else hessian[cols[r0:r0 + rows]][:, cols]
        out[r0:r0 + rows] = block.to(device)
    return out
