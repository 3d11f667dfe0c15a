"""The default recipe per scheme: what ``ruquant-convert`` does for the flags a user leaves unset.

One ``Recipe`` names a whole conversion method (as torchao's config objects do), and
``DEFAULT_RECIPE`` holds the one measured best per scheme on SmolLM2-135M (issue 24;
docs/methods.md, "Default recipe per scheme", has the table behind every entry):

- GBS clipping and GPTQ in act order: better than off at every 4-bit scheme and at w3a3kv3.
- 60 steps of end-to-end scale tuning at w4a4kv4, w4a8 and w4a16 (three seeds each); with the
  layer norms trained too at w4a4kv4 (33.60 -> 33.04 for 3% more time; nothing at w4a16).
- Weight groups of 64 at w4a8 and w4a16, where they divide the model (``group_size_for``).
- The full-range (signed-scale) weight grid at w4a16, where it took the default below issue 24's
  22.5, and at w4a8, where its three seeds all fell below the symmetric grid's three; w4a4kv4
  keeps the symmetric grid (its seeds interleave).
- The randomized Hadamard rotation everywhere: OSTQuant (the w4a4kv4 default before scale
  tuning) and tuning together do not fit the 10-minute budget on 2 CPU cores, and tuning alone
  measured lower.

A scheme not listed (w6a6, w8a8) gets ``Recipe()``: the options gained nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_ruquant.checkpoint.models import ModelDims


@dataclass(frozen=True)
class Recipe:
    """The conversion options a scheme defaults to; every field is one ``ruquant-convert`` flag."""

    rotation: str = "hadamard"  # --rotation
    clip: str = "none"  # --clip auto
    act_order: bool = False  # --act-order (GPTQ)
    group_size: int = -1  # --group-size; -1: per output channel
    tune_scales: int = 0  # --tune-scales (Adam steps; 0: off)
    tune_norms: bool = False  # --tune-norms
    full_range: bool = False  # --full-range

    def group_size_for(self, dims: ModelDims, tp_size: int = 1) -> int:
        """The recipe's group size where it divides every linear input (and its tensor-parallel
        shard), per output channel (-1) otherwise: a default must convert every supported model."""
        g = self.group_size
        if g == -1 or tp_size < 1:
            return -1
        inputs = (dims.hidden_size, dims.attention_size // tp_size, dims.intermediate_size // tp_size)
        return g if all(k % g == 0 for k in inputs) else -1


GBS_ACT_ORDER = Recipe(clip="gbs", act_order=True)
TUNED = replace(GBS_ACT_ORDER, tune_scales=60)
TUNED_NORMS = replace(TUNED, tune_norms=True)
GROUPED_TUNED_FULL_RANGE = replace(TUNED, group_size=64, full_range=True)

DEFAULT_RECIPE: dict[str, Recipe] = {
    "w4a4kv4": TUNED_NORMS,
    "w4a4": GBS_ACT_ORDER,
    "w4a8": GROUPED_TUNED_FULL_RANGE,
    "w4a8kv4": GBS_ACT_ORDER,
    "w4a16": GROUPED_TUNED_FULL_RANGE,
    "w3a3kv3": Recipe(clip="gbs"),
}


def recipe_for(scheme: str) -> Recipe:
    """The scheme's default recipe; the plain one (Hadamard + GPTQ, nothing else) where none was measured better."""
    return DEFAULT_RECIPE.get(scheme, Recipe())


def schemes_where(field: str) -> list[str]:
    """The schemes whose default sets ``field`` away from the plain recipe's value (for the flags' help)."""
    plain = getattr(Recipe(), field)
    return [k for k, r in DEFAULT_RECIPE.items() if getattr(r, field) != plain]
