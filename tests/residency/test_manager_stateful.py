"""A Hypothesis state machine drives the real ResidencyManager (mode 'original') through
random request lifecycles, phase orders, strength overrides, forwards and injected failures,
and compares it after every step with a plain Python model of what the state must be.

The model is written from the documented rules (docs/architecture.md), not from
``ltx2_residency.policy`` or ``ltx2_residency.request``: a bug there shows up as a
disagreement here. Weight cleanliness is checked with ``weight_bits`` (raw bits, compared
with ``torch.equal``), independently of the manager's own fingerprint.

Requests are driven through the context manager's ``__enter__``/``__exit__`` by hand so a
request can stay open across steps; ``machines.exit_with`` reproduces what a ``with``
statement does when its body raises.

Hypothesis turns a random subset of rules off in each example (swarm testing). Checks that
change nothing therefore run once per situation, and an empty request is closed once per
situation: an example whose switching rules are off ends early (Hypothesis counts it invalid
and draws another) instead of spending its steps on identical refusals. The number of steps
run, by rule, is printed at the end of the module's run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ltx2_residency import (
    DirtyWeightsError,
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    Phase,
    PhaseOrderError,
    QuarantinedError,
    RepairError,
    Request,
    RequestStateError,
    ResidencyManager,
    StrengthError,
    WeightState,
)
from ltx2_residency.faults import POINTS as FAULT_POINTS
from ltx2_residency.testing import weight_bits
from machines import BodyError, exit_with, failing_hit, injected_fault, material, step_report
from strategies import bad_strengths, fault_kinds, phase_values, strengths
from untouched import assert_same_bits

S = WeightState

#: Rule executions of this module, by rule ("examples" counts fresh managers, not steps).
STEPS: Counter[str] = Counter()

_report_steps = step_report(STEPS, __name__)


# ---------------------------------------------------------------- the model's rules

#: The phases a request may enter next, after the last one it entered (stage1 then stage2, once each).
_NEXT: dict[Phase | None, Phase | None] = {None: Phase.STAGE1, Phase.STAGE1: Phase.STAGE2,
                                           Phase.STAGE2: None}

_SETTLED: dict[tuple[Phase, str], WeightState] = {
    (Phase.STAGE1, "none"): S.CLEAN,
    (Phase.STAGE2, "none"): S.CLEAN,
    (Phase.STAGE1, "merged"): S.STAGE1_MERGED,
    (Phase.STAGE2, "merged"): S.STAGE2_MERGED,
    (Phase.STAGE1, "dynamic"): S.STAGE1_DYNAMIC,
    (Phase.STAGE2, "dynamic"): S.STAGE2_DYNAMIC,
}
_MERGED = frozenset({S.STAGE1_MERGED, S.STAGE2_MERGED})
_DYNAMIC = frozenset({S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC})
_APPLIED = _MERGED | _DYNAMIC
#: States in which the managed weights hold exactly their clean bits (dynamic never writes them).
_UNTOUCHED = _DYNAMIC | {S.CLEAN}
#: Non-zero strengths (for a phase that must apply something).
_LIVE = st.sampled_from([0.25, 0.5, 1.0]) | st.floats(min_value=2**-10, max_value=1.5, width=32)
#: Both spellings of every phase, as ``strategies.phase_values`` draws them.
_PHASE_VALUES: list[Phase | str] = [p.value for p in Phase] + list(Phase)
#: A draw that is True about a third of the time (failure injection inside a switch or close).
_SOMETIMES = st.sampled_from([False, False, True])
#: Below this strength a merge may round away entirely in bf16, so "weights changed" is not checked.
_VISIBLE = 0.25


def model_decision(policy: str, native_ltx23: bool, phase: Phase,
                   strengths_now: Mapping[str, float], stage1: Mapping[str, float]) -> str:
    """'none', 'dynamic' or 'merged' for one phase of one request in original mode."""
    if all(s == 0.0 for s in strengths_now.values()):
        return "none"
    if policy == "dynamic":
        return "dynamic"
    if policy == "merge":
        return "merged"
    # sglang's _should_merge_lora_for_phase: original mode runs stage 2 dynamic; otherwise merge
    # only for the native LTX-2.3 variant, as stage 2 or as the HQ stage 1 (live stage-1 strength).
    if phase is Phase.STAGE2:
        return "dynamic"
    hq_stage1 = any(s != 0.0 for s in stage1.values())
    return "merged" if native_ltx23 and hq_stage1 else "dynamic"


@dataclass
class _Armed:
    """One armed fault: where, on which hit, the counts before it, and what it raised."""

    point: str
    on_hit: int
    hits_before: int
    total_before: int
    made: list[BaseException]


def _differing(now: Mapping[str, torch.Tensor], clean: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(n for n in clean if not torch.equal(now[n], clean[n]))


# ---------------------------------------------------------------- the state machine


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: ResidencyManager | None = None
        self.cm: contextlib.AbstractContextManager[Request] | None = None
        self.req: Request | None = None
        self.closed_req: Request | None = None

    # ------------------------------------------------------------ set-up
    @initialize(
        policy=st.sampled_from(["sglang", "dynamic", "merge", "merge"]),  # merge twice: merges ahead need it
        native_ltx23=st.booleans(),
        restore=st.sampled_from(["recompute", "copy"]),
        verify=st.sampled_from(["after_merge", "always", "never"]),
        check_layers=st.booleans(),
        overlap=st.booleans(),
        with_user=st.booleans(),
        # stage 1 on the base weights half the time (the distilled recipe: what a merge ahead needs)
        distilled=st.fixed_dictionaries({"stage1": st.just(0.0) | strengths, "stage2": strengths}),
        user=st.fixed_dictionaries({"stage1": st.just(0.0) | strengths, "stage2": strengths}),
    )
    def build(self, policy: str, native_ltx23: bool, restore: str, verify: str, check_layers: bool,
              overlap: bool, with_user: bool, distilled: dict[str, float], user: dict[str, float]) -> None:
        STEPS["examples"] += 1
        mat = material()
        self.mat = mat
        self.policy = policy
        self.native = native_ltx23
        self.spec_strengths: dict[str, dict[str, float]] = {"distilled": distilled}
        if with_user:
            self.spec_strengths["user"] = user
        self.names = list(self.spec_strengths)
        self.faults = FaultInjector()
        self.mgr = ResidencyManager(
            copy.deepcopy(mat.base), mode="original",
            loras=[LoRASpec(name=n, path=mat.lora_paths[n], strengths=s)
                   for n, s in self.spec_strengths.items()],
            merge_policy=policy, native_ltx23=native_ltx23, restore=restore,
            verify=verify,  # type: ignore[arg-type]
            check_layers=check_layers, strict=True, request_timeout=5.0, faults=self.faults,
            overlap_restore=overlap,  # on the CPU the undo runs inline; the bookkeeping is the GPU's
        )
        self.overlap = overlap
        self.clean_bits = weight_bits(self.mgr.managed_weights)
        # The manager's clean reference must be the model as handed over: compare with the
        # untouched base model's own Linear weights.
        assert set(self.clean_bits) == set(mat.lora_targets["distilled"])
        base_bits = weight_bits({n: mat.base.get_submodule(n).weight for n in self.clean_bits})
        assert_same_bits(self.clean_bits, base_bits)
        # the plain model of the expected state
        self.expected: WeightState = S.CLEAN
        self.phase: Phase | None = None
        self.entered: list[Phase] = []
        self.req_strengths: dict[Phase, dict[str, float]] = {}
        self.applied: dict[str, float] = {}  # live strengths the current state holds
        self.failed: BaseException | None = None  # what broke a switch of the open request
        self.ahead: tuple[dict[str, float], int] | None = None  # a merge ahead: strengths, calls left
        # Checks that change nothing run once per situation, so the steps go to transitions
        # rather than to repeating an identical refusal (e.g. forwards on a quarantined DiT).
        self.seen: set[tuple[str, tuple[Any, ...]]] = set()

    # ------------------------------------------------------------ model helpers
    @property
    def quarantined(self) -> bool:
        return self.expected is S.QUARANTINED

    @property
    def can_switch(self) -> bool:
        """An open, unbroken request whose next phase the model would let it enter."""
        return (self.req is not None and self.failed is None and not self.quarantined
                and _NEXT[self.phase] is not None)

    def _situation(self) -> tuple[Any, ...]:
        return (self.expected, self.req is not None, self.phase, self.failed is not None,
                self.closed_req is not None)

    def _fresh(self, check: str, key: tuple[Any, ...] | None = None) -> bool:
        return (check, key or self._situation()) not in self.seen

    def _done(self, check: str, key: tuple[Any, ...] | None = None) -> None:
        self.seen.add((check, key or self._situation()))

    def _resolve(self, phase: Phase, overrides: Mapping[str, float] | None) -> dict[str, float]:
        out = {n: float(s[phase.value]) for n, s in self.spec_strengths.items()}
        out.update({n: float(v) for n, v in (overrides or {}).items()})
        return out

    def _decide(self, phase: Phase, resolved: Mapping[str, float]) -> str:
        stage1 = self.req_strengths.get(Phase.STAGE1, resolved if phase is Phase.STAGE1 else {})
        return model_decision(self.policy, self.native, phase, resolved, stage1)

    def _overrides(self) -> st.SearchStrategy[dict[str, float] | None]:
        return st.none() | st.dictionaries(st.sampled_from(self.names), strengths)

    def _layers(self, live: Mapping[str, float]) -> int:
        """Layer writes a merge (or its undo) of ``live`` makes: one per LoRA per target."""
        return sum(len(self.mat.lora_targets[n]) for n, s in live.items() if s != 0.0)

    def _attached_layers(self, live: Mapping[str, float]) -> int:
        return len(set().union(*(self.mat.lora_targets[n] for n, s in live.items() if s != 0.0)))

    def _undo_points(self) -> list[tuple[str, int]]:
        """Fault points the undo of the current state hits, with how many times it hits each."""
        points = [("restore.before", 1)]
        if self.expected in _MERGED:
            points.append(("restore.layer", self._layers(self.applied)))
        if "detach.before" in FAULT_POINTS:  # adapters are switched off inside the restore too
            points.append(("detach.before", 1))
            if self.expected in _DYNAMIC:
                points.append(("detach.layer", self._attached_layers(self.applied)))
        return points

    def _new_records(self, since: int) -> list[Any]:
        assert self.mgr is not None
        n = self.mgr.trace.total - since
        return list(self.mgr.trace)[-n:] if n else []

    @contextlib.contextmanager
    def _no_side_effects(self) -> Iterator[None]:
        """A refused call leaves state, trace, request phase and weight bits as they were."""
        assert self.mgr is not None
        state, total = self.mgr.state, self.mgr.trace.total
        # in an untouched state the invariant compares every weight with the clean bits anyway
        bits = None if state in _UNTOUCHED else weight_bits(self.mgr.managed_weights)
        phase = self.req.phase if self.req is not None else None
        yield
        assert self.mgr.state is state
        assert self.mgr.trace.total == total
        if bits is not None:
            assert_same_bits(weight_bits(self.mgr.managed_weights), bits)
        if self.req is not None:
            assert self.req.phase is phase

    def _arm(self, point: str, count: int, data: st.DataObject) -> _Armed:
        """Draw which of ``count`` hits of ``point`` fails and with what, and arm it."""
        hit = data.draw(failing_hit(count), label="on hit")
        kind = data.draw(fault_kinds, label="fault kind")
        assert self.mgr is not None
        armed = _Armed(point, hit, self.faults.hits.get(point, 0), self.mgr.trace.total, [])
        self.faults.arm(point, injected_fault(kind, armed.made), on_hit=hit, times=1)
        return armed

    def _consumed(self, armed: _Armed, raised: BaseException) -> BaseException:
        """The armed fault fired once, on the hit it was armed for, and surfaced."""
        assert len(armed.made) == 1, f"fault at {armed.point} fired {len(armed.made)} times"
        injected = armed.made[0]
        noted = any(repr(injected) in note for note in getattr(raised, "__notes__", []))
        assert raised is injected or raised.__cause__ is injected or noted
        # the operation stopped at the failing hit (a rollback never passes the same point)
        assert self.faults.hits.get(armed.point, 0) - armed.hits_before == armed.on_hit
        return injected

    def _request_closed(self) -> None:
        assert self.req is not None
        assert self.req.closed
        self.closed_req = self.req
        self.cm = self.req = None
        self.phase = None
        self.entered = []
        self.req_strengths = {}
        self.applied = {}
        self.failed = None
        self.ahead = None

    def _settled(self) -> None:
        """The call just made settled a pending overlapped undo: ``restored`` is in the trace."""
        if self.expected is S.UNDO_PENDING:
            STEPS["settle_overlapped_undo"] += 1
            assert self.mgr is not None and self.mgr.trace[-1].event == "restored"
            self.expected = S.CLEAN

    def _forward(self) -> None:
        """Run the DiT the way a pipeline does; the model says whether the guard lets it."""
        assert self.mgr is not None
        run = functools.partial(self.mgr.transformer, **self.mat.inputs)
        if self.quarantined or self.req is None or self.phase is None:
            STEPS["forward_refused"] += 1
            expect = ("quarantined" if self.quarantined else "undo_pending" if self.expected is S.UNDO_PENDING
                      else "outside a request phase")
            with self._no_side_effects(), torch.no_grad(), pytest.raises(ForwardGuardError) as info:
                run()
            assert expect in str(info.value)
            return
        if self.expected is S.MERGING_AHEAD:
            assert self.ahead is not None
            strengths, left = self.ahead
            if not left:  # the announced calls are spent: the weights are stage 2's, part merged
                STEPS["forward_refused_after_announced"] += 1
                with self._no_side_effects(), torch.no_grad(), pytest.raises(ForwardGuardError) as info:
                    run()
                assert "announced" in str(info.value)
                return
            self.ahead = (strengths, left - 1)
        STEPS[f"forward_{self.expected.value}"] += 1
        with torch.no_grad():
            out = run()[0]
        assert out.shape == self.mat.base_output.shape
        assert bool(torch.isfinite(out).all())
        if self.expected in (S.CLEAN, S.MERGING_AHEAD):
            # disabled PEFT layers call their base layer: bit-identical to the unwrapped model (a
            # merge ahead writes each block only after the call has run it)
            assert torch.equal(out, self.mat.base_output)
        elif max(self.applied.values(), default=0.0) >= _VISIBLE:
            assert not torch.equal(out, self.mat.base_output), "the phase's LoRAs had no effect"

    # ------------------------------------------------------------ invariants
    @invariant()
    def state_matches_model(self) -> None:
        if self.mgr is None:
            return
        mgr = self.mgr
        assert mgr.state is self.expected, (
            f"manager in {mgr.state.value}, model expects {self.expected.value}")
        now = weight_bits(mgr.managed_weights)
        if (self.req is None and not self.quarantined) or self.expected in _UNTOUCHED:
            assert_same_bits(now, self.clean_bits)
        if self.expected in _MERGED and max(self.applied.values(), default=0.0) >= _VISIBLE:
            assert _differing(now, self.clean_bits), "a merged state whose weights are clean"
        if self.expected in _UNTOUCHED:
            assert mgr.memory()["restore_capture_bytes"] == 0, "undo captures outlived their merge"
        if self.expected is S.MERGING_AHEAD and self.ahead is not None and self.ahead[1] > 0:
            assert_same_bits(now, self.clean_bits)  # nothing merged before the last announced call
        if len(mgr.trace):
            assert mgr.trace[-1].dest == mgr.state.value
        else:
            assert mgr.state is S.CLEAN
        assert not self.faults._arms, "a fault is still armed after its step"
        if self.req is not None:
            assert not self.req.closed
            assert self.req.phase is self.phase
            assert self.req.entered == self.entered
            assert self.req.strengths == self.req_strengths
            assert self.req.failed is self.failed

    # ------------------------------------------------------------ requests
    @precondition(lambda self: self.req is None and (not self.quarantined or self._fresh("open")))
    @rule()
    def open_request(self) -> None:
        assert self.mgr is not None
        cm = self.mgr.request()
        if self.quarantined:
            STEPS["open_request_quarantined"] += 1
            self._done("open")
            with self._no_side_effects(), pytest.raises(QuarantinedError) as info:
                cm.__enter__()
            assert "quarantined" in str(info.value)
            assert "repair()" in str(info.value)
            return
        STEPS["open_request"] += 1
        self.req = cm.__enter__()
        self.cm = cm
        self._settled()
        assert isinstance(self.req, Request)

    # A request that never got to a phase is closed once per situation: otherwise examples
    # whose swarm flags disable switching spend every step opening and closing empty requests.
    @precondition(lambda self: self.req is not None and (
        self.phase is not None or self.failed is not None or self.quarantined
        or self._fresh("close_empty")))
    @rule(how=st.sampled_from(["normal", "error", "keyboard_interrupt"]), data=st.data())
    def close_request(self, how: str, data: st.DataObject) -> None:
        """Leave the request block normally, by an exception or by Ctrl-C; where the close has a
        restore to do, sometimes make that restore fail."""
        if self.phase is None:
            self._done("close_empty")
        if self.expected in _APPLIED and data.draw(st.booleans(), label="fail inside restore"):
            self._fail_inside_close(how, data)
            return
        STEPS[f"close_request_{how}"] += 1
        assert self.cm is not None
        if how == "normal":
            assert not self.cm.__exit__(None, None, None)
        else:
            body = KeyboardInterrupt() if how == "keyboard_interrupt" else BodyError("the body failed")
            with pytest.raises(type(body)) as info:
                exit_with(self.cm, body)
            assert info.value is body, "the body's exception was replaced or swallowed"
        if (self.expected in _MERGED or self.expected is S.MERGING_AHEAD) and self.overlap:
            self.expected = S.UNDO_PENDING  # the undo is launched; the DiT's next user settles it
        elif self.expected in _APPLIED or self.expected is S.MERGING_AHEAD:
            self.expected = S.CLEAN
        self._request_closed()

    @precondition(lambda self: self.req is not None and self._fresh("misuse"))
    @rule(data=st.data())
    def misuse_open_request(self, data: st.DataObject) -> None:
        """Calls that need the DiT between requests, or a live handle, are refused mid-request."""
        assert self.mgr is not None and self.req is not None
        self._done("misuse")
        kinds = ["nested_request", "repair", "verify_clean"]
        if self.closed_req is not None:
            kinds.append("closed_handle")
        kind = data.draw(st.sampled_from(kinds), label="misuse")
        STEPS[f"refused_{kind}"] += 1
        with self._no_side_effects(), pytest.raises(RequestStateError) as info:
            if kind == "nested_request":
                self.mgr.request().__enter__()
            elif kind == "repair":
                self.mgr.repair()
            elif kind == "verify_clean":
                self.mgr.verify_clean()
            else:
                assert self.closed_req is not None
                self.closed_req.enter("stage1")
        msg = str(info.value)
        if kind == "closed_handle":
            assert self.closed_req is not None
            assert f"request {self.closed_req.id} is closed" in msg
            assert "manager.request()" in msg
        elif kind == "verify_clean":
            assert "between requests" in msg
        else:
            assert "already owns the DiT" in msg
            assert "finish the open request first" in msg

    # ------------------------------------------------------------ phases
    # (A quarantined DiT inside an open, unbroken request cannot happen: requests are refused
    # while quarantined, and a switch that quarantines the DiT breaks its request.)
    @precondition(lambda self: self.can_switch)
    @rule(as_string=st.booleans(), run=st.booleans(), data=st.data())
    def enter_next_phase(self, as_string: bool, run: bool, data: st.DataObject) -> None:
        """Switch to the next phase (sometimes with a failure injected into the switch)."""
        assert self.req is not None and self.mgr is not None
        phase = _NEXT[self.phase]
        assert phase is not None
        if self.expected is S.MERGING_AHEAD:
            if self._enter_after_prepare(data):
                return
        elif data.draw(_SOMETIMES, label="fail inside switch"):
            self._fail_inside_enter(phase, data)
            return
        prepared = self.ahead[0] if self.ahead is not None else None
        recipe = st.just({n: 0.0 for n in self.names})  # stage 1 on the base: a merge ahead may follow
        overrides = (prepared if prepared is not None and data.draw(st.booleans(), label="as prepared")
                     else data.draw(recipe | self._overrides() if phase is Phase.STAGE1 else self._overrides(),
                                    label="overrides"))
        resolved = self._resolve(phase, overrides)
        decision = "merged" if resolved == prepared else self._decide(phase, resolved)
        if prepared is not None:
            STEPS[f"enter_after_prepare_{'same' if resolved == prepared else 'other'}"] += 1
        self.ahead = None
        STEPS[f"enter_{phase.value}_{decision}"] += 1
        dit = self.req.enter(phase.value if as_string else phase, strengths=overrides)
        assert dit is self.mgr.transformer
        self.phase = phase
        self.entered.append(phase)
        self.req_strengths[phase] = resolved
        self.expected = _SETTLED[(phase, decision)]
        self.applied = {n: s for n, s in resolved.items() if s != 0.0} if decision != "none" else {}
        if run:  # the pipeline runs the module it was handed
            self._forward()

    @precondition(lambda self: self.can_switch and self.phase is Phase.STAGE1 and self.ahead is None
                  and self.req is not None and self.req.prepared is None)
    @rule(calls=st.integers(1, 2), data=st.data())
    def prepare_stage2(self, calls: int, data: st.DataObject) -> None:
        """Announce stage 1's last calls: stage 2's merge starts behind them when it merges into
        a clean DiT (req.prepare); otherwise nothing happens."""
        assert self.req is not None
        overrides = data.draw(self._overrides(), label="overrides")
        resolved = self._resolve(Phase.STAGE2, overrides)
        started = self.expected is S.CLEAN and self._decide(Phase.STAGE2, resolved) == "merged"
        STEPS[f"prepare_{'started' if started else 'declined'}"] += 1
        if not started:
            with self._no_side_effects():
                assert self.req.prepare("stage2", strengths=overrides, calls=calls) is False
            return
        assert self.req.prepare("stage2", strengths=overrides, calls=calls) is True
        self.expected = S.MERGING_AHEAD
        self.ahead = (resolved, calls)

    def _enter_after_prepare(self, data: st.DataObject) -> bool:
        """Sometimes fail the switch that completes a merge ahead: it rolls back to clean."""
        assert self.req is not None and self.ahead is not None
        if not data.draw(_SOMETIMES, label="fail completing the merge ahead"):
            return False
        point = data.draw(st.sampled_from(["merge.before", "merge.after"]), label="fault point")
        armed = self._arm(point, 1, data)
        STEPS[f"fail_enter_after_prepare:{point}"] += 1
        try:
            with pytest.raises(BaseException) as info:
                self.req.enter(Phase.STAGE2, strengths=self.ahead[0])
        finally:
            self.faults.disarm()
        injected = self._consumed(armed, info.value)
        assert info.value is injected, f"{info.value!r} replaced the failure {injected!r}"
        self.expected = S.CLEAN
        self.phase = None
        self.failed = info.value
        self.applied = {}
        self.ahead = None
        return True

    @precondition(lambda self: self.req is not None and self._fresh("refused_enter"))
    @rule(data=st.data())
    def enter_refused(self, data: st.DataObject) -> None:
        """Entering out of order, with bad strengths, or after a failed switch changes nothing."""
        self._done("refused_enter")
        if self.failed is not None:
            self._enter_after_failed_switch(data)
        elif self.can_switch and data.draw(st.booleans(), label="bad strengths"):
            self._enter_with_bad_strengths(data)
        else:
            self._enter_out_of_order(data)

    def _enter_out_of_order(self, data: st.DataObject) -> None:
        assert self.req is not None
        STEPS["enter_out_of_order"] += 1
        illegal = [v for v in _PHASE_VALUES if Phase(v) is not _NEXT[self.phase]]
        phase_value = data.draw(st.sampled_from(illegal), label="phase")
        phase = Phase(phase_value)
        overrides = data.draw(self._overrides(), label="overrides")
        with self._no_side_effects(), pytest.raises(PhaseOrderError) as info:
            self.req.enter(phase_value, strengths=overrides)
        msg = str(info.value)
        done = ", ".join(p.value for p in self.entered) or "none"
        assert f"cannot enter {phase.value!r}" in msg
        assert f"phases entered so far: {done}" in msg
        assert "next legal phase" in msg

    def _enter_with_bad_strengths(self, data: st.DataObject) -> None:
        STEPS["enter_bad_strengths"] += 1
        assert self.req is not None
        phase = _NEXT[self.phase]
        assert phase is not None
        how = data.draw(st.sampled_from(["bad_value", "unknown_lora", "not_a_mapping"]), label="how")
        overrides: Any
        if how == "bad_value":
            name = data.draw(st.sampled_from(self.names), label="lora")
            overrides = {name: data.draw(bad_strengths, label="bad strength")}
            expect = [f"LoRA {name!r}", f"in {phase.value}", "strength must be"]
        elif how == "unknown_lora":
            overrides = {"no_such_lora": 0.5}
            expect = ["unknown LoRA 'no_such_lora'", "managed LoRAs: 'distilled'"]
        else:
            overrides = [("distilled", 0.5)]
            expect = ["must be a mapping of LoRA name to strength", "list"]
        with self._no_side_effects(), pytest.raises(StrengthError) as info:
            self.req.enter(phase, strengths=overrides)
        for part in expect:
            assert part in str(info.value)

    def _enter_after_failed_switch(self, data: st.DataObject) -> None:
        # A failed switch rolled the request's phases back: no phase may be entered any more,
        # whatever the order or the strengths, until a new request.
        assert self.req is not None
        STEPS["enter_after_failed_switch"] += 1
        phase_value = data.draw(phase_values, label="phase")
        overrides = data.draw(self._overrides(), label="overrides")
        with self._no_side_effects(), pytest.raises(RequestStateError) as info:
            self.req.enter(phase_value, strengths=overrides)
        msg = str(info.value)
        assert f"request {self.req.id} failed while switching weights ({self.failed!r})" in msg
        assert "Open a new request" in msg

    # ------------------------------------------------------------ forward
    @precondition(lambda self: self._fresh("forward", self._forward_key()))
    @rule()
    def forward(self) -> None:
        self._done("forward", self._forward_key())
        self._forward()

    def _forward_key(self) -> tuple[Any, ...]:
        # a forward's outcome depends on the weight state and on whether a phase is entered only
        return (self.expected, self.req is not None and self.phase is not None, self.ahead and self.ahead[1])

    # ------------------------------------------------------------ injected failures
    def _fail_inside_enter(self, phase: Phase, data: st.DataObject) -> None:
        assert self.req is not None and self.mgr is not None
        overrides = data.draw(self._overrides(), label="overrides")
        resolved = self._resolve(phase, overrides)
        decision = self._decide(phase, resolved)
        if decision == "none" and self.expected is S.CLEAN:
            # nothing to do means nothing can fail: make the phase apply something
            overrides = {n: data.draw(_LIVE, label=f"strength {n}") for n in self.names}
            resolved = self._resolve(phase, overrides)
            decision = self._decide(phase, resolved)
        # (point, how many times the switch hits it); undo points first: entering stage 2 first
        # undoes what stage 1 applied
        undo = self._undo_points() if self.expected in _APPLIED else []
        apply: list[tuple[str, int]] = []
        if decision == "merged":
            apply = [("merge.before", 1), ("merge.layer", self._layers(resolved)), ("merge.after", 1)]
        elif decision == "dynamic":
            apply = [("attach.before", 1), ("attach.layer", self._attached_layers(resolved))]
        # half the time the undo fails (quarantine), half the time the apply (rollback)
        groups = [g for g in (undo, apply) if g]
        assert groups
        group = data.draw(st.sampled_from(groups), label="fault in")
        point, count = data.draw(st.sampled_from(group), label="fault point")
        armed = self._arm(point, count, data)
        STEPS[f"fail_enter:{point}"] += 1
        try:
            with pytest.raises(BaseException) as info:
                self.req.enter(phase, strengths=overrides)
        finally:
            self.faults.disarm()
        injected = self._consumed(armed, info.value)
        records = self._new_records(armed.total_before)
        if point.startswith(("restore.", "detach.")) and not isinstance(injected, Exception):
            # a Ctrl-C inside the undo stays a Ctrl-C; the quarantine is noted on it
            assert info.value is injected
            assert any("repair()" in note for note in getattr(injected, "__notes__", []))
            failed_event = "restore"
            self.expected = S.QUARANTINED
        elif point.startswith(("restore.", "detach.")):
            assert isinstance(info.value, QuarantinedError)
            assert info.value.__cause__ is injected
            assert "repair()" in str(info.value)
            failed_event = "restore"
            self.expected = S.QUARANTINED
        else:
            # rolled back exactly; the original failure propagates unchanged
            assert info.value is injected, f"{info.value!r} replaced the failure {injected!r}"
            failed_event = point.split(".")[0]
            self.expected = S.CLEAN
        assert any(not r.ok and r.event == failed_event and r.error == repr(injected) for r in records)
        # whatever stage 1 applied is gone too: the request has no phase left and is poisoned
        self.phase = None
        self.failed = info.value
        self.applied = {}
        self._enter_after_failed_switch(data)

    def _fail_inside_close(self, how: str, data: st.DataObject) -> None:
        assert self.cm is not None and self.mgr is not None
        point, count = data.draw(st.sampled_from(self._undo_points()), label="fault point")
        armed = self._arm(point, count, data)
        STEPS[f"fail_close:{point}"] += 1
        body = KeyboardInterrupt() if how == "keyboard_interrupt" else BodyError("the body failed")
        try:
            with pytest.raises(BaseException) as info:
                if how == "normal":
                    self.cm.__exit__(None, None, None)
                else:
                    exit_with(self.cm, body)
        finally:
            self.faults.disarm()
        injected = self._consumed(armed, info.value)
        if not isinstance(injected, Exception):
            assert info.value is injected  # a Ctrl-C inside the undo stays a Ctrl-C
            assert any("repair()" in note for note in getattr(injected, "__notes__", []))
        elif how == "keyboard_interrupt":
            assert info.value is body  # the body's Ctrl-C keeps propagating, quarantine noted
            assert any("repair()" in note for note in getattr(body, "__notes__", []))
        else:
            assert isinstance(info.value, QuarantinedError)
            assert "repair()" in str(info.value)
        records = self._new_records(armed.total_before)
        assert any(not r.ok and r.event in ("restore", "restore_behind") and r.error == repr(injected) for r in records)
        self.expected = S.QUARANTINED
        self._request_closed()

    # ------------------------------------------------------------ between requests
    @precondition(lambda self: self.req is None and (self.quarantined or self._fresh("repair")))
    @rule(fail=st.booleans(), data=st.data())
    def repair(self, fail: bool, data: st.DataObject) -> None:
        assert self.mgr is not None
        if self.expected is S.UNDO_PENDING:
            self.mgr.repair()  # settles the pending undo, then has nothing to repair
            self._settled()
            return
        if not self.quarantined:
            STEPS["repair_noop"] += 1
            self._done("repair")
            with self._no_side_effects():
                self.mgr.repair()
            return
        if not fail:
            STEPS["repair"] += 1
            self.mgr.repair()
            self.expected = S.CLEAN
            return
        STEPS["fail_repair:repair.layer"] += 1
        armed = self._arm("repair.layer", len(self.clean_bits), data)
        try:
            with pytest.raises(RepairError) as info:
                self.mgr.repair()
        finally:
            self.faults.disarm()
        injected = self._consumed(armed, info.value)
        assert "stays quarantined" in str(info.value)
        records = self._new_records(armed.total_before)
        assert any(not r.ok and r.event == "repair" and r.error == repr(injected) for r in records)

    @precondition(lambda self: self.req is None and self._fresh("verify"))
    @rule()
    def verify_clean(self) -> None:
        assert self.mgr is not None
        self._done("verify")
        dirty = _differing(weight_bits(self.mgr.managed_weights), self.clean_bits)
        if not dirty and self.expected is S.UNDO_PENDING:
            self.mgr.verify_clean()
            self._settled()
            return
        if not dirty:
            STEPS["verify_clean"] += 1
            with self._no_side_effects():
                self.mgr.verify_clean()
            return
        # only a quarantined DiT may hold dirty weights between requests (the invariant checks it)
        STEPS["verify_dirty"] += 1
        assert self.quarantined
        with self._no_side_effects(), pytest.raises(DirtyWeightsError) as info:
            self.mgr.verify_clean()
        assert info.value.differing == dirty
        assert f"{len(dirty)} of {len(self.clean_bits)} managed weights differ" in str(info.value)

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        if self.mgr is None:
            return
        try:
            if self.cm is not None:
                self.cm.__exit__(None, None, None)
                self.mgr.synchronize()
                assert self.mgr.state in (S.CLEAN, S.QUARANTINED)
        finally:
            self.faults.disarm()
            self.mgr.close()


TestManagerMachine = ManagerMachine.TestCase
