"""Runs a mode's plans as transitions of the weight-state machine.

Each :class:`~.modes.table.Fire` step is an event of the mode's table; its effect (a weight
operation from :mod:`.ops`) runs inside the transition, recorded before it writes, and every
transition lands in the trace. An :class:`~.modes.table.Undo` undoes whatever the weights hold,
on the side stream when it may; a failed undo quarantines the DiT. Nothing here decides *what* to
apply (the policy and the mode do) or *who* may run (ownership and the guard).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .domain import WeightState
from .errors import DirtyWeightsError, QuarantinedError, RepairError
from .faults import FaultInjector
from .machine import WeightMachine
from .modes import REST_STATES, Edge, Fire, Move, OriginalMode, Step, Undo
from .ops import shards
from .ops.ahead import MergeAhead
from .ops.clean_source import HostCopy
from .ops.dynamic import PeftAdapters
from .ops.fingerprint import Fingerprint, FingerprintPlan
from .ops.merge import MergeStack
from .ops.side_stream import PendingUndo, SideStream
from .trace import Trace, TransitionRecord

S = WeightState


class Executor:
    """The machine, the weight operations its effects run, and the trace of every transition."""

    def __init__(self, mode: OriginalMode, adapters: PeftAdapters, weights: Mapping[str, torch.Tensor],
                 stack: MergeStack, clean_source: HostCopy | None, side_stream: SideStream | None,
                 faults: FaultInjector, trace: Trace) -> None:
        self.mode = mode
        self.adapters = adapters
        self.stack = stack
        self.weights = dict(weights)  # the managed weights (adapters.base_weights())
        self.fingerprints = FingerprintPlan(self.weights)
        self.clean: Fingerprint = self.fingerprints.compute()
        self.verified: Fingerprint = self.clean  # the last fingerprint found clean (ranks compare it)
        self.clean_source = clean_source
        self.side_stream = side_stream
        self.faults = faults
        self.trace = trace
        self.pending: PendingUndo | None = None  # an undo on the side stream its next user has not settled
        self.ahead: MergeAhead | None = None  # stage 2's merge, started behind stage 1's last calls
        self.context: tuple[int | None, str | None] = (None, None)  # (request id, phase) for the trace
        self.fsdp = shards.fsdp_modules(mode.base.module)  # found once: a write reshards them (FSDP2)
        self.machine = WeightMachine(mode.table, {
            "merge": self._merge,
            "merge_ahead": self._merge_ahead,
            "attach": self._attach,
            "restore": self._restore,
            "repair": self._repair,
            "activate": lambda edge, ctx: self.mode.activate_stage2(),
            "load": lambda edge, ctx: self.mode.load_base(),
        })

    @property
    def state(self) -> WeightState:
        return self.machine.state

    # ------------------------------------------------------------------ steps
    def run(self, steps: Sequence[Step]) -> None:
        """Run a plan's steps in order (the caller rolls back when one fails)."""
        for step in steps:
            if isinstance(step, Fire):
                self.fire(step.event, **step.context)
            elif isinstance(step, Undo):
                self.undo_or_quarantine(final=step.final, behind=step.behind)
            else:
                self.mode.move(Move(step))

    def fire(self, event: str, **context: Any) -> None:
        source = self.state.value
        request_id, phase = self.context
        start = time.perf_counter()
        try:
            touched = self.machine.fire(event, **context)
        except BaseException as exc:
            self.trace.append(TransitionRecord(event, source, self.state.value,
                                               (time.perf_counter() - start) * 1e3, 0,
                                               request_id, phase, ok=False, error=repr(exc)))
            raise
        if touched and self.fsdp:
            shards.reshard(self.fsdp)  # FSDP2 gathers the written shards at the next call
        self.trace.append(TransitionRecord(event, source, self.state.value,
                                           (time.perf_counter() - start) * 1e3, touched,
                                           request_id, phase))

    def quarantine_if_possible(self) -> None:
        if self.machine.can("quarantine"):
            self.fire("quarantine")

    def undo_or_quarantine(self, final: bool = True, behind: bool = False) -> None:
        """Undo whatever the weights hold; if the undo itself fails, quarantine and raise.
        ``final=False``: only moving between phases (a prefetch for the next phase survives).
        ``behind``: merged layers are undone on the side stream (when there is one), and the DiT
        stays ``undo_pending`` until its next user settles it."""
        try:
            behind = (behind and self.side_stream is not None and bool(self.stack.frames)
                      and self.machine.can("restore_behind"))
            self.fire("restore_behind" if behind else "restore", final=final, behind=behind)
            if self.pending is None:
                self.fire(self.mode.settled_event())
        except BaseException as exc:
            self.quarantine_if_possible()
            message = f"restoring the DiT failed ({exc!r}); it is quarantined. " + self.repair_hint()
            if not isinstance(exc, Exception):
                # Ctrl-C and SystemExit stay what they are, so `except Exception` cannot eat them
                exc.add_note(message)
                raise
            raise QuarantinedError(message) from exc

    def quarantine_message(self) -> str:
        return "the DiT is quarantined after a failed restore. " + self.repair_hint()

    def repair_hint(self) -> str:
        if self.clean_source is None:
            return ("No clean source is kept (clean_source=None): manager.repair() can only clear it when the "
                    "weights are still clean; otherwise reload the model.")
        return "Call manager.repair() to restore it from the clean host copy."

    # ------------------------------------------------------------------ between requests
    def settle(self, host: bool = False) -> None:
        """Between requests: a pending undo settled; a DiT left mid-undo with nothing pending is
        quarantined (nothing vouches for it), and one left holding a change is undone."""
        self.settle_pending(host)
        if self.state in REST_STATES or self.state is S.QUARANTINED or self.pending is not None:
            return
        if self.state in (S.RESTORING, S.UNDO_PENDING):
            self.fire("quarantine")
        else:
            self.undo_or_quarantine()

    def settle_pending(self, host: bool = False) -> None:
        """End an undo on the side stream: the caller's stream waits for it on the device (``host``:
        this thread too), its deferred verify is read, and the DiT settles (or is quarantined)."""
        pending = self.pending
        if pending is None:
            return
        assert self.side_stream is not None
        self.side_stream.join(pending.event, host=host)
        context, self.context = self.context, (pending.request_id, None)
        try:
            if pending.fingerprint is not None:
                self.check_clean(pending.fingerprint)
            if self.state is S.UNDO_PENDING:  # kept until here: an interrupt above settles again
                self.fire(pending.settles_to)
        finally:
            self.context = context
            if self.state is not S.UNDO_PENDING:
                self.pending = None

    def verify_behind(self) -> None:
        """Queue the end-of-request verify behind the pending undo; it is read when that settles."""
        assert self.pending is not None and self.side_stream is not None
        with self.side_stream.running():
            self.pending.fingerprint = self.fingerprints.compute()
            self.pending.event = self.side_stream.mark()  # the settle waits for the sums too

    def check_clean(self, now: Fingerprint | None = None) -> None:
        now = now if now is not None else self.fingerprints.compute()
        differing = self.clean.differing(now) + self.mode.stage2_differing()
        if differing:
            self.quarantine_if_possible()
            raise DirtyWeightsError(differing, len(self.clean))
        self.verified = now

    def repair_quarantined(self) -> None:
        try:
            self.fire("repair")
            self.fire("restored")
        except BaseException as exc:
            self.quarantine_if_possible()
            if isinstance(exc, RepairError):
                raise
            raise RepairError(f"repair failed, the DiT stays quarantined: {exc!r}") from exc

    # ------------------------------------------------------------------ merge ahead
    def start_ahead(self, plan: list[tuple[str, float]], calls: int) -> None:
        self.fire("merge_ahead", plan=plan, calls=calls)

    def drop_ahead(self) -> None:
        if self.ahead is not None:
            self.ahead.abandon()  # idempotent: an interrupt here is finished by the resumed restore
            self.ahead = None

    # ------------------------------------------------------------------ effects
    def _merge(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self.faults.hit("merge.before")
        ahead = self.ahead
        if ahead is not None:
            written = ahead.complete()
            self.ahead = None  # only once complete: until then a restore abandons it (its hooks removed)
        else:
            written = sum(self.stack.push(name, self.adapters.targets(name), strength)
                          for name, strength in ctx["plan"])
        self.faults.hit("merge.after")
        return written

    def _merge_ahead(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self.ahead = MergeAhead(self.mode.base.module, self.stack,
                                [(n, s, self.adapters.targets(n)) for n, s in ctx["plan"]], ctx["calls"],
                                self.side_stream or SideStream(self.mode.device))
        return 0

    def _attach(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self.adapters.activate(ctx["strengths"])
        return 0

    def _restore(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self.drop_ahead()
        self.faults.hit("restore.before")
        self.adapters.deactivate()
        stream = self.side_stream if ctx.get("behind") else None
        if stream is not None:
            with stream.running():
                written = self.stack.pop_all(side_stream=True)
                event = stream.mark()
        else:
            written = self.stack.pop_all()
        self.mode.deactivate(final=ctx.get("final", True))
        self.faults.hit("restore.after")
        if stream is not None:
            self.pending = PendingUndo(event, self.mode.settled_event(), self.context[0])
        return written

    def _repair(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        if self.side_stream is not None:
            self.side_stream.join(host=True)  # a failed undo on the side stream may have left work queued
        self.pending = None
        self.drop_ahead()
        self.adapters.deactivate()
        self.mode.reset()
        written = 0
        if self.clean_source is not None:
            written = self.clean_source.restore(self.weights, self.faults)
        differing = self.clean.differing(self.fingerprints.compute())
        if differing and self.clean_source is None:
            raise RepairError(f"no clean source and {len(differing)} weights differ from clean (e.g. "
                              f"{differing[0]!r}): the manager was built with clean_source=None; reload "
                              "the model from its checkpoint and build a new manager")
        if differing:
            raise RepairError(f"the clean source does not match the clean fingerprint "
                              f"({len(differing)} weights differ, e.g. {differing[0]!r})")
        self.stack.forget()
        return written + self.mode.repair_stage2(self.weights)


def build_executor(mode: OriginalMode, adapters: PeftAdapters, stack: MergeStack, clean_source: str | None,
                   overlap: bool | None, faults: FaultInjector, trace: Trace) -> Executor:
    """An executor with its clean source and, for an undo behind the caller, its side stream
    (``overlap=None``: with the ``fused`` kernel on a CUDA device)."""
    weights = adapters.base_weights()
    source = (HostCopy(weights, shared=mode.shared_clean_copies(weights)) if clean_source == "host_copy"
              else None)
    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    if overlap is None:
        overlap = stack.strategy.name == "fused" and device.type == "cuda"
    return Executor(mode, adapters, weights, stack, source, SideStream(device) if overlap else None, faults, trace)
