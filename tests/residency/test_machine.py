from collections import deque

import pytest

from ltx2_residency import (
    TABLES,
    IllegalTransitionError,
    ResidencyMode,
    WeightState,
    mermaid,
)
from ltx2_residency.machine import WeightMachine
from ltx2_residency.modes import TRANSIENT_STATES


def _noop_effects(log: list[str]) -> dict:
    def effect(edge, ctx):
        log.append(edge.effect)
        return 7
    names = {e.effect for t in TABLES.values() for e in t.edges if e.effect}
    return {name: effect for name in names}


def _reachable(table, start):
    seen, todo = {start}, deque([start])
    while todo:
        s = todo.popleft()
        for e in table.edges:
            if e.source is s and e.dest not in seen:
                seen.add(e.dest)
                todo.append(e.dest)
    return seen


@pytest.mark.parametrize("mode", list(ResidencyMode))
def test_every_state_is_reachable_and_can_get_back_to_clean(mode: ResidencyMode) -> None:
    table = TABLES[mode]
    assert _reachable(table, table.initial) == set(table.states)
    # from every state some path leads back to clean: no trap states
    for start in table.states:
        assert WeightState.CLEAN in _reachable(table, start), f"{mode.value}: no way back from {start.value}"


@pytest.mark.parametrize("mode", list(ResidencyMode))
def test_table_is_deterministic_and_transient_states_can_fail(mode: ResidencyMode) -> None:
    table = TABLES[mode]
    pairs = [(e.source, e.event) for e in table.edges]
    assert len(pairs) == len(set(pairs)), "one (state, event) must lead to exactly one state"
    for s in table.states:
        if s in TRANSIENT_STATES:
            # a failed operation must be able to roll back or quarantine from where it stopped
            assert {"restore", "quarantine"} & set(table.legal_events(s)), s
    assert table.legal_events(WeightState.QUARANTINED) == ("repair",)


@pytest.mark.parametrize("mode", list(ResidencyMode))
def test_machine_follows_every_edge_and_runs_effects(mode: ResidencyMode) -> None:
    table = TABLES[mode]
    for edge in table.edges:
        log: list[str] = []
        m = WeightMachine(table, _noop_effects(log))
        m.state_name = edge.source.value  # place the machine at the edge's source
        m._machine.set_state(edge.source.value, m)
        touched = m.fire(edge.event)
        assert m.state is edge.dest
        assert log == ([edge.effect] if edge.effect else [])
        assert touched == (7 if edge.effect else 0)


def test_illegal_event_names_mode_state_event_and_legal_events() -> None:
    m = WeightMachine(TABLES[ResidencyMode.ORIGINAL], _noop_effects([]))
    with pytest.raises(IllegalTransitionError) as info:
        m.fire("merged_stage2")
    err = info.value
    assert (err.mode, err.state, err.event) == ("original", "clean", "merged_stage2")
    assert err.legal == ("attach", "merge", "merge_ahead", "quarantine")
    msg = str(err)
    for part in ("'original'", "'merged_stage2'", "'clean'", "attach, merge, merge_ahead, quarantine"):
        assert part in msg
    assert m.state is WeightState.CLEAN


def test_failed_effect_leaves_the_transient_state() -> None:
    def boom(edge, ctx):
        raise RuntimeError("disk on fire")
    effects = _noop_effects([])
    effects["merge"] = boom
    m = WeightMachine(TABLES[ResidencyMode.ORIGINAL], effects)
    with pytest.raises(RuntimeError, match="disk on fire"):
        m.fire("merge")
    assert m.state is WeightState.MERGING
    assert set(m.legal_events()) == {"merged_stage1", "merged_stage2", "restore", "restore_behind", "quarantine"}


def test_missing_effect_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="no strategy"):
        WeightMachine(TABLES[ResidencyMode.ORIGINAL], {"merge": lambda e, c: 0})


@pytest.mark.parametrize("mode", list(ResidencyMode))
def test_mermaid_has_one_line_per_edge(mode: ResidencyMode) -> None:
    text = mermaid(TABLES[mode])
    lines = text.strip().splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert lines[1] == f"    [*] --> {TABLES[mode].initial.value}"
    assert len(lines) == 2 + len(TABLES[mode].edges)
    for edge, line in zip(TABLES[mode].edges, lines[2:], strict=True):
        assert line.startswith(f"    {edge.source.value} --> {edge.dest.value} : {edge.event}")
