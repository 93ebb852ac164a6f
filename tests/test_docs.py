import re
from pathlib import Path

import pytest

from ltx2_residency import ResidencyMode
from ltx2_residency.diagrams import modes_in, update_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_diagrams_match_the_tables() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert sorted(modes_in(doc)) == sorted(m.value for m in ResidencyMode)
    assert update_markdown(doc) == doc, (
        "docs/architecture.md drifted from the transition tables; run "
        "`python -m ltx2_residency.diagrams docs/architecture.md`"
    )


def test_update_markdown_rewrites_a_stale_block() -> None:
    stale = "x\n<!-- mermaid:original -->\nold\n<!-- /mermaid:original -->\ny\n"
    fresh = update_markdown(stale)
    assert "old" not in fresh and "stateDiagram-v2" in fresh and fresh.endswith("y\n")


def test_readme_commands_are_the_ci_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


USER_DOCS = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")))]
#: Working-notes wording that has no place in user documentation.
NOTES = re.compile(r"this session|later session|in session|issue #?\d+|\bPR #?\d+|device tool|farm-studio|subagent"
                   r"|scratch (?:script|run)|final code|re-measured", re.I)


@pytest.mark.parametrize("name", USER_DOCS)
def test_docs_have_no_working_notes(name: str) -> None:
    text = (ROOT / name).read_text()
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in NOTES.finditer(text)]
    assert not found, f"{name} reads like working notes: {found}"


@pytest.mark.parametrize("name", USER_DOCS)
def test_relative_links_resolve(name: str) -> None:
    doc = ROOT / name
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not missing, f"{name} links to files that do not exist: {missing}"
