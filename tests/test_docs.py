"""The project's documents point only at files the project has, and state each benchmark fact in one place."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cited_paths(text: str) -> set[str]:
    """`backticked` or (linked) file paths with a folder (bare names such as `report.md` are outputs), leaving out
    run outputs (RUN/, runs/, data/) and paths outside the project (which the check below refuses anyway)."""
    found = set(re.findall(r"[`(]([\w./-]+/[\w.-]+\.(?:py|md|json|yaml|sh|sbatch))[`)]", text))
    return {p for p in found if not p.startswith(("../", "/", "RUN/", "runs/", "data/"))}


def test_readme_and_interfaces_cite_only_files_that_exist():
    """e.g. not docs/pitfalls.md, which lives outside the project (../shared)."""
    for doc in ("README.md", "docs/interfaces.md", "bench/NOTES.md", "bench/HISTORY.md"):
        text = (ROOT / doc).read_text()
        assert "../shared/docs" not in text, doc
        for p in _cited_paths(text):
            candidates = [ROOT / p, ROOT / "pipeline" / p, (ROOT / doc).parent / p]
            assert any(c.exists() for c in candidates), f"{doc} cites {p}, which is not in the project"


def test_results_md_does_not_repeat_the_notes():
    """bench/NOTES.md holds what `make bench` does not measure; the generated RESULTS.md links to it instead of
    repeating its sections (bench/report.py renders both the committed file and this check's expectation)."""
    notes = (ROOT / "bench/NOTES.md").read_text()
    results = (ROOT / "bench/RESULTS.md").read_text()
    headings = re.findall(r"^## .+$", notes, flags=re.M)
    assert headings
    for h in headings:
        assert h not in results, h
    for para in (p.strip() for p in notes.split("\n\n")):
        if len(para) > 80:
            assert para not in results, para[:80]
    assert "NOTES.md" in results
