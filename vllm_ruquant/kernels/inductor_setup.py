"""How Inductor compiles the activation quantization that vLLM's compiled graph fuses into its norms.

With ``RUQUANT_GRAPH_QUANT`` (the default) an un-rotated W4A4 / W4A8 layer leaves its per-token
quantization to Inductor, which fuses it into the kernel that produces the activation (residual add +
RMSNorm before qkv / gate_up). Two process-wide Inductor settings, made once at load time
(``TritonBackend.prepare``; vLLM compiles at the first forward, after loading):

* ``rounds_like_eager``: the integers equal the simulation's (correctness).
* ``persistent_rows``: the norm + quantization kernel holds the whole row (speed).

Torch names moved between the releases we run (2.11 on the GPU machines, 2.13 on the CPU wheel):
the switches are looked up here, in one place. Imported on demand (``prepare``): torch._inductor is
heavy and only a compiled model needs it.
"""

from __future__ import annotations

import logging
import os

import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.ir import ReductionHint
from torch._inductor.virtualized import V

logger = logging.getLogger(__name__)

# Rows up to this many elements reduce in one pass. Inductor's own limit for a persistent (whole-row)
# reduction is 1024, so its kernel for residual add + RMSNorm + quantize over a 4096-wide row loops three
# times over the row (sum of squares, absmax of the normed row, the integers), re-reading it from L2 each
# time: 4.8 us against 2.7 for vLLM's bf16 norm kernel at batch 1 on the H200 (gpu-2026-12-04g profile).
# ``RUQUANT_PERSISTENT_ROW_MAX=0`` keeps Inductor's choice.
PERSISTENT_ROW_MAX = int(os.environ.get("RUQUANT_PERSISTENT_ROW_MAX", "8192"))
# IEEE division in every division Inductor fuses (see ``rounds_like_eager``). ``RUQUANT_EXACT_DIVISION=0``
# leaves Triton's approximate division, which can put an element at a half step of its scale on the
# other integer than the simulation's. To be measured: between two H200 profiles (gpu-2026-12-04g ->
# 12-04h) that added this switch and the whole-row reductions, the small latency-bound Inductor kernels
# of a batch-1 step got slower (SiLU-and-mul 1.3 -> 2.5 us, o_proj's quantization 1.8 -> 4.3).
EXACT_DIVISION = os.environ.get("RUQUANT_EXACT_DIVISION", "1") != "0"


def configure_for_graph_quant() -> None:
    """Both settings (idempotent)."""
    rounds_like_eager(exact_division=EXACT_DIVISION)
    persistent_rows(PERSISTENT_ROW_MAX)


def rounds_like_eager(exact_division: bool = True) -> None:
    """Have Inductor compute as eager torch does where a quantization fused into its kernels depends on
    it: round each op's result to its dtype (``emulate_precision_casts``), so that the quantization behind
    the bf16 RMSNorm sees the simulation's bf16 activations; and divide with IEEE rounding (Triton's
    ``/`` is an approximate division, ``div.full.f32``), so that ``x / scale`` rounds to the integers the
    simulation's division gives. Process-wide, so the model's other fused ops compute like eager too (a
    few more instructions per division). The division switch moved between torch releases:
    ``emulate_divison_rounding`` (sic) up to 2.11 (the GPU machines), ``eager_numerics.division_rounding``
    later (the CPU wheel, where the CPU code generator divides exactly anyway). ``exact_division=False``
    leaves the division switch as it is."""
    if not inductor_config.emulate_precision_casts:
        inductor_config.emulate_precision_casts = True
        logger.info("ruquant: quantization in the compiled graph: Inductor emulates precision casts (bf16 rounding "
                    "as eager)")
    if not exact_division:
        logger.warning("ruquant: RUQUANT_EXACT_DIVISION=0: compiled quantization divides approximately; an "
                       "element at a half step of its scale may round to another integer than the simulation's")
        return
    numerics = getattr(inductor_config, "eager_numerics", None)
    if numerics is not None and hasattr(numerics, "division_rounding"):
        numerics.division_rounding = True
    elif hasattr(inductor_config, "emulate_divison_rounding"):
        inductor_config.emulate_divison_rounding = True
    else:
        logger.warning("ruquant: this torch has no Inductor switch for IEEE division; compiled quantization may "
                       "round a value at a half step differently from the simulation")


def persistent_rows(row_max: int) -> bool:
    """Let Inductor reduce rows of up to ``row_max`` elements in one pass (``RowPersistentChoices``).

    Installed as this thread's Inductor choices handler, the extension point Inductor offers for its
    heuristics; vLLM loads and compiles the model in the same thread. Leaves a handler someone else
    installed alone (returns False then, and when ``row_max`` is 0)."""
    if row_max <= 0:
        return False
    current = V.choices
    if isinstance(current, RowPersistentChoices):
        current.row_max = row_max
        return True
    if type(current) is not InductorChoices:
        logger.warning("ruquant: Inductor choices handler %s already installed; norm + quantization rows keep "
                       "its reduction heuristics", type(current).__name__)
        return False
    V.set_choices_handler(RowPersistentChoices(row_max))
    logger.info("ruquant: Inductor reduces rows of up to %d elements in one pass (norm + quantization)", row_max)
    return True


class RowPersistentChoices(InductorChoices):
    """Inductor's heuristics, except that a row reduction (reduction hint INNER) whose length is known
    to be at most ``row_max`` is persistent: one program holds the row in registers and reads it once.
    Module level, so Inductor's cache can pickle it."""

    def __init__(self, row_max: int) -> None:
        super().__init__()
        self.row_max = row_max

    def should_use_persistent_reduction(self, *args, **kwargs) -> bool:  # noqa: ANN002, ANN003
        """Inductor's answer, widened to whole rows of up to ``row_max``. Takes Inductor's arguments as they
        come ``(features, cooperative_reduction)``, by position or name, so that a torch whose call differs
        falls back to Inductor's own answer instead of failing the model's compilation."""
        if super().should_use_persistent_reduction(*args, **kwargs):
            return True
        features = args[0] if args else kwargs.get("features")
        cooperative = args[1] if len(args) > 1 else kwargs.get("cooperative_reduction", False)
        if cooperative or not inductor_config.triton.persistent_reductions:
            return False
        try:
            inner = features.get_reduction_hint() == ReductionHint.INNER
            numel = int(features.reduction_numel)  # TypeError when symbolic: not a row we widen
        except (AttributeError, TypeError):
            return False
        return inner and numel <= self.row_max
