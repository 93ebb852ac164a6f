"""The reliability figures of docs/reliability.md, regenerated: fault matrix, hostile inputs,
and a slice of the soak."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltx2_tools import hostile, reliability

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _block(name: str) -> str:
    text = DOC.read_text()
    return text.split(f"<!-- {name} -->\n", 1)[1].split(f"<!-- /{name} -->", 1)[0]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> reliability.Fixture:
    return reliability.make_fixture(tmp_path_factory.mktemp("rel"), num_layers=1)


def test_fault_matrix_has_only_clean_or_quarantined_cells(fixture) -> None:
    cells = reliability.fault_matrix(fixture)
    bad = [c for c in cells if c.outcome not in ("CLEAN", "QUARANTINED")]
    assert not bad, bad
    # every point was reached, by every kind of fault
    assert {c.point for c in cells} == set(reliability.FAULT_POINTS)
    assert _block("fault-matrix") == reliability.render_matrix(cells), (
        "docs/reliability.md is stale: python -m ltx2_tools.reliability matrix --write docs/reliability.md")


def test_hostile_inputs_raise_typed_errors_and_touch_nothing() -> None:
    rows = hostile.catalogue()
    assert len(rows) >= 25
    failures = [r for r in rows if not (r.typed and r.untouched)]
    assert not failures, failures
    documented = _block("hostile")
    for i, r in enumerate(rows, 1):
        assert f"| {i} | {r.case} | `{r.error}` | yes |" in documented, (
            "docs/reliability.md is stale: python -m ltx2_tools.hostile --write docs/reliability.md")


def test_soak_slice_has_zero_drift(fixture) -> None:
    faults = reliability.FaultInjector()
    managers = reliability.tiny_soak_managers(fixture, faults)
    report = reliability.soak(managers, faults, requests=120, seed=7, fault_rate=0.25)
    assert report.drifted_checks == 0
    assert report.bit_checks == 120
    assert report.failed_as_injected + report.quarantines_repaired > 0, "no fault fired: the slice tests nothing"
    assert report.completed > 60
