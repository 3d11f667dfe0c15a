"""GBS: gradual binary search of clipping ratios (weights per output channel, activations, KV).

Clipping trades rounding error (finer grid) for clipping error (outliers saturate). The
error as a function of the ratio is roughly unimodal but noisy, so a plain bisection can
lock onto a wrong side; the gradual binary search evaluates a coarse grid first, then
repeatedly halves the step around the best ratio found so far. Each round costs a few
objective evaluations, and the whole search is vectorised over independent problems
(one ratio per output channel for weights), which keeps it cheap enough to run per layer.

* Weights: per output channel ratio minimising the layer output error ``dw H dw^T``
  (exactly separable per row, so every row gets its own optimum; the served format stores
  per-row scales, so per-row clipping costs nothing at run time).
* Activations: the format has ONE ``activation.clip_ratio`` per model, so the search picks
  one global ratio minimising the summed relative error of every linear site's served input
  on calibration data (per-site optima of the first layers are reported alongside: if they
  spread widely, a per-site ``clip_ratio`` in the format would pay off).
* KV: per-model K and V ratios for the simulated KV quantizer (``convert.simulate``); the
  format has no field for them yet, so they are reported, not served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from convert.hessian import float64_copy
from vllm_ruquant import reference as ref

CLIP_METHODS = ("none", "gbs")


def gradual_binary_search(objective: Callable[[torch.Tensor], torch.Tensor], n: int, *, lo: float = 0.4,
                          hi: float = 1.0, grid: int = 7, rounds: int = 5,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``n`` independent 1-D objectives over ratios in ``[lo, hi]``.

    ``objective(r)`` takes ratios ``(n,)`` and returns errors ``(n,)``. Returns the best
    ratios and their errors. ``hi`` (no clipping) is always a candidate, so the result is
    never worse than not clipping.
    """
    cands = torch.linspace(lo, hi, grid, dtype=torch.float64, device=device)
    best_r = torch.full((n,), hi, dtype=torch.float64, device=device)
    best_e = objective(best_r).double()
    for c in cands[:-1]:
        r = torch.full((n,), float(c), dtype=torch.float64, device=device)
        e = objective(r).double()
        better = e < best_e
        best_r, best_e = torch.where(better, r, best_r), torch.where(better, e, best_e)
    step = (hi - lo) / (grid - 1) / 2
    for _ in range(rounds):
        for sign in (-1.0, 1.0):
            r = (best_r + sign * step).clamp(lo, hi)
            e = objective(r).double()
            better = e < best_e
            best_r, best_e = torch.where(better, r, best_r), torch.where(better, e, best_e)
        step /= 2
    return best_r, best_e


def hessian_row_errors(dw: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Per-row output error ``dw_i H dw_i^T`` (plain squared error when H is None)."""
    if hessian is None:
        return dw.pow(2).sum(1)
    return ((dw @ hessian.to(dw.dtype)) * dw).sum(1)


def search_weight_clip(w: torch.Tensor, bits: int, group_size: int, hessian: torch.Tensor | None,
                       full_range: bool = False, **search: float) -> torch.Tensor:
    """Per-output-channel clip ratios ``(N, 1)`` for RTN under the Hessian-weighted error, on
    ``reference.weight_scale``'s grid (``full_range`` as there)."""
    wd = w.double()
    h = None if hessian is None else float64_copy(hessian, w.device)

    def objective(r: torch.Tensor) -> torch.Tensor:
        q, s = ref.quantize_weight(w, bits, group_size, clip_ratio=r.float().unsqueeze(1), full_range=full_range)
        return hessian_row_errors(ref.dequantize_weight(q, s, group_size).double() - wd, h)

    ratios, _ = gradual_binary_search(objective, w.shape[0], device=w.device, **search)
    return ratios.float().unsqueeze(1)


def static_scale(w: torch.Tensor, bits: int, group_size: int, hessian: torch.Tensor | None,
                 clip: str = "none", full_range: bool = False) -> torch.Tensor:
    """The scales a quantizer fixes before it rounds (RTN, and GPTQ, SEPTQ, LRQ before their sweep or
    fit); ``full_range``: ``reference.weight_scale``'s full-range grid."""
    if clip not in CLIP_METHODS:
        raise ValueError(f"unknown clip method {clip!r}; choose one of {CLIP_METHODS}")
    ratio = search_weight_clip(w, bits, group_size, hessian, full_range) if clip == "gbs" else 1.0
    return ref.weight_scale(w, bits, group_size, ratio, full_range)


def search_kv_clip(ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], bits: int,
                   **search: float) -> tuple[float, float]:
    """K and V clip ratios minimising the relative MSE of the simulated KV quantizer.

    Keys are Hadamard-rotated over head_dim first when it is a power of two, as
    ``convert.simulate.kv_cache_quantizer`` (and the served R3) does.
    """
    def prep(k: torch.Tensor) -> torch.Tensor:
        return ref.hadamard_transform(k) if ref.is_power_of_two(k.shape[-1]) else k.float()

    def rel(ts: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(r: torch.Tensor) -> torch.Tensor:
            num = sum(float((ref.fake_quantize_activation(t, bits, float(r[0])) - t).pow(2).sum()) for t in ts)
            den = sum(float(t.pow(2).sum()) for t in ts)
            return torch.tensor([num / max(den, 1e-30)], dtype=torch.float64)
        return f

    rk, _ = gradual_binary_search(rel([prep(k) for k in ks]), 1, **search)
    rv, _ = gradual_binary_search(rel([v.float() for v in vs]), 1, **search)
    return float(rk[0]), float(rv[0])


def gbs_calibration_search(converter: Any, plan: Any, fmt: Any, h: torch.Tensor, max_seqs: int = 4,
                           max_rows: int = 512) -> dict[str, Any]:
    """GBS for activations and KV on calibration data: one fp forward of the rotated model.

    ``converter`` is a ``convert.pipeline.Converter`` (its ``_rotated_layer`` and dims),
    ``fmt`` a provisional format (for the online rotations the served inputs go through),
    ``h`` the rotated calibration embeddings. Every linear's served input is subsampled to
    ``max_rows`` tokens; the site error weights each input channel by the squared norm of
    the weight column that reads it (``diag(W^T W)``), a cheap stand-in for the output
    error that needs no weights kept around.

    Returns ``{"activation": global ratio, "activation_per_site": {...}, "kv": [k, v],
    "seconds": ...}``; ratios are 1.0 where the scheme does not quantize that tensor.
    """
    import time

    from convert.modeling import decoder_layer, rope_tables
    from convert.simulate import checkpoint_linear

    t0 = time.perf_counter()
    dims = converter.dims
    x_h = h[:max_seqs]
    rope = rope_tables(dims, x_h.shape[1], x_h.device)
    act_bits, kv_bits = fmt.activation.bits, fmt.kv_cache.bits
    sites: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for i in range(dims.num_layers):
        sd32 = {k: v.float().to(x_h.device) for k, v in converter._rotated_layer(i, plan).items()}

        def observe(prefix: str, x2: torch.Tensor, sd32: dict = sd32) -> None:
            stride = max(1, x2.shape[0] // max_rows)
            colw = sd32[f"{prefix}.weight"].pow(2).sum(0)
            sites.append((prefix, x2[::stride][:max_rows].cpu(), colw.cpu()))

        def kv_observe(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hd = k.shape[-1]
            stride = max(1, k.numel() // hd // max_rows)
            ks.append(k.reshape(-1, hd)[::stride].cpu())
            vs.append(v.reshape(-1, hd)[::stride].cpu())
            return k, v

        lin = checkpoint_linear(fmt, sd32.__getitem__, sd32.__contains__, observe=observe)
        x_h = decoder_layer(x_h, i, dims, lin, sd32.__getitem__, rope, kv_observe)
    out: dict[str, Any] = {"activation": 1.0, "activation_per_site": {}, "kv": [1.0, 1.0]}
    if act_bits < 16:
        def site_err(x: torch.Tensor, colw: torch.Tensor, r: float) -> float:
            d = ref.fake_quantize_activation(x, act_bits, r) - x
            return float((d.pow(2).sum(0) * colw).sum() / (x.pow(2).sum(0) * colw).sum().clamp_min(1e-30))

        def total(r: torch.Tensor) -> torch.Tensor:
            return torch.tensor([sum(site_err(x, cw, float(r[0])) for _, x, cw in sites)], dtype=torch.float64)

        best, _ = gradual_binary_search(total, 1)
        out["activation"] = round(float(best[0]), 6)
        for name, x, cw in sites[:7 * 2]:  # the first two layers' sites: enough to see the spread
            r, _ = gradual_binary_search(
                lambda r, x=x, cw=cw: torch.tensor([site_err(x, cw, float(r[0]))], dtype=torch.float64), 1)
            out["activation_per_site"][name] = round(float(r[0]), 4)
    if kv_bits < 16 and ks:
        out["kv"] = [round(v, 6) for v in search_kv_clip(ks, vs, kv_bits)]
    out["seconds"] = time.perf_counter() - t0
    return out
