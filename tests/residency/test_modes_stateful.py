"""A Hypothesis state machine drives the real ResidencyManager in mode 'resident' and 'snapshot'
(with and without low VRAM) through request lifecycles, stage-1 and stage-2 strength overrides,
forwards, repairs and injected failures (in a switch, in a request's close, in a repair), and
compares it after every step with a plain Python model of the weight state, of where each DiT
is, of which fault points each operation passes and how often, and of what a failure leaves.

The model is written from the documented behaviour (docs/architecture.md, the ``modes``
docstring), not from ``ltx2_residency.modes``: in particular the stage-2 DiT that snapshot mode
starts prefetching after stage 1 is expected to still be in flight (not re-copied) when stage 2
activates it, the stage-2 DiT is released when a request ends, and a low-VRAM DiT never has
both DiTs on the device, not even halfway through an operation (checked at every fault point).
Weight cleanliness is checked with ``weight_bits``, independently of the manager's
fingerprints.

Faults are armed only at points the next operation will pass, drawn from the model's list of
them (which hit of which point), so every armed fault fires (a repair's ``repair.layer`` is the
one point the model does not count); a fault inside an undo must quarantine, anywhere else it
must roll back. A successful operation must pass exactly the model's points, no more: that is
how a second copy of a DiT already in flight shows. Besides step-by-step rules,
``full_request`` runs a whole request (stage 1, stage 2, close) in one step, so most examples
reach stage 2.

The src bugs this machine found are pinned down by ``tests/residency/test_modes_regressions.py``.

Requests are driven through the context manager's ``__enter__``/``__exit__`` by hand so a
request can stay open across steps. The steps run, by rule, then stage-2 entries and the
faults that fired, are printed at the end of the module's run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from ltx2_residency import (
    DirtyWeightsError,
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    QuarantinedError,
    RepairError,
    Request,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.domain import Residency
from ltx2_residency.testing import weight_bits
from machines import BodyError, exit_with, failing_hit, injected_fault, material, step_report

S = WeightState
HQ = {"stage1": 0.25, "stage2": 1.0}
MODES = [("resident", False), ("snapshot", False), ("snapshot", True)]
#: Stage-1 strength overrides: None applies the HQ stage-1 strength, 0.0 runs the bare base.
STAGE1_OVERRIDES: list[float | None] = [None, 0.0]
#: Stage-2 strength overrides: None and 1.0 hit the pre-merged copy, 0.5 runs dynamic on the
#: base, 0.0 runs the bare base.
STAGE2_OVERRIDES: list[float | None] = [None, 1.0, 0.5, 0.0]
FAULT_KINDS = ["runtime", "oom", "keyboard_interrupt"]
#: How a request body ends: normally, by an exception, by Ctrl-C.
BODIES = ["normal", "error", "keyboard_interrupt"]
#: Whether an operation gets a fault: a third of the switches and repairs, half of the closes
#: (the close path is where a failed undo must leave nothing moving).
_FAULT_IN = {"stage1": st.sampled_from([False, False, True]), "stage2": st.sampled_from([False, False, True]),
             "repair": st.sampled_from([False, False, True]), "close": st.booleans(),
             "close_during_prefetch": st.booleans()}

#: Rule executions of this module, by rule ("examples" counts fresh managers, not steps).
STEPS: Counter[str] = Counter()
#: Events within the steps: stage-2 entries, faults armed and fired (by point and operation).
TALLIES: Counter[str] = Counter()
_report_steps = step_report(STEPS, __name__, TALLIES)


def _lora() -> LoRASpec:
    return LoRASpec(name="distilled", path=material().lora_paths["distilled"], strengths=HQ)


def _targets() -> tuple[str, ...]:
    return material().lora_targets["distilled"]


def _manager(mode: str, policy: str, low_vram: bool, faults: FaultInjector | None = None) -> ResidencyManager:
    return ResidencyManager(copy.deepcopy(material().base), mode=mode, loras=[_lora()], merge_policy=policy,
                            low_vram=low_vram if mode == "snapshot" else None, request_timeout=5.0,
                            faults=faults)


@functools.cache
def _reference(phase: str, policy: str, strength: float) -> torch.Tensor:
    """The output original mode gives for the same phase and strength: the modes must not change
    a bit of it (stage 2 at the pre-merged strength equals an in-place merge at that strength)."""
    mgr = _manager("original", policy, False)
    mat = material()
    with torch.no_grad(), mgr.request() as req:
        if phase == "stage1":
            out = req.enter("stage1", strengths={"distilled": strength})(**mat.inputs)[0]
        else:
            req.enter("stage1")
            out = req.enter("stage2", strengths={"distilled": strength})(**mat.inputs)[0]
    mgr.close()
    return out



#: Points the model does not count: the forward's, repair's per-weight one (its count depends on
#: the clean source), and the after-write twins of the layer points (one per layer written, swept
#: by the fault matrix and the interrupt sweep).
UNMODELLED = ("forward", "repair.layer", "merge.layer.written", "restore.layer.written")

class WatchedFaults(FaultInjector):
    """A FaultInjector that also looks at where the DiTs are at every fault point an operation
    passes: the points lie inside the moves, so this sees the states between two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: Any = None  # the manager's mode strategy, once built
        self.both_on_device: list[str] = []

    def hit(self, point: str) -> None:
        mode = self.mode
        if mode is not None and mode.low_vram:
            where = {d.name: d.residency.value for d in mode.dits}
            if all(r is not Residency.OFFLOADED for r in (d.residency for d in mode.dits)):
                self.both_on_device.append(f"at {point}: {where}")
        super().hit(point)


def _placement(dit: Any) -> str:
    """Where a DiT's tensors are bound, read from the tensors (the manager stores residency and
    never reads it back): "host" (its snapshot), "device", or "mixed" (half moved)."""
    snapshot = dit._snapshot
    if snapshot is None:
        return "device"  # no snapshot: it never moves
    on_host = [s.data_ptr() == h.data_ptr() for s, h in zip(dit._slots, snapshot, strict=True)]
    return "host" if all(on_host) else "device" if not any(on_host) else "mixed"


def _differing(weights: Mapping[str, torch.Tensor], bits: Mapping[str, torch.Tensor]) -> list[str]:
    """Names whose live weight's bits differ from ``bits`` (a ``weight_bits`` copy); the live
    weights are only viewed as integers, not copied, so this is cheap enough for every step."""
    assert weights.keys() == bits.keys()
    return [n for n, w in weights.items() if not torch.equal(w.detach().view(-1).view(bits[n].dtype), bits[n])]


@dataclass(frozen=True)
class Hits:
    """``count`` hits of fault point ``point`` in one part of an operation. ``undo``: the part
    undoes a change, where a failure quarantines; otherwise it applies one, where a failure rolls
    back. ``base_away``: the base is off the device then (low VRAM), so the rollback streams it
    back and ends OFFLOADED."""

    point: str
    count: int
    undo: bool
    base_away: bool = False


@dataclass(frozen=True)
class Fault:
    point: str
    on_hit: int
    kind: str
    where: str  # the operation it is armed for, for the report


def _locate(hits: list[Hits], fault: Fault) -> tuple[Hits, int]:
    """The part of the operation the fault's hit falls in, and which hit of that part it is."""
    seen = 0
    for h in hits:
        if h.point != fault.point:
            continue
        if fault.on_hit <= seen + h.count:
            return h, fault.on_hit - seen
        seen += h.count
    raise AssertionError(f"{fault} is not on the operation's path {hits}")


# ---------------------------------------------------------------- the state machine


class ModesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: ResidencyManager | None = None
        self.cm: contextlib.AbstractContextManager[Request] | None = None
        self.req: Request | None = None

    # ------------------------------------------------------------ set-up
    @initialize(mode=st.sampled_from(MODES), policy=st.sampled_from(["merge", "dynamic"]))
    def build(self, mode: tuple[str, bool], policy: str) -> None:
        self.mode, self.lv = mode
        self.snapshot = self.mode == "snapshot"
        self.policy = policy
        self.n = len(_targets())
        # the plain model
        self.expected: WeightState = S.CLEAN
        self.res = self._settled_res()
        self.merged: int | None = 0  # base layers holding a merge (None: unknown, after a failed repair)
        self.attached = 0  # layers whose adapters are enabled
        self.entered: list[str] = []
        self.active_key: tuple[str, str, float] | None = None  # the output the active DiT gives
        self.failed = False
        self.refused_open = False
        self.closed_empty = False
        self.fired: list[str] = []
        self.dit: nn.Module | None = None
        self.forwarded: set[tuple[str, str, float]] = set()
        self.refusals: set[tuple[Any, ...]] = set()
        self.idle_checks: set[tuple[Any, ...]] = set()

    def _ensure(self) -> ResidencyManager:
        """The manager, built at the first step that needs it: an example that Hypothesis drops
        before its first step (every rule it could run switched off) builds none."""
        if self.mgr is not None:
            return self.mgr
        STEPS["examples"] += 1
        self.faults = WatchedFaults()
        self.mgr = _manager(self.mode, self.policy, self.lv, self.faults)
        self.faults.mode = self.mgr._executor.mode
        assert self.mgr.low_vram is self.lv
        self.clean_bits = weight_bits(self.mgr.managed_weights)
        assert set(self.clean_bits) == set(_targets())
        stage2 = self.mgr._executor.mode.stage2
        assert stage2 is not None
        self.stage2_weights = {n: stage2.module.get_submodule(n).weight for n in self.clean_bits}
        self.stage2_bits = weight_bits(self.stage2_weights)
        # the copy holds the LoRA: a copy equal to the base would hide a missing merge
        assert any(not torch.equal(self.stage2_bits[n], self.clean_bits[n]) for n in self.clean_bits)
        self.state_and_residency_match()
        return self.mgr

    # ------------------------------------------------------------ model helpers
    @property
    def quarantined(self) -> bool:
        return self.expected is S.QUARANTINED

    @property
    def can_switch(self) -> bool:
        return self.req is not None and not self.failed and not self.quarantined and len(self.entered) < 2

    def _settled_res(self) -> dict[str, str]:
        return {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}

    def _deactivated(self, final: bool) -> dict[str, str]:
        """Residency once the undo has moved back to the base DiT (``final``: the request ends)."""
        res = dict(self.res)
        if self.snapshot and (final or self.expected is S.STAGE2_MERGED):
            res["stage2"] = "offloaded"  # released after the request
        if final and self.lv and res["base"] == "offloaded":
            res["base"] = "prefetching"  # streams back for the next request
        return res

    def _prefetch(self, base_away: bool = False) -> list[Hits]:
        return [Hits("prefetch.before", 1, False, base_away), Hits("prefetch.after", 1, False, base_away)]

    def _apply(self, op: str) -> list[Hits]:
        return [Hits(f"{op}.before", 1, False), Hits(f"{op}.layer", self.n, False), Hits(f"{op}.after", 1, False)]

    def _undo_hits(self, final: bool) -> list[Hits]:
        """The points an undo of the current state passes (none when there is nothing to undo)."""
        if self.expected in (S.CLEAN, S.OFFLOADED, S.QUARANTINED):
            return []
        assert self.merged is not None
        hits = [Hits("restore.before", 1, True), Hits("detach.before", 1, True)]
        if self.attached:
            hits.append(Hits("detach.layer", self.attached, True))
        if self.merged:
            hits.append(Hits("restore.layer", self.merged, True))
        if final and self.lv and self.res["base"] == "offloaded":
            hits += [Hits("prefetch.before", 1, True), Hits("prefetch.after", 1, True)]
        return [*hits, Hits("restore.after", 1, True)]

    def _stage1_hits(self, s1: float) -> list[Hits]:
        hits: list[Hits] = []
        if self.expected is S.OFFLOADED and self.res["base"] == "offloaded":
            hits += self._prefetch(base_away=True)  # load_base: nothing streams the base back yet
        if s1 != 0.0:
            hits += self._apply("merge" if self.policy == "merge" else "attach")
        if self.snapshot and not self.lv and self.res["stage2"] == "offloaded":
            hits += self._prefetch()  # stage 2's DiT starts streaming in, overlapping stage 1
        return hits

    def _stage2_hits(self, s2: float) -> list[Hits]:
        hits = self._undo_hits(final=False)
        if s2 == HQ["stage2"]:
            if self.snapshot and self.res["stage2"] == "offloaded":
                hits += self._prefetch(base_away=self.lv)  # low VRAM: the base is evicted first
        elif s2 != 0.0:
            hits += self._apply("attach")  # an override runs dynamic on the base
        return hits

    def _repair_hits(self) -> list[Hits]:
        """The points a repair passes before it rewrites the weights; ``repair.layer`` comes last
        (its count depends on the clean source, so only its first hit is ever armed)."""
        hits = [Hits("detach.before", 1, True)]
        if self.attached:
            hits.append(Hits("detach.layer", self.attached, True))
        if self.res["base"] != "resident":
            hits += [Hits("prefetch.before", 1, True), Hits("prefetch.after", 1, True)]
        return [*hits, Hits("repair.layer", 1, True)]

    def _draw_fault(self, data: st.DataObject, hits: list[Hits], where: str) -> Fault | None:
        totals: dict[str, int] = {}
        for h in hits:
            totals[h.point] = totals.get(h.point, 0) + h.count
        if not totals or not data.draw(_FAULT_IN[where], label=f"fault in {where}"):
            return None
        point = data.draw(st.sampled_from(list(totals)), label="fault point")
        on_hit = data.draw(failing_hit(totals[point]), label="on hit")
        return Fault(point, on_hit, data.draw(st.sampled_from(FAULT_KINDS), label="fault kind"), where)

    def _arm(self, fault: Fault | None) -> list[BaseException]:
        made: list[BaseException] = []
        if fault is not None:
            TALLIES["faults_armed"] += 1
            self.faults.arm(fault.point, injected_fault(fault.kind, made), on_hit=fault.on_hit)
        return made

    def _disarm(self) -> None:
        self.fired = list(self.faults.fired)
        self.faults.disarm()

    def _fired(self, fault: Fault, made: list[BaseException], raised: BaseException) -> BaseException:
        """The armed fault fired once and surfaced (as raised, as the cause, or as a note)."""
        assert self.fired == [fault.point], (fault, self.fired)
        assert len(made) == 1
        TALLIES["faults_fired"] += 1
        TALLIES[f"fired:{fault.point}"] += 1
        TALLIES[f"fired_in:{fault.where}"] += 1
        injected = made[0]
        noted = any(repr(injected) in note for note in getattr(raised, "__notes__", []))
        assert raised is injected or raised.__cause__ is injected or noted, (raised, injected)
        return injected

    def _check_hits(self, before: Mapping[str, int], hits: list[Hits]) -> None:
        """A successful operation passed exactly the points the model lists: no second copy of a
        DiT already in flight, no move or layer write more than the documented ones."""
        want: Counter[str] = Counter()
        for h in hits:
            want[h.point] += h.count
        got = Counter({p: n - before.get(p, 0) for p, n in self.faults.hits.items()
                       if p not in UNMODELLED and n != before.get(p, 0)})
        assert got == want, f"fault points passed {dict(got)}, the model expects {dict(want)}"

    def _failed_restore_record(self, injected: BaseException, since: int) -> None:
        assert self.mgr is not None
        n = self.mgr.trace.total - since
        records = list(self.mgr.trace)[-n:] if n else []
        assert any(not r.ok and r.event in ("restore", "restore_behind") and r.error == repr(injected) for r in records)

    def _quarantined_at(self, hit: Hits, k: int, final: bool) -> None:
        """What an undo that failed at the ``k``-th hit of ``hit`` leaves: it stops there."""
        assert self.merged is not None
        if hit.point == "detach.layer":
            self.attached -= k - 1
        elif hit.point == "restore.layer":
            self.attached = 0
            self.merged -= k - 1
        elif hit.point in ("prefetch.before", "prefetch.after", "restore.after"):
            # the weights are back; the move to the base DiT got this far
            self.attached = self.merged = 0
            res = self._deactivated(final)
            if hit.point == "prefetch.before":
                res["base"] = "offloaded"
            self.res = res
        self.expected = S.QUARANTINED

    def _rolled_back(self, base_away: bool) -> None:
        """Where an apply failure leaves the DiTs: the change undone, the stage-2 DiT released."""
        self.merged = self.attached = 0
        self.res = self._settled_res()
        if base_away:
            # the base was evicted for stage 2 (or not loaded yet): it streams back
            self.expected = S.OFFLOADED
            self.res["base"] = "prefetching"
        else:
            self.expected = S.CLEAN

    # ------------------------------------------------------------ operations
    def _open(self) -> bool:
        assert self.mgr is not None and self.req is None
        cm = self.mgr.request()
        if self.quarantined:
            STEPS["open_quarantined"] += 1
            self.refused_open = True  # until the next repair
            with pytest.raises(QuarantinedError, match="repair"):
                cm.__enter__()
            return False
        self.req = cm.__enter__()
        self.cm = cm
        self.entered, self.active_key, self.failed, self.dit = [], None, False, None
        return True

    def _enter(self, phase: str, override: float | None, data: st.DataObject) -> None:
        assert self.req is not None and self.mgr is not None
        strength = HQ[phase] if override is None else override
        hits = self._stage1_hits(strength) if phase == "stage1" else self._stage2_hits(strength)
        fault = self._draw_fault(data, hits, phase)
        before = dict(self.faults.hits)
        total = self.mgr.trace.total
        stage2_was = self.res["stage2"]
        made = self._arm(fault)
        overrides = None if override is None else {"distilled": override}
        try:
            if fault is None:
                self.dit = self.req.enter(phase, strengths=overrides)
                self._check_hits(before, hits)
                self._entered(phase, strength, stage2_was)
                return
            with pytest.raises(BaseException) as info:
                self.req.enter(phase, strengths=overrides)
        finally:
            self._disarm()
        injected = self._fired(fault, made, info.value)
        hit, k = _locate(hits, fault)
        if hit.undo:  # the previous phase's undo failed: quarantined, the failure as the cause
            if isinstance(injected, Exception):
                assert isinstance(info.value, QuarantinedError) and info.value.__cause__ is injected
                assert "quarantined" in str(info.value) and "repair()" in str(info.value)
            else:  # a Ctrl-C stays a Ctrl-C, the quarantine noted on it
                assert info.value is injected
                assert any("repair()" in note for note in getattr(injected, "__notes__", []))
            self._failed_restore_record(injected, total)
            self._quarantined_at(hit, k, final=False)
        else:
            assert info.value is injected, "an apply failure propagates as raised"
            # also where stage 1 applied nothing: the stage-2 prefetch it queued is released
            self._rolled_back(hit.base_away)
        self.failed = True
        self.active_key = None
        self.dit = None

    def _entered(self, phase: str, strength: float, stage2_was: str) -> None:
        """The model after a successful switch."""
        assert self.mgr is not None
        self.entered.append(phase)
        self.merged = self.attached = 0
        if phase == "stage1":
            self.res["base"] = "resident"
            if strength == 0.0:
                self.expected = S.CLEAN
            elif self.policy == "merge":
                self.expected, self.merged = S.STAGE1_MERGED, self.n
            else:
                self.expected, self.attached = S.STAGE1_DYNAMIC, self.n
            if self.snapshot and not self.lv and self.res["stage2"] == "offloaded":
                self.res["stage2"] = "prefetching"
            self.active_key = ("stage1", self.policy if strength != 0.0 else "dynamic", strength)
            assert self.dit is self.mgr._executor.mode.base.module
            return
        TALLIES["stage2_entered"] += 1
        if strength == HQ["stage2"]:
            self.expected = S.STAGE2_MERGED
            self.res = {"base": "offloaded" if self.lv else "resident", "stage2": "resident"}
            self.active_key = ("stage2", "merge", strength)
            assert self.dit is self.mgr._executor.mode.stage2.module  # type: ignore[union-attr]
            if stage2_was != "offloaded":
                # the copy already on the device or in flight is the one stage 2 runs on: no
                # second host-to-device copy at the switch (that overlap is snapshot mode's point)
                rec = [r for r in self.mgr.trace if r.event == "activate_stage2"][-1]
                assert rec.bytes_touched == 0, rec
        else:
            self.res = self._settled_res()  # an override releases the stage-2 prefetch
            self.expected = S.STAGE2_DYNAMIC if strength != 0.0 else S.CLEAN
            self.attached = self.n if strength != 0.0 else 0
            self.active_key = ("stage2", "dynamic", strength)
            assert self.dit is self.mgr._executor.mode.base.module

    def _close(self, body: str, data: st.DataObject) -> None:
        assert self.cm is not None and self.req is not None and self.mgr is not None
        hits = self._undo_hits(final=True)
        fault = self._draw_fault(data, hits, "close_during_prefetch" if "prefetching" in self.res.values() else "close")
        before = dict(self.faults.hits)
        total = self.mgr.trace.total
        req, cm = self.req, self.cm
        self.closed_empty |= not self.entered and not self.failed
        self.cm = self.req = None
        self.active_key, self.dit = None, None
        made = self._arm(fault)
        raised: BaseException | None = None
        exc = KeyboardInterrupt() if body == "keyboard_interrupt" else BodyError("client went away")
        try:
            if fault is None and body == "normal":
                assert not cm.__exit__(None, None, None)
            else:
                with pytest.raises(BaseException) as info:
                    if body == "normal":
                        cm.__exit__(None, None, None)
                    else:
                        exit_with(cm, exc)
                raised = info.value
        finally:
            self._disarm()
        assert req.closed
        if fault is None:
            if body != "normal":
                assert raised is exc, "the body's exception is not swallowed or replaced"
            self._check_hits(before, hits)
            if hits:
                self.merged = self.attached = 0
                self.res = self._deactivated(final=True)
                self.expected = S.CLEAN if self.res["base"] == "resident" else S.OFFLOADED
            elif self.snapshot and not self.quarantined:
                # nothing to undo (a stage 1 without LoRA, a failed switch): the stage-2 DiT is
                # released all the same
                self.res["stage2"] = "offloaded"
        else:
            assert raised is not None
            injected = self._fired(fault, made, raised)
            if not isinstance(injected, Exception):
                assert raised is injected  # a Ctrl-C inside the undo stays a Ctrl-C
                assert any("repair()" in note for note in getattr(injected, "__notes__", []))
            elif body == "keyboard_interrupt":
                assert raised is exc  # the body's Ctrl-C keeps propagating, the quarantine noted
                assert any("repair()" in note for note in getattr(exc, "__notes__", []))
            else:
                assert isinstance(raised, QuarantinedError) and raised.__cause__ is injected
                assert "quarantined" in str(raised) and "repair()" in str(raised)
            self._failed_restore_record(injected, total)
            hit, k = _locate(hits, fault)
            self._quarantined_at(hit, k, final=True)
        if not self.quarantined:
            # the request is over: nothing of it stays on the device or in flight, except the
            # low-VRAM base streaming back for the next request
            mem = self.mgr.memory()
            if self.res["stage2"] == "offloaded":
                assert mem["stage2_in_flight_bytes"] == 0
            if not (self.lv and self.expected is S.OFFLOADED):
                assert mem["base_in_flight_bytes"] == 0

    def _repair(self, data: st.DataObject) -> None:
        assert self.mgr is not None and self.quarantined
        hits = self._repair_hits()
        fault = self._draw_fault(data, hits, "repair")
        if fault is not None and fault.point == "repair.layer":
            fault = Fault("repair.layer", 1, fault.kind, fault.where)
        made = self._arm(fault)
        try:
            if fault is None:
                self.mgr.repair()
            else:
                with pytest.raises(BaseException) as info:
                    self.mgr.repair()
        finally:
            self._disarm()
        if fault is not None and not made:
            # the clean source this mode repairs from passes no repair.layer point: a plain repair
            assert fault.point == "repair.layer"
            TALLIES["repair_without_layer_points"] += 1
            fault = None
        if fault is None:
            STEPS["repair"] += 1
            assert self.mgr.state is S.CLEAN
            self.expected = S.CLEAN
            self.res = self._settled_res()
            self.merged = self.attached = 0
            self.refused_open = False
            self.mgr.verify_clean()
            return
        STEPS["repair_failed"] += 1
        injected = self._fired(fault, made, info.value)
        assert isinstance(info.value, RepairError) and "stays quarantined" in str(info.value)
        assert info.value is injected or info.value.__cause__ is injected
        hit, k = _locate(hits, fault)
        if hit.point == "detach.layer":
            self.attached -= k - 1
        elif hit.point != "detach.before":
            # the repair got to the moves: every prefetch cancelled, the stage-2 DiT released
            # first (low VRAM never holds both DiTs), the base on its way back
            self.attached = 0
            self.res = self._settled_res()
            self.res["base"] = {"prefetch.before": "offloaded", "prefetch.after": "prefetching"}.get(
                hit.point, "resident")
            if hit.point == "repair.layer":
                self.merged = None  # partly rewritten

    # ------------------------------------------------------------ rules
    @precondition(lambda self: self.req is None and (not self.quarantined or not self.refused_open))
    @rule()
    def open_request(self) -> None:
        self._ensure()
        if self._open():
            STEPS["open"] += 1

    @precondition(lambda self: self.can_switch and not self.entered)
    @rule(override=st.sampled_from(STAGE1_OVERRIDES), data=st.data())
    def enter_stage1(self, override: float | None, data: st.DataObject) -> None:
        STEPS["enter_stage1"] += 1
        self._enter("stage1", override, data)

    @precondition(lambda self: self.can_switch and self.entered == ["stage1"])
    @rule(override=st.sampled_from(STAGE2_OVERRIDES), data=st.data())
    def enter_stage2(self, override: float | None, data: st.DataObject) -> None:
        STEPS["enter_stage2"] += 1
        self._enter("stage2", override, data)

    # an empty request is closed once per manager: the steps go to requests that switch
    @precondition(lambda self: self.req is not None and (self.entered or self.failed or not self.closed_empty))
    @rule(body=st.sampled_from(BODIES), data=st.data())
    def close_request(self, body: str, data: st.DataObject) -> None:
        STEPS["close_during_prefetch" if "prefetching" in self.res.values() else "close"] += 1
        self._close(body, data)

    # Hypothesis turns a random subset of rules off in each example (swarm testing), and an
    # example in which every rule that could run next is off ends as invalid, its steps wasted.
    # This rule can always run: it takes whichever step comes next in a request's life.
    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        self._ensure()
        if self.req is None:
            if self.quarantined:
                STEPS["advance:repair"] += 1
                self._repair(data)
            else:
                STEPS["advance:open"] += 1
                assert self._open()
        elif self.can_switch:
            phase = "stage2" if self.entered else "stage1"
            STEPS[f"advance:enter_{phase}"] += 1
            overrides = STAGE2_OVERRIDES if self.entered else STAGE1_OVERRIDES
            self._enter(phase, data.draw(st.sampled_from(overrides), label="override"), data)
        else:
            STEPS["advance:close"] += 1
            self._close(data.draw(st.sampled_from(BODIES), label="body"), data)

    # like `advance`, this can always run: it first ends what is under way
    @rule(stage1=st.sampled_from(STAGE1_OVERRIDES), stage2=st.sampled_from([*STAGE2_OVERRIDES, "skip"]),
          body=st.sampled_from(BODIES), run=st.booleans(), data=st.data())
    def full_request(self, stage1: float | None, stage2: float | str | None, body: str, run: bool,
                     data: st.DataObject) -> None:
        """A whole request in one step: stage 1, stage 2, close (a fault in any of them). With
        ``stage2="skip"`` the client goes away after stage 1, while stage 2's DiT streams in."""
        self._ensure()
        STEPS["full_request"] += 1
        if self.req is not None:
            self._close(body, data)
        if self.quarantined:
            self._repair(data)
            if self.quarantined:
                return
        assert self._open()
        self._enter("stage1", stage1, data)
        if run and not self.failed:
            self._forward()
        if not self.failed and stage2 != "skip":
            assert not isinstance(stage2, str)
            self._enter("stage2", stage2, data)
            if run and not self.failed:
                self._forward()
        self._close(body, data)

    # forwards are the slow part: once per distinct output per manager
    @precondition(lambda self: self.req is not None and self.active_key is not None
                  and self.active_key not in self.forwarded)
    @rule()
    def forward(self) -> None:
        self._forward()

    def _forward(self) -> None:
        if self.active_key in self.forwarded:
            return
        STEPS["forward"] += 1
        assert self.dit is not None and self.active_key is not None
        with torch.no_grad():
            out = self.dit(**material().inputs)[0]
        assert torch.equal(out, _reference(*self.active_key)), self.active_key
        self.forwarded.add(self.active_key)

    @precondition(lambda self: self.req is None and self.quarantined)
    @rule(data=st.data())
    def repair(self, data: st.DataObject) -> None:
        self._repair(data)

    @precondition(lambda self: self._refusal_key() not in self.refusals)
    @rule()
    def run_refused_dit(self) -> None:
        """A DiT that must not run now is refused before it computes anything: the DiT the active
        phase does not run on, a handle kept past its request, a quarantined or moving DiT."""
        self._ensure()
        assert self.mgr is not None
        self.refusals.add(self._refusal_key())
        mode = self.mgr._executor.mode
        stage2 = mode.stage2
        assert stage2 is not None
        module, expect = mode.base.module, "outside a request phase"
        if self.quarantined:
            expect = "quarantined"
        elif self.active_key is not None:
            on_stage2 = self.expected is S.STAGE2_MERGED
            module = mode.base.module if on_stage2 else stage2.module
            active = "stage2" if on_stage2 else "base"
            expect = f"ran while the active DiT is {active!r} (resident)"
        elif self.res["base"] != "resident":
            expect = f"the base DiT ran while the active DiT is 'base' ({self.res['base']})"
        STEPS["run_refused_dit"] += 1
        state, total, res = self.mgr.state, self.mgr.trace.total, self.mgr.residency()
        with torch.no_grad(), pytest.raises(ForwardGuardError) as info:
            module(**material().inputs)
        assert expect in str(info.value), (expect, str(info.value))
        assert (self.mgr.state, self.mgr.trace.total, self.mgr.residency()) == (state, total, res)

    @precondition(lambda self: self.req is None and self._refusal_key() not in self.idle_checks)
    @rule()
    def between_requests(self) -> None:
        """Between requests verify_clean() sees exactly the model's dirty weights, and repair() of a
        DiT that is not quarantined (a low-VRAM one rests OFFLOADED) changes nothing."""
        self._ensure()
        assert self.mgr is not None
        self.idle_checks.add(self._refusal_key())
        STEPS["between_requests"] += 1
        state, res = self.mgr.state, self.mgr.residency()
        if self.merged:
            with pytest.raises(DirtyWeightsError) as info:
                self.mgr.verify_clean()
            assert len(info.value.differing) == self.merged
            assert f"{self.merged} of {self.n} managed weights differ" in str(info.value)
        elif self.merged == 0:
            self.mgr.verify_clean()
        if not self.quarantined:
            total = self.mgr.trace.total
            self.mgr.repair()
            assert self.mgr.trace.total == total
        assert (self.mgr.state, self.mgr.residency()) == (state, res)

    def _refusal_key(self) -> tuple[Any, ...]:
        return (self.expected, self.req is not None, self.active_key, tuple(self.res.values()))

    # ------------------------------------------------------------ invariants
    @invariant()
    def state_and_residency_match(self) -> None:
        if self.mgr is None:
            return
        assert self.mgr.state is self.expected, (self.mgr.state, self.expected)
        res = self.mgr.residency()
        assert res == self.res, (res, self.res)
        mem = self.mgr.memory()
        for dit in self.mgr._executor.mode.dits:
            # a copy is in flight exactly while the model says it is prefetching
            assert (mem[f"{dit.name}_in_flight_bytes"] > 0) == (self.res[dit.name] == "prefetching"), dit.name
            # no DiT half moved: every tensor bound where its residency says, and counted so
            resident = self.res[dit.name] == "resident"
            assert _placement(dit) == ("device" if resident else "host"), (dit.name, self.res[dit.name])
            assert mem[f"{dit.name}_device_bytes"] == (dit.nbytes() if resident else 0), dit.name
        if len(self.mgr.trace):
            assert self.mgr.trace[-1].dest == self.mgr.state.value
        if self.lv:
            assert "offloaded" in res.values(), res
            assert not self.faults.both_on_device, self.faults.both_on_device
        assert not self.faults._arms, "a fault is still armed after its step"

    @invariant()
    def weights_match(self) -> None:
        if self.mgr is None or self.merged is None:
            return
        differing = _differing(self.mgr.managed_weights, self.clean_bits)
        assert len(differing) == self.merged, f"{len(differing)} weights differ from clean, e.g. {differing[:3]}"

    @invariant()
    def stage2_copy_never_changes(self) -> None:
        if self.mgr is None:
            return
        stage2 = self.mgr._executor.mode.stage2
        assert stage2 is not None
        # the same Parameter objects: a prefetch or release rebinds their data, never replaces them
        now = {n: stage2.module.get_submodule(n).weight for n in self.stage2_weights}
        assert all(now[n] is self.stage2_weights[n] for n in now)
        assert not _differing(now, self.stage2_bits)

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        if self.mgr is None:
            return
        try:
            if self.cm is not None:
                self.cm.__exit__(None, None, None)
                assert self.mgr.state in (S.CLEAN, S.OFFLOADED, S.QUARANTINED)
        finally:
            self._disarm()
            self.mgr.close()


# Once torch is warm a step costs tens of milliseconds on 2 CPU cores (a whole request a few
# hundred) and each example builds a pre-merged copy: the loaded profile as it is keeps the ci
# profile near 20 s; soak scales it.
TestModesMachine = ModesMachine.TestCase
