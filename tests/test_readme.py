"""The README is for users: short enough to read, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_short_and_names_every_doc_it_links() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, f"README.md has {len(text)} characters; keep it under 12 000"
    for link in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text):
        assert (ROOT / link).exists(), f"README.md links {link}, which does not exist"


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci, ci
    assert ci in (ROOT / "README.md").read_text(), f"README.md does not show CI's command {ci!r}"
