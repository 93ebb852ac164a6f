"""The weight-state machine: a ``transitions.Machine`` over one mode's table (:mod:`.modes`).

The state lives here, set only by :meth:`WeightMachine.fire`; nothing reads it back from tensors.
An edge's effect (a weight operation) runs as the transition's callback, from the strategies the
executor maps effect names to.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from transitions import EventData, Machine

from .domain import WeightState
from .errors import IllegalTransitionError
from .modes.table import Edge, ModeTable

#: Effect callback: receives the edge and the keyword arguments the event was fired with;
#: returns the number of weight bytes it read or wrote (for the trace).
Effect = Callable[[Edge, Mapping[str, Any]], int]


class WeightMachine:
    """A ``transitions.Machine`` over one mode's table, with typed errors and effect dispatch."""

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
