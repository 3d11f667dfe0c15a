"""Every results page under examples/results/ is what its committed JSON files render to (issue 20 item 6).

A number typed into a page by hand, or a JSON re-run without re-rendering, fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "examples" / "render_results.py"


def _check(results: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), "--check", "--results", str(results)],
                          capture_output=True, text=True, timeout=120)


def test_committed_pages_are_rendered_from_their_json() -> None:
    r = _check(ROOT / "examples" / "results")
    assert r.returncode == 0, f"re-run `python examples/render_results.py`:\n{r.stdout}{r.stderr}"


def test_a_changed_number_makes_the_check_fail(tmp_path: Path) -> None:
    """The check compares numbers, not just that pages exist: one perplexity changed in a JSON fails it."""
    src = ROOT / "examples" / "results" / "smollm2-135m"
    dst = tmp_path / "smollm2-135m"
    shutil.copytree(src, dst)
    assert _check(tmp_path).returncode == 0
    q = json.loads((dst / "quality.json").read_text())
    q["results"]["hadamard_gptq"]["w4a16"]["perplexity"] += 1.0
    (dst / "quality.json").write_text(json.dumps(q))
    r = _check(tmp_path)
    assert r.returncode == 1 and "quality.md" in r.stdout


def test_every_quality_row_has_a_label_and_a_valid_recipe() -> None:
    """A row without a label made quality.py fail after a cell's 20 minutes of work; a recipe key that is no
    ConvertOptions field would fail only when its cell starts."""
    probe = ("import dataclasses, quality, render_results\n"
             "fields = {f.name for f in dataclasses.fields(quality.ConvertOptions)}\n"
             "extra = {'ostquant', 'tuning', 'calib_samples'}\n"
             "print(sorted(set(quality.ROWS) - set(render_results.LABELS)))\n"
             "print(sorted({k for r in quality.ROWS.values() for k in r} - fields - extra))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT / "examples", capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out == ["[]", "[]"], out
