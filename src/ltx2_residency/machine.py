"""The weight-state machine, declared as data: one transition table per residency mode.

The tables below are the single source of truth. :class:`WeightMachine` builds a
``transitions.Machine`` from them, the manager drives it, the tests read them, and
:func:`mermaid` draws them into ``docs/architecture.md``.

An edge may name an *effect*: the weight operation that runs as the transition's callback
(``merge``, ``attach``, ``restore``, ``repair``). The manager maps effect names to small
strategy objects; the machine only knows the names, so a weight can only change while the
state says an operation is under way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from transitions import EventData, Machine

from .domain import ResidencyMode, WeightState
from .errors import IllegalTransitionError

S = WeightState


@dataclass(frozen=True)
class Edge:
    """One legal transition: ``event`` takes the machine from ``source`` to ``dest``."""

    event: str
    source: WeightState
    dest: WeightState
    effect: str | None = None


@dataclass(frozen=True)
class ModeTable:
    mode: ResidencyMode
    initial: WeightState
    edges: tuple[Edge, ...]
    summary: str

    @property
    def states(self) -> tuple[WeightState, ...]:
        seen: dict[WeightState, None] = {self.initial: None}
        for e in self.edges:
            seen.setdefault(e.source, None)
            seen.setdefault(e.dest, None)
        return tuple(seen)

    def legal_events(self, state: WeightState) -> tuple[str, ...]:
        return tuple(sorted({e.event for e in self.edges if e.source is state}))

    def edge(self, state: WeightState, event: str) -> Edge | None:
        for e in self.edges:
            if e.source is state and e.event == event:
                return e
        return None


_APPLIED = (S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC)


def _restore_edges(sources: tuple[WeightState, ...]) -> tuple[Edge, ...]:
    # Undo is one event from every state that holds a change, including the transient ones a
    # failed operation leaves behind: that is how a half-done merge rolls back.
    return tuple(Edge("restore", s, S.RESTORING, "restore") for s in sources)


ORIGINAL = ModeTable(
    mode=ResidencyMode.ORIGINAL,
    initial=S.CLEAN,
    summary="one shared DiT; each phase's LoRA is attached or merged in place and undone "
    "exactly before the request ends",
    edges=(
        Edge("merge", S.CLEAN, S.MERGING, "merge"),
        Edge("merged_stage1", S.MERGING, S.STAGE1_MERGED),
        Edge("merged_stage2", S.MERGING, S.STAGE2_MERGED),
        Edge("attach", S.CLEAN, S.ATTACHING, "attach"),
        Edge("attached_stage1", S.ATTACHING, S.STAGE1_DYNAMIC),
        Edge("attached_stage2", S.ATTACHING, S.STAGE2_DYNAMIC),
        # merging ahead (req.prepare): stage 2's merge starts behind stage 1's last DiT calls,
        # block by block, and the switch completes it
        Edge("premerge", S.CLEAN, S.PREMERGING, "premerge"),
        Edge("merge", S.PREMERGING, S.MERGING, "merge"),
        *_restore_edges((*_APPLIED, S.MERGING, S.ATTACHING, S.PREMERGING)),
        Edge("restored", S.RESTORING, S.CLEAN),
        Edge("quarantine", S.CLEAN, S.QUARANTINED),
        Edge("quarantine", S.PREMERGING, S.QUARANTINED),
        Edge("quarantine", S.MERGING, S.QUARANTINED),
        Edge("quarantine", S.ATTACHING, S.QUARANTINED),
        Edge("quarantine", S.RESTORING, S.QUARANTINED),
        Edge("repair", S.QUARANTINED, S.RESTORING, "repair"),
    ),
)

def _stage1_edges() -> tuple[Edge, ...]:
    # stage 1 always runs on the base DiT, as in original mode
    return (
        Edge("merge", S.CLEAN, S.MERGING, "merge"),
        Edge("merged_stage1", S.MERGING, S.STAGE1_MERGED),
        Edge("attach", S.CLEAN, S.ATTACHING, "attach"),
        Edge("attached_stage1", S.ATTACHING, S.STAGE1_DYNAMIC),
        # a stage-2 strength the pre-merged copy was not built with: dynamic on the base
        Edge("attached_stage2", S.ATTACHING, S.STAGE2_DYNAMIC),
    )


# Snapshot and resident mode hold a second, pre-merged stage-2 DiT; activating it is a
# prefetch (snapshot) or a pointer swap (resident), never a merge into the base weights.
SNAPSHOT = ModeTable(
    mode=ResidencyMode.SNAPSHOT,
    initial=S.CLEAN,
    summary="pinned host snapshots of the base and a pre-merged stage-2 DiT; stage 2's DiT is "
    "prefetched on a side stream while stage 1 runs (low-VRAM: the base is evicted first)",
    edges=(
        *_stage1_edges(),
        Edge("activate_stage2", S.CLEAN, S.PREFETCHING, "activate"),
        Edge("activate_stage2", S.OFFLOADED, S.PREFETCHING, "activate"),
        Edge("activated", S.PREFETCHING, S.STAGE2_MERGED),
        Edge("load_base", S.OFFLOADED, S.PREFETCHING, "load"),
        Edge("loaded", S.PREFETCHING, S.CLEAN),
        *_restore_edges((S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC,
                         S.MERGING, S.ATTACHING, S.PREFETCHING)),
        Edge("restored", S.RESTORING, S.CLEAN),
        Edge("offloaded", S.RESTORING, S.OFFLOADED),
        Edge("quarantine", S.CLEAN, S.QUARANTINED),
        Edge("quarantine", S.OFFLOADED, S.QUARANTINED),
        Edge("quarantine", S.MERGING, S.QUARANTINED),
        Edge("quarantine", S.ATTACHING, S.QUARANTINED),
        Edge("quarantine", S.PREFETCHING, S.QUARANTINED),
        Edge("quarantine", S.RESTORING, S.QUARANTINED),
        Edge("repair", S.QUARANTINED, S.RESTORING, "repair"),
    ),
)

RESIDENT = ModeTable(
    mode=ResidencyMode.RESIDENT,
    initial=S.CLEAN,
    summary="base and pre-merged stage-2 DiT both on the device; activating stage 2 rebinds a "
    "pointer",
    edges=(
        *_stage1_edges(),
        Edge("activate_stage2", S.CLEAN, S.STAGE2_MERGED, "activate"),
        *_restore_edges((S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC,
                         S.MERGING, S.ATTACHING)),
        Edge("restored", S.RESTORING, S.CLEAN),
        Edge("quarantine", S.CLEAN, S.QUARANTINED),
        Edge("quarantine", S.MERGING, S.QUARANTINED),
        Edge("quarantine", S.ATTACHING, S.QUARANTINED),
        Edge("quarantine", S.RESTORING, S.QUARANTINED),
        Edge("repair", S.QUARANTINED, S.RESTORING, "repair"),
    ),
)

TABLES: Mapping[ResidencyMode, ModeTable] = {
    t.mode: t for t in (ORIGINAL, SNAPSHOT, RESIDENT)
}

#: Effect callback: receives the edge and the keyword arguments the event was fired with;
#: returns the number of weight bytes it read or wrote (for the trace).
Effect = Callable[[Edge, Mapping[str, Any]], int]


class WeightMachine:
    """A ``transitions.Machine`` over one mode's table, with typed errors and effect dispatch.

    The state lives here, set only by ``fire``; nothing reads it back from tensors.
    """

    def __init__(self, table: ModeTable, effects: Mapping[str, Effect]) -> None:
        missing = {e.effect for e in table.edges if e.effect} - set(effects)
        if missing:
            raise ValueError(f"no strategy for effects {sorted(missing)} of mode {table.mode.value}")
        self.table = table
        self._effects = effects
        self._last_bytes = 0
        # transitions' own lock is not needed: the manager serialises every fire() through
        # request ownership. This lock only keeps `state` reads consistent for other threads.
        self._lock = threading.RLock()
        self.state_name: str = table.initial.value
        self._machine = Machine(
            model=self,
            states=[s.value for s in table.states],
            transitions=[
                {
                    "trigger": e.event,
                    "source": e.source.value,
                    "dest": e.dest.value,
                    "after": "_run_effect" if e.effect else None,
                }
                for e in table.edges
            ],
            initial=table.initial.value,
            model_attribute="state_name",
            auto_transitions=False,
            send_event=True,
        )

    @property
    def state(self) -> WeightState:
        return WeightState(self.state_name)

    def legal_events(self) -> tuple[str, ...]:
        return self.table.legal_events(self.state)

    def can(self, event: str) -> bool:
        return self.table.edge(self.state, event) is not None

    def fire(self, event: str, **context: Any) -> int:
        """Take ``event``; run its effect (if any) after the state has changed.

        If the effect raises, the state stays at the edge's destination (a transient state
        such as MERGING): the caller must roll back or quarantine from there.
        """
        with self._lock:
            edge = self.table.edge(self.state, event)
            if edge is None:
                raise IllegalTransitionError(
                    self.table.mode.value, self.state.value, event, self.legal_events()
                )
            self._last_bytes = 0
            self._machine.events[event].trigger(self, edge=edge, **context)
            return self._last_bytes

    def _run_effect(self, event_data: EventData) -> None:
        kwargs = dict(event_data.kwargs)
        edge: Edge = kwargs.pop("edge")
        assert edge.effect is not None
        self._last_bytes = self._effects[edge.effect](edge, kwargs)


def mermaid(table: ModeTable) -> str:
    """The table as a mermaid ``stateDiagram-v2`` (edges in table order, effects in brackets)."""
    lines = ["stateDiagram-v2", f"    [*] --> {table.initial.value}"]
    for e in table.edges:
        label = e.event + (f" [{e.effect}]" if e.effect else "")
        lines.append(f"    {e.source.value} --> {e.dest.value} : {label}")
    return "\n".join(lines) + "\n"
