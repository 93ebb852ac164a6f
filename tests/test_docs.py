import re
from pathlib import Path

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
