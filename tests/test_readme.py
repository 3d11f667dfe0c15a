"""The README is for users: short, its two commands the ones CI runs, its links alive.

Issue 21: the README had grown into a lab notebook (456 lines, lease by lease, commit hashes).
These checks keep it the page a newcomer reads first; history lives in CHANGELOG.md and
``benchmarks/results/<date>/README.md``. Cheap: reads files only.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 220
SETUP = "bash scripts/setup.sh"


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section, up to the next ``## `` heading."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README has no '## {heading}' section"
    return m.group(1)


def _fenced_commands(text: str) -> list[str]:
    """Non-empty lines of the fenced code blocks in ``text``."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    """The commands ``.ci/run`` executes (not comments, not shell options or ``cd``)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln.strip() for ln in lines
            if ln.strip() and not ln.strip().startswith(("#", "set ", "cd "))]


def test_readme_is_short() -> None:
    n = len(_readme().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}); move detail to docs/ or CHANGELOG.md"


def test_the_two_commands_are_what_ci_runs() -> None:
    commands = _fenced_commands(_section(_readme(), "Two commands on a fresh machine"))
    assert len(commands) == 2, commands
    quickstart, tests = commands
    ci = _ci_commands()
    assert ci[0] == SETUP, ci
    # CI runs exactly the README's test command, split at its `&&`
    assert tests == f"{SETUP} && {ci[1]}", (tests, ci)
    assert ci[1:] == [tests.split("&&", 1)[1].strip()]
    assert quickstart.startswith(f"{SETUP} && .venv/bin/python "), quickstart
    script = shlex.split(quickstart.split("&&", 1)[1])[1]
    assert (ROOT / script).is_file(), f"the quickstart command runs {script}, which does not exist"


def test_relative_links_resolve() -> None:
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _readme())
    relative = [unquote(t.split("#", 1)[0]) for t in links
                if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "README.md links no file of the repository"
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_no_history_in_the_readme() -> None:
    text = _readme()
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text)
              if re.search(r"[a-f]", w) and re.search(r"[0-9]", w)]
    assert not hashes, f"commit hashes in README.md (history goes to CHANGELOG.md): {hashes}"
    assert not re.search(r"\bleases?\b", text, flags=re.I), "lease diary in README.md (history goes to CHANGELOG.md)"
