"""The import architecture of pyproject.toml's ``[tool.importlinter]`` contracts holds.

Why a test: CI runs the test command only, so the contracts -- benchmarks/examples above
the converter above the plugin, no vLLM in the checkpoint contract or the converter, vLLM
only through ``vllm_ruquant.compat``, no import cycles inside ``vllm_ruquant`` or
``convert`` -- are checked wherever the tests run. ``lint-imports`` reads the source (it
imports nothing of ours), from the repository root, in a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    """The ``lint-imports`` of this interpreter's environment (else of PATH); a failure if absent:
    it is part of the ``test`` extra."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("lint-imports", path=path)
    if exe is None:
        pytest.fail("lint-imports not found: install the test extra (pip install -e '.[test]')")
    return exe


def test_import_contracts_are_kept() -> None:
    proc = subprocess.run([lint_imports(), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert contracts >= 4 and f"Contracts: {contracts} kept, 0 broken." in out, out  # every one was checked
