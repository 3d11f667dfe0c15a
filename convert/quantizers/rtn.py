"""Round-to-nearest: the reference quantizer, no calibration needed."""

from __future__ import annotations

import torch

from convert.clip import static_scale
from vllm_ruquant.reference import quantize_weight_with_scale


class RTNQuantizer:
    name = "rtn"
    needs_hessian = False

    def __init__(self, clip: str = "none", full_range: bool = False) -> None:
        self.clip = clip  # "gbs": per-channel clip ratios searched under H (plain MSE without H)
        self.full_range = full_range  # the scale's sign puts each group's largest weight on -2^(bits-1)

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        scale = static_scale(w, bits, group_size, hessian, self.clip, self.full_range)
        return quantize_weight_with_scale(w, scale, bits, group_size), scale
