"""Weight quantizers: each file one method behind the ``WeightQuantizer`` interface (base.py),
registered here by name (what ``ruquant-convert --weight-quantizer`` picks from)."""

import inspect
from typing import Any

from convert.errors import ConvertError, ExitCode
from convert.quantizers.base import WeightQuantizer
from convert.quantizers.gptq import GPTQQuantizer
from convert.quantizers.lrq import LRQQuantizer
from convert.quantizers.rtn import RTNQuantizer
from convert.quantizers.septq import SEPTQQuantizer

QUANTIZERS: dict[str, type[WeightQuantizer]] = {
    q.name: q for q in (RTNQuantizer, GPTQQuantizer, SEPTQQuantizer, LRQQuantizer)
}


def get_quantizer(name: str, **options: Any) -> WeightQuantizer:
    """Instantiate a quantizer; ``options`` it does not accept are dropped.

    The pipeline passes every method-wide option (``seed``, ``clip``, ...) to whichever
    quantizer the user picked; each takes the ones that mean something to it.
    """
    if name not in QUANTIZERS:
        raise ConvertError(f"unknown weight quantizer {name!r}; choose one of {', '.join(available_quantizers())}",
                           ExitCode.UNSUPPORTED)
    cls = QUANTIZERS[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


def available_quantizers() -> list[str]:
    return sorted(QUANTIZERS)


__all__ = ["QUANTIZERS", "WeightQuantizer", "available_quantizers", "get_quantizer"]
