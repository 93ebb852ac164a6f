"""What every mode declares as data: the transition table and the steps of a plan.

A :class:`ModeTable` lists every legal transition of one residency mode. An edge may name an
*effect*, the weight operation that runs as the transition's callback (``merge``, ``attach``,
``restore`` ...): a weight can only change while the state says an operation is under way. The
same tables build the ``transitions`` machine (:mod:`..machine`), drive the stateful tests and are
drawn by :func:`mermaid` into ``docs/architecture.md``.

A mode's ``plan(state, phase, decision)`` returns :data:`Step` values; the executor runs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..domain import ApplyKind, Phase, ResidencyMode, WeightState

S = WeightState

#: States a DiT rests in between requests, its shared weights untouched: CLEAN, or OFFLOADED in
#: low-VRAM snapshot mode (the base bound to its pinned snapshot until the next request loads it).
REST_STATES = frozenset({S.CLEAN, S.OFFLOADED})

#: States in which a weight operation is under way: running the DiT there is never legal.
TRANSIENT_STATES = frozenset({S.MERGING, S.ATTACHING, S.RESTORING, S.UNDO_PENDING, S.PREFETCHING})

#: States holding a phase's LoRAs.
APPLIED_STATES = (S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC)

#: The settled state a phase reaches for each way of applying its LoRAs.
PHASE_TARGET: Mapping[tuple[Phase, ApplyKind], WeightState] = {
    (Phase.STAGE1, ApplyKind.NONE): S.CLEAN,
    (Phase.STAGE2, ApplyKind.NONE): S.CLEAN,
    (Phase.STAGE1, ApplyKind.MERGED): S.STAGE1_MERGED,
    (Phase.STAGE2, ApplyKind.MERGED): S.STAGE2_MERGED,
    (Phase.STAGE1, ApplyKind.DYNAMIC): S.STAGE1_DYNAMIC,
    (Phase.STAGE2, ApplyKind.DYNAMIC): S.STAGE2_DYNAMIC,
}


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


def undo_edges(sources: tuple[WeightState, ...], behind: tuple[WeightState, ...],
               settled: tuple[WeightState, ...] = (S.CLEAN,)) -> tuple[Edge, ...]:
    """The exact undo: ``restore`` from every state that holds a change (the transient ones a failed
    operation leaves behind included: that is how a half-done merge rolls back), ``restore_behind``
    from the states whose merged layers may be undone on a side stream, and the settling events."""
    settle = {S.CLEAN: "restored", S.OFFLOADED: "offloaded"}
    return (
        *(Edge("restore", s, S.RESTORING, "restore") for s in sources),
        *(Edge("restore_behind", s, S.UNDO_PENDING, "restore") for s in behind),
        *(Edge(settle[d], S.RESTORING, d) for d in settled),
        *(Edge(settle[d], S.UNDO_PENDING, d) for d in settled),
    )


def quarantine_edges(sources: tuple[WeightState, ...]) -> tuple[Edge, ...]:
    """Quarantine from the states a failure can leave, and the repair out of it."""
    return (*(Edge("quarantine", s, S.QUARANTINED) for s in sources),
            Edge("repair", S.QUARANTINED, S.RESTORING, "repair"))


def mermaid(table: ModeTable) -> str:
    """The table as a mermaid ``stateDiagram-v2`` (edges in table order, effects in brackets)."""
    lines = ["stateDiagram-v2", f"    [*] --> {table.initial.value}"]
    for e in table.edges:
        label = e.event + (f" [{e.effect}]" if e.effect else "")
        lines.append(f"    {e.source.value} --> {e.dest.value} : {label}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Fire:
    """Take a table event; its effect (if any) runs inside the transition."""

    event: str
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Undo:
    """Undo whatever the weights hold and settle (``restored``, or ``offloaded`` when the base is
    away); a failed undo quarantines. ``final``: the request ends (not a move between its phases).
    ``behind``: merged layers may be undone on the side stream, leaving the DiT ``undo_pending``."""

    final: bool = False
    behind: bool = False


class Move(str, Enum):
    """A residency move that changes no weight: where the stage-2 copy is."""

    PREFETCH_STAGE2 = "prefetch_stage2"  # start bringing it to the device while stage 1 runs
    RELEASE_STAGE2 = "release_stage2"  # it is not needed this time (stage 2 runs on the base, or never)


Step = Fire | Undo | Move


@dataclass(frozen=True)
class PhaseDecision:
    """How a phase applies its LoRAs: the policy's verdict, as the mode adjusted it."""

    kind: ApplyKind
    strengths: Mapping[str, float]
    ahead: bool = False  # complete the merge ``req.prepare()`` started

    @property
    def merge_plan(self) -> list[tuple[str, float]]:
        return [(n, s) for n, s in self.strengths.items() if s != 0.0]


def apply_steps(phase: Phase, decision: PhaseDecision) -> tuple[Step, ...]:
    """The steps that apply ``phase``'s LoRAs on the base DiT, from a rest state."""
    if decision.kind is ApplyKind.MERGED:
        return Fire("merge", {"plan": decision.merge_plan}), Fire(f"merged_{phase.value}")
    if decision.kind is ApplyKind.DYNAMIC:
        return Fire("attach", {"strengths": dict(decision.strengths)}), Fire(f"attached_{phase.value}")
    return ()
