"""``kernels.inductor_setup``: the Inductor settings a model with graph-visible quantization compiles under."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import sympy
from torch._inductor.choices import InductorChoices
from torch._inductor.ir import ReductionHint
from torch._inductor.virtualized import V

from vllm_ruquant.kernels import inductor_setup


def _features(hint: ReductionHint, numel: object) -> SimpleNamespace:
    return SimpleNamespace(get_reduction_hint=lambda: hint, reduction_numel=numel)


@pytest.fixture
def inductor_says_no(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's own heuristic declines every reduction: what is left is the handler's widening."""
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *a, **k: False))


def test_rows_up_to_the_limit_reduce_in_one_pass(inductor_says_no: None) -> None:
    choices = inductor_setup.RowPersistentChoices(8192)
    assert choices.should_use_persistent_reduction(_features(ReductionHint.INNER, sympy.Integer(4096)), False)
    assert choices.should_use_persistent_reduction(_features(ReductionHint.INNER, 8192), False)
    assert not choices.should_use_persistent_reduction(_features(ReductionHint.INNER, 14336), False)
    assert not choices.should_use_persistent_reduction(_features(ReductionHint.OUTER, 4096), False)
    assert not choices.should_use_persistent_reduction(_features(ReductionHint.INNER, sympy.Symbol("s0")), False)
    assert not choices.should_use_persistent_reduction(_features(ReductionHint.INNER, 4096), True)  # cooperative
    assert choices.should_use_persistent_reduction(features=_features(ReductionHint.INNER, 2048),
                                                   cooperative_reduction=False)  # by name


def test_inductors_yes_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *a, **k: True))
    assert inductor_setup.RowPersistentChoices(0).should_use_persistent_reduction(
        _features(ReductionHint.OUTER, 1 << 20), False)


def _in_fresh_thread(fn):  # Inductor's choices handler is per thread: keep the test's own clean
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_installed_once_and_never_over_someone_elses() -> None:
    def install_twice():
        first = inductor_setup.persistent_rows(4096)
        second = inductor_setup.persistent_rows(8192)
        return first, second, type(V.choices), V.choices.row_max

    assert _in_fresh_thread(install_twice) == (True, True, inductor_setup.RowPersistentChoices, 8192)

    class Theirs(InductorChoices):
        pass

    def over_theirs():
        V.set_choices_handler(Theirs())
        return inductor_setup.persistent_rows(8192), type(V.choices)

    assert _in_fresh_thread(over_theirs) == (False, Theirs)
    assert _in_fresh_thread(lambda: (inductor_setup.persistent_rows(0), type(V.choices))) == (False, InductorChoices)



def _division_switch() -> str:
    """The IEEE-division switch's config key in this torch (see ``rounds_like_eager``)."""
    import torch._inductor.config as cfg

    numerics = getattr(cfg, "eager_numerics", None)
    return ("eager_numerics.division_rounding" if numerics is not None and hasattr(numerics, "division_rounding")
            else "emulate_divison_rounding")


@pytest.mark.parametrize("exact", [True, False])
def test_exact_division_is_a_choice(exact: bool) -> None:
    """``RUQUANT_EXACT_DIVISION=0`` (``exact_division=False``) leaves Inductor's division switch off; the
    bf16 rounding of every op is set either way (it decides the integers far more often)."""
    import torch._inductor.config as cfg

    key = _division_switch()
    before = cfg.get_config_copy()[key]
    with cfg.patch({key: False, "emulate_precision_casts": False}):
        inductor_setup.rounds_like_eager(exact_division=exact)
        assert cfg.get_config_copy()[key] is exact
        assert cfg.emulate_precision_casts is True
    assert cfg.get_config_copy()[key] is before  # restored for the tests after this one
