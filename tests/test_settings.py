"""The plugin's RUQUANT_* switches key vLLM's torch.compile cache (vllm_ruquant/settings.py).

On the H200 an engine started with RUQUANT_GRAPH_QUANT=0 after a default one loaded the first
engine's AOT-compiled graph and failed at start; these check that the switches now reach the
factors vLLM hashes, in the vLLM installed here.
"""

from __future__ import annotations

import pytest

import vllm_ruquant
from vllm_ruquant import settings

vllm = pytest.importorskip("vllm")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith(settings.PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def test_active_lists_the_users_switches_only(clean_env: pytest.MonkeyPatch) -> None:
    env = {"RUQUANT_GRAPH_QUANT": "0", settings.VALIDATED_ENV: "/ckpt:123", "PATH": "/bin",
           "RUQUANT_AUTOTUNE": "1"}
    assert settings.active(env) == {"RUQUANT_AUTOTUNE": "1", "RUQUANT_GRAPH_QUANT": "0"}
    assert settings.describe(env) == "RUQUANT_AUTOTUNE=1 RUQUANT_GRAPH_QUANT=0"
    assert settings.describe({}) == ""


def test_switches_change_vllms_compile_cache_key(clean_env: pytest.MonkeyPatch) -> None:
    from vllm import envs
    from vllm.config.utils import hash_factors

    vllm_ruquant.register()
    default = hash_factors(envs.compile_factors())
    assert envs.compile_factors()[settings.COMPILE_FACTOR] == "{}"

    clean_env.setenv("RUQUANT_GRAPH_QUANT", "0")
    assert envs.compile_factors()[settings.COMPILE_FACTOR] == '{"RUQUANT_GRAPH_QUANT": "0"}'
    graph_quant_off = hash_factors(envs.compile_factors())
    assert graph_quant_off != default

    # the plugin's own bookkeeping (set in every served process tree) must not force a recompile
    clean_env.setenv(settings.VALIDATED_ENV, "/some/checkpoint:0123")
    assert hash_factors(envs.compile_factors()) == graph_quant_off

    vllm_ruquant.register()  # idempotent: one factor, the same getter
    assert envs.environment_variables[settings.COMPILE_FACTOR] is settings.compile_factor


def test_every_switch_the_plugin_reads_is_listed() -> None:
    """``settings.SWITCHES`` is the user's list: the code reads no ``RUQUANT_*`` name it lacks, and lists
    none it does not read."""
    import re
    from pathlib import Path

    root = Path(vllm_ruquant.__file__).parent
    read = {name for f in root.rglob("*.py") if f.name != "settings.py"
            for name in re.findall(r"\"(RUQUANT_[A-Z0-9_]+)\"", f.read_text())}
    internal = settings.BOOKKEEPING | {settings.COMPILE_FACTOR}
    assert read - internal == set(settings.SWITCHES), (read - internal) ^ set(settings.SWITCHES)
