"""Round-to-nearest: the reference quantizer, no calibration needed."""

from __future__ import annotations

import torch

from convert.clip import search_weight_clip
from vllm_ruquant.reference import quantize_weight


class RTNQuantizer:
    name = "rtn"
    needs_hessian = False

    def __init__(self, clip: str = "none") -> None:
        self.clip = clip  # "gbs": per-channel clip ratios searched under H (plain MSE without H)

    def quantize(self, w: torch.Tensor, bits: int, group_size: int,
                 hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip == "gbs":
            return quantize_weight(w, bits, group_size, clip_ratio=search_weight_clip(w, bits, group_size, hessian))
        return quantize_weight(w, bits, group_size)
