"""The interrupt sweep (``ltx2_tools.interrupts``): Ctrl-C between any two lines of the request path.

CI sweeps a deterministic sample of each scenario's points (every ``EVERY``-th line event, with an
offset that differs per scenario so neighbouring lines are covered across scenarios);
``python -m ltx2_tools.reliability interrupts`` sweeps every point (docs/reliability.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ltx2_residency.ops import exact as exact_ops
from ltx2_residency.ops import merge as merge_ops
from ltx2_residency.ownership import Ownership
from ltx2_tools import interrupts

EVERY = int(os.environ.get("LTX2_SWEEP_EVERY", "5"))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory: pytest.TempPathFactory) -> interrupts.Fixture:
    return interrupts.block_fixture(tmp_path_factory.mktemp("sweep"))


@pytest.mark.parametrize("scenario", interrupts.SCENARIOS, ids=lambda s: s.name)
def test_every_interrupt_ends_clean_or_quarantined(fixture, scenario) -> None:
    sweep = interrupts.Sweep(fixture, scenario)
    total = sweep.count()
    assert total > 100  # the scenario runs the request path (a broken count would sweep nothing)
    offset = interrupts.SCENARIOS.index(scenario) % EVERY
    points = [sweep.point(at) for at in sorted({*range(1 + offset, total + 1, EVERY), total})]
    reached = [p for p in points if p.outcome != "NOT REACHED"]
    assert len(reached) >= len(points) - 1
    bad = [f"{p.where}: {p.detail}" for p in reached if p.outcome == "VIOLATION"]
    assert not bad, f"{len(bad)} of {len(reached)} interrupts broke the promise:\n" + "\n".join(bad[:10])


def test_an_interrupt_right_after_a_write_is_undone_exactly(fixture, monkeypatch) -> None:
    """The points that fall between a layer's write and the line after it: CLEAN, bit-exact, because
    the undo record precedes the write. With the record appended after the write (as the merge
    once did), the same points leave a layer merged that no undo knows of; only the end-of-request
    check then catches it, and the DiT is quarantined."""
    sweep = interrupts.Sweep(fixture, interrupts.Scenario("merge", "merge"))
    source = Path(exact_ops.__file__).read_text().splitlines()

    def after_write() -> list[int]:
        points = [n for n, (file, line) in enumerate(sweep.lines(), 1)
                  if file == "ops/exact.py" and source[line - 1].strip().startswith("undo.merging = None")]
        assert len(points) == 4 + 2  # the distilled LoRA on 4 block Linears, the user LoRA on 2
        return points

    assert {sweep.point(n).outcome for n in after_write()} == {"CLEAN"}

    def recorded_after(self, frame, targets, launch=False):
        for target in targets:
            undo = self.strategy.merge(frame, target, None)
            self.strategy.write(target, undo)
            frame.layers.append((target, undo))

    monkeypatch.setattr(merge_ops.MergeStack, "merge_layers", recorded_after)
    assert {sweep.point(n).outcome for n in after_write()} == {"QUARANTINED"}


def test_the_sweep_fails_on_a_leaked_lock(fixture, monkeypatch) -> None:
    """The sweep can fail: a release that never happens leaves the next request waiting."""
    sweep = interrupts.Sweep(fixture, interrupts.SCENARIOS[0])
    monkeypatch.setattr(Ownership, "release_mine", lambda self: None)
    point = sweep.point(sweep.count())
    assert point.outcome == "VIOLATION" and "the next request failed" in point.detail


def test_the_report_counts_points_and_violations(fixture) -> None:
    sweep = interrupts.Sweep(fixture, interrupts.SCENARIOS[0])
    points = [sweep.point(at) for at in (1, 2, 10**9)]
    text = interrupts.render(points)
    assert "| sglang | 2 |" in text
    assert "2 interrupts injected, 0 violations." in text
