"""A request's handle on the shared DiT: phase order and per-request strengths."""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

from torch import nn

from .costmodel import PhaseWork
from .domain import Phase, parse_enum
from .errors import ConfigError, PhaseOrderError, RequestStateError
from .lora_cache import Admission
from .ownership import HeldInterrupts, Ownership
from .registry import ChosenLoRAs


class PhaseHost(Protocol):
    """What a :class:`Request` needs: the phase switches (:class:`~.switch.PhaseSwitch`)."""

    def enter_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                    work: PhaseWork | None) -> nn.Module: ...
    def prepare_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                      work: PhaseWork | None, calls: int) -> bool: ...


class RequestHost(Protocol):
    """What a :class:`RequestScope` needs of the manager: the ownership of the DiT, the request's
    LoRAs held for it, and the request's entry and exit."""

    @property
    def ownership(self) -> Ownership: ...
    def admit(self, admission: Admission) -> None: ...
    def open_request(self, timeout: float | None, admission: Admission) -> Request: ...
    def close_request(self, interrupted: BaseException | None) -> None: ...

_ids = itertools.count(1)

#: The phases a request may enter next, given the last one it entered.
NEXT_PHASES: Mapping[Phase | None, tuple[Phase, ...]] = {
    None: (Phase.STAGE1,),
    Phase.STAGE1: (Phase.STAGE2,),
    Phase.STAGE2: (),
}


class Request:
    """Returned by ``with manager.request() as req``; valid until the ``with`` block ends."""

    def __init__(self, host: PhaseHost, loras: ChosenLoRAs) -> None:
        self.id = next(_ids)
        self._host = host
        self.loras = loras  # the LoRAs this request chose, and their strengths
        self.adapters: dict[str, str] = {}  # LoRA name -> the adapter that holds it (set once the DiT is held)
        # each added LoRA chosen -> where it was when the DiT was taken: "device" (in a slot), "host"
        # (the host cache), "disk" (read for this request)
        self.lora_sources: dict[str, str] = {}
        self._thread = threading.get_ident()
        self.phase: Phase | None = None
        self.entered: list[Phase] = []
        self.strengths: dict[Phase, dict[str, float]] = {}
        self.closed = False
        self.mutated = False  # set once a phase merged into the shared weights
        self.failed: BaseException | None = None  # a weight operation of this request failed
        self.calls = 0  # DiT calls run in the current phase (counted by the forward guard)
        self.work: dict[Phase, PhaseWork] = {}  # what each phase entered said it would run
        self.prepared: tuple[Phase, dict[str, float]] | None = None  # what req.prepare() started
        self.in_step = False  # opened on every rank of the manager's process group (its end is compared)

    def enter(self, phase: Phase | str,
              strengths: Mapping[str, float] | None = None,
              work: PhaseWork | None = None) -> nn.Module:
        """Switch the DiT's weights to ``phase`` and return the module to run for it.

        ``strengths`` overrides the strengths of the LoRAs this request chose, for this phase
        only, e.g. ``{"distilled": 0.5}``. ``work`` says what the phase will run (steps,
        video tokens, DiT calls per step): ``merge_policy="auto"`` weighs merging against
        dynamic adapters with it (the LTX-2 recipe is assumed without it).
        """
        target = self._checked(phase, work, "enter")
        module = self._host.enter_phase(self, target, strengths, work)
        self.calls = 0
        if work is not None:
            self.work[target] = work
        return module

    def prepare(self, phase: Phase | str, strengths: Mapping[str, float] | None = None,
                work: PhaseWork | None = None, *, calls: int = 1) -> bool:
        """Announce that the current phase has ``calls`` DiT calls left, and let the manager start
        ``phase``'s weights behind them: in original mode, when ``phase`` merges into the shared
        DiT, its merge is launched block by block as the last of those calls passes each block (on
        a side stream on CUDA), and ``enter(phase)`` with the same strengths completes it. Returns
        whether anything was started (``False``: ``enter`` switches as usual).

        More DiT calls than announced are refused (``ForwardGuardError``); fewer leave the rest of
        the merge to ``enter``. A failure anywhere undoes what was merged, as for any merge.
        """
        target = self._checked(phase, work, "prepare")
        if self.phase is None:
            raise PhaseOrderError(f"request {self.id} can prepare {target.value!r} only while the phase "
                                  "before it runs; enter that phase first")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
            raise ConfigError(f"calls must be a positive int (the DiT calls the current phase has left), "
                              f"got {calls!r}")
        if self.prepared is not None:
            return False  # once per request
        return self._host.prepare_phase(self, target, strengths, work, calls)

    def _checked(self, phase: Phase | str, work: PhaseWork | None, verb: str) -> Phase:
        if self.closed:
            raise RequestStateError(f"request {self.id} is closed; open a new one with "
                                    "`with manager.request() as req:`")
        if self.failed is not None:
            raise RequestStateError(
                f"request {self.id} failed while switching weights ({self.failed!r}); the DiT was "
                "rolled back, so this request's phases are gone. Open a new request."
            )
        if threading.get_ident() != self._thread:
            raise RequestStateError(f"request {self.id} belongs to another thread; each thread "
                                    "opens its own request")
        target = parse_enum(Phase, phase, "phase")
        allowed = NEXT_PHASES[self.phase]
        if target not in allowed:
            done = ", ".join(p.value for p in self.entered) or "none"
            legal = ", ".join(p.value for p in allowed) or "none (the request is complete)"
            raise PhaseOrderError(
                f"request {self.id} cannot {verb} {target.value!r}: phases entered so far: {done}; "
                f"next legal phase: {legal}. Phases run stage1 then stage2, once each; open a "
                "new request for the next video."
            )
        if work is not None and not isinstance(work, PhaseWork):
            raise ConfigError(f"work must be a PhaseWork(steps, tokens, passes), got {type(work).__name__}")
        return target

    def __repr__(self) -> str:
        return f"Request(id={self.id}, phase={self.phase and self.phase.value}, closed={self.closed})"


class RequestScope(contextlib.ExitStack):
    """What ``manager.request()`` returns: ``with`` it to own the DiT for one request.

    Ctrl-C may land between any two lines, the cleanup's included. The exit is therefore
    ``ExitStack``'s (its loop runs every registered step even after one was interrupted), the steps
    are registered before the DiT is taken, and each is registered twice and idempotent: a close
    (undo, verify) cut short is finished by the second (an interrupted undo quarantines the DiT),
    and the release frees the DiT once. On the main thread a Ctrl-C that arrives while the steps
    run is held until they are done, so it cannot fall between two of them either. The steps
    belong to the ``with`` block: ``pop_all()`` and ``close()`` are refused."""

    def __init__(self, host: RequestHost, timeout: float | None, loras: ChosenLoRAs) -> None:
        super().__init__()
        self._host = host
        self._timeout = timeout
        self._admission = Admission(loras)
        self._interrupts = HeldInterrupts()

    def __enter__(self) -> Request:  # type: ignore[override]
        ownership = self._host.ownership
        ownership.refuse_nested("request()")  # before any step is registered: the outer request's
        try:
            # run last to first: hold Ctrl-C, close twice, let go of the request's LoRAs twice,
            # deliver a held Ctrl-C, release twice
            self.callback(ownership.release_mine)
            self.callback(ownership.release_mine)
            self.callback(self._interrupts.deliver)
            self.callback(self._interrupts.deliver)
            self.callback(self._admission.release)
            self.callback(self._admission.release)
            self.push(self._close)
            self.push(self._close)
            self.callback(self._interrupts.hold)
            self._host.admit(self._admission)  # before the wait: its LoRAs load meanwhile
            return self._host.open_request(self._timeout, self._admission)
        except BaseException:
            super().__exit__(*sys.exc_info())
            raise

    def pop_all(self) -> contextlib.ExitStack:
        raise RequestStateError("a request's cleanup belongs to its `with` block; it cannot be taken out")

    def close(self) -> None:
        raise RequestStateError("a request is closed by leaving its `with` block")

    def _close(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               tb: TracebackType | None) -> bool:
        if self._host.ownership.mine:
            self._host.close_request(exc)
        return False
