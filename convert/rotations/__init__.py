"""Rotation methods: each file one method behind the ``RotationMethod`` interface (base.py),
registered here by name (what ``ruquant-convert --rotation`` picks from)."""

from convert.errors import ConvertError, ExitCode
from convert.rotations.base import RotationContext, RotationMethod, RotationPlan
from convert.rotations.hadamard import HadamardRotation, NoRotation
from convert.rotations.ostquant import OSTQuantRotation
from convert.rotations.ruquant import RUQuantStage1, RUQuantStage12
from convert.rotations.ruquant_online import RUQuantOnline, RUQuantOnlineO, RUQuantOnlinePooled

METHODS: dict[str, type[RotationMethod]] = {
    m.name: m for m in (HadamardRotation, NoRotation, OSTQuantRotation, RUQuantStage12, RUQuantStage1,
                        RUQuantOnline, RUQuantOnlinePooled, RUQuantOnlineO)
}


def get_rotation_method(name: str) -> RotationMethod:
    if name not in METHODS:
        raise ConvertError(f"unknown rotation {name!r}; choose one of {', '.join(available_rotations())}",
                           ExitCode.UNSUPPORTED)
    return METHODS[name]()


def available_rotations() -> list[str]:
    return sorted(METHODS)


__all__ = ["METHODS", "RotationContext", "RotationMethod", "RotationPlan", "available_rotations",
           "get_rotation_method"]
