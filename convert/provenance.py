"""When and at which commit a result was made: the provenance a results JSON carries.

One copy for every script that writes results (``examples/quality.py``,
``examples/served_perplexity_api.py``, ``benchmarks/convert_scale.py``).
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(short: bool = True) -> str | None:
    """HEAD of this checkout (abbreviated with ``short``), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def stamp() -> dict[str, str]:
    """``{"date": today, "commit": short hash or "unknown"}`` (a GPU machine's copy has no .git)."""
    return {"date": datetime.date.today().isoformat(), "commit": git_commit() or "unknown"}
