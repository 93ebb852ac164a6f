"""A request's phase switches: the policy decides, the mode plans, the executor runs the plan.

Any failure during a switch fails the request and rolls the DiT back (to CLEAN, or QUARANTINED
when the undo itself fails); the request's end undoes what its phases applied and verifies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .compiled import is_compiled
from .costmodel import AdapterCost, CostModel, MixCost, PhaseWork, ltx2_token_share
from .domain import ApplyKind, MergePolicyName, Phase, WeightState
from .errors import QuarantinedError, StrengthError
from .executor import Executor
from .lockstep import Peers, Solo
from .modes import PHASE_TARGET, REST_STATES, Fire, PhaseDecision, Undo
from .options import ManagerOptions
from .policy import MergePolicy, PhaseContext, hides_merge
from .request import Request

S = WeightState


class PhaseSwitch:
    """Switches the DiT between a request's phases (the ``PhaseHost`` a :class:`Request` calls)."""

    def __init__(self, executor: Executor, policy: MergePolicy, options: ManagerOptions,
                 peers: Peers | None = None) -> None:
        self.executor = executor
        self.peers: Peers = peers if peers is not None else Solo()
        self.mode = executor.mode
        self.policy = policy
        self.options = options
        self.costs: CostModel | None = None  # merge_policy="auto" only: built at first use
        self._priced: MixCost | None = None  # the mix the last decision priced (None: the model's own)
        self._merged: MixCost | None = None  # the mix of the last merge observed (its undo's)
        # adapter, true rank -> (the targets it was read from, its layers' costs): see _layer_costs
        self._layer_cost_cache: dict[tuple[str, bool], tuple[list[Any], list[tuple[int, int, int, float]]]] = {}

    def enter_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                    work: PhaseWork | None = None) -> nn.Module:
        # every rank proposes (nothing moves), rank 0's decision is taken; then every rank switches,
        # and one that succeeded rolls back when another failed (lockstep; alone: the two parts)
        proposal, verdicts = self.peers.step(f"propose {phase.value}",
                                             lambda: self._propose(req, phase, overrides, work),
                                             choice=lambda p: p.kind.value)
        if verdicts:
            proposal = proposal.taking(ApplyKind(verdicts[0].choice))
        module, _ = self.peers.step(f"enter {phase.value}", lambda: self._switch(req, phase, proposal),
                                    undo=lambda _, error, __: self._roll_back(req, error))
        return module

    def _propose(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                 work: PhaseWork | None) -> _Proposal:
        ex = self.executor
        if ex.state is S.QUARANTINED:
            raise QuarantinedError(ex.quarantine_message())
        strengths, keyed = _strengths(req, phase, overrides)
        stage1 = req.strengths.get(Phase.STAGE1, strengths if phase is Phase.STAGE1 else {})
        # a merge started ahead (req.prepare) is completed when the phase and strengths are the ones
        # prepared; anything else undoes it and switches as usual
        ahead = ex.state is S.MERGING_AHEAD and req.prepared == (phase, strengths)
        kind = ApplyKind.MERGED if ahead else self._decide(phase, strengths, keyed, stage1, work)
        return _Proposal(strengths, keyed, ahead, kind)

    def _switch(self, req: Request, phase: Phase, proposal: _Proposal) -> nn.Module:
        ex = self.executor
        strengths, keyed, ahead = proposal.strengths, proposal.keyed, proposal.ahead
        decision = PhaseDecision(self.mode.decide(phase, proposal.kind, keyed), keyed, ahead)
        ex.context = (req.id, phase.value)
        req.phase = None  # no phase may run until this switch has completed
        try:
            if ex.ahead is not None:
                ex.ahead.refuse_if_failed()  # the engine may have caught the failed call: the request fails
            steps = list(self.mode.plan(ex.state, phase, decision))
            while steps:
                step = steps.pop(0)
                merge = isinstance(step, Fire) and step.event == "merge"
                if merge:
                    req.mutated = True  # before the first write: the end-of-request check must run
                ex.run((step,))
                if isinstance(step, Undo):  # the rest is planned from where the undo left the DiT
                    steps = list(self.mode.plan(ex.state, phase, decision))
                if merge and self.costs is not None:
                    self._observe_merge(ahead)
        except BaseException as exc:
            req.failed = exc
            ex.run(self.mode.plan_end(ex.state, behind=False))
            raise
        assert ex.state is PHASE_TARGET[(phase, decision.kind)], (ex.state, phase, decision.kind)
        req.phase = phase
        req.entered.append(phase)
        req.strengths[phase] = strengths
        return self.mode.active.module

    def _roll_back(self, req: Request, error: BaseException) -> None:
        """Another rank failed the switch this rank made: undo it here too (or quarantine)."""
        ex = self.executor
        req.failed = error
        req.phase = None
        ex.context = (req.id, None)
        ex.run(self.mode.plan_end(ex.state, behind=False))

    def prepare_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                      work: PhaseWork | None, calls: int) -> bool:
        """Start ``phase``'s merge behind the current phase's last ``calls`` DiT calls, when the
        policy merges it into the shared DiT and nothing is applied now (see ``ops.ahead``).
        With several ranks: when every rank can and rank 0's policy merges."""
        ahead, verdicts = self.peers.step(f"propose ahead {phase.value}",
                                          lambda: self._ahead(req, phase, overrides, work),
                                          choice=lambda a: f"{int(a.can)}{int(a.merges)}")
        go = ahead.can and ahead.merges
        if verdicts:
            go = all(v.choice[0] == "1" for v in verdicts) and verdicts[0].choice[1] == "1"
        started, _ = self.peers.step(f"ahead {phase.value}", lambda: go and self._start_ahead(req, ahead, calls),
                                     undo=lambda done, error, __: self._drop_ahead(req, error) if done else None)
        return started

    def _ahead(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
               work: PhaseWork | None) -> _Ahead:
        ex = self.executor
        strengths, keyed = _strengths(req, phase, overrides)
        can = ex.machine.can("merge_ahead") and hides_merge(req.work.get(Phase.STAGE1), self.mode.device.type,
                                                            is_compiled(self.mode.base.module))
        stage1 = req.strengths.get(Phase.STAGE1, {})
        merges = can and self._decide(phase, strengths, keyed, stage1, work, ahead=True) is ApplyKind.MERGED
        return _Ahead(phase, strengths, PhaseDecision(ApplyKind.MERGED, keyed).merge_plan, can, merges)

    def _start_ahead(self, req: Request, ahead: _Ahead, calls: int) -> bool:
        req.prepared = (ahead.phase, ahead.strengths)
        req.mutated = True
        try:
            self.executor.start_ahead(ahead.plan, calls)
        except BaseException as exc:
            req.failed = exc
            self.executor.undo_or_quarantine(final=False)
            raise
        return True

    def _drop_ahead(self, req: Request, error: BaseException) -> None:
        req.failed = error
        self.executor.undo_or_quarantine(final=False)

    def finish(self, req: Request) -> None:
        """The request's end: undo what its phases applied (behind, on the side stream, when
        ``overlap_restore``), then verify the DiT clean (deferred behind a pending undo)."""
        ex = self.executor
        ex.context = (req.id, None)
        try:
            if ex.pending is None:  # else this exit runs a second time: the undo is under way
                undoing = ex.state not in REST_STATES and ex.state is not S.QUARANTINED
                ex.run(self.mode.plan_end(ex.state, behind=True))
                restore = next((r for r in reversed(ex.trace) if r.event in ("restore", "restore_behind")), None)
                if undoing and self.costs is not None and restore is not None and req.mutated:
                    # the critical-path part
                    self.costs.observe_undo(max(restore.duration_ms, 1e-3), self._merged and self._merged.merged)
            verify = self.options.verify == "always" or (self.options.verify == "after_merge" and req.mutated)
            if ex.pending is not None and verify:
                ex.verify_behind()
            elif ex.state in REST_STATES and verify:
                ex.check_clean()
        finally:
            ex.context = (None, None)

    def _decide(self, phase: Phase, strengths: dict[str, float], keyed: Mapping[str, float],
                stage1: Mapping[str, float], work: PhaseWork | None, ahead: bool = False) -> ApplyKind:
        auto = self.policy.name is MergePolicyName.AUTO
        costs = self.cost_model() if auto else None
        mix = self._priced = self._mix(keyed) if auto else None
        return self.policy.decide(PhaseContext(self.mode.mode, phase, strengths, stage1, self.options.native_ltx23,
                                               work, costs, ahead, mix))

    def _mix(self, keyed: Mapping[str, float]) -> MixCost | None:
        """The phase's live adapters as the cost model prices them; ``None`` when they are the
        manager's own LoRAs, all live (the model it was built for)."""
        ad = self.executor.adapters
        live = [n for n, s in keyed.items() if s != 0.0]
        own = [n for n in ad.names if n not in ad.slots]
        if not live or (sorted(live) == sorted(own) and not ad.slots):
            return None
        merged = [c for n in live for c in self._layer_costs(n, true_rank=False)]
        if is_compiled(self.mode.base.module):  # the graph computes every adapter of an adapted layer
            dynamic = [c for n in ad.names for c in self._layer_costs(n, true_rank=False)] or merged
        else:  # the eager forward runs each live LoRA at its own rank (a slot's leading rows)
            dynamic = [c for n in live for c in self._layer_costs(n, true_rank=True)]
        if not merged:
            return None
        return MixCost(AdapterCost.of(merged), AdapterCost.of(dynamic))

    def _layer_costs(self, name: str, true_rank: bool) -> list[tuple[int, int, int, float]]:
        """``(out, in, rank, token share)`` of each layer adapter ``name`` covers, at its tensors' rank
        or (``true_rank``) the rank of the LoRA it holds. Kept per adapter until its targets are
        rebuilt (a slot written anew), so a decision does not walk every layer again."""
        ad = self.executor.adapters
        targets = ad.targets(name)
        hit = self._layer_cost_cache.get((name, true_rank))
        if hit is None or hit[0] is not targets:
            costs = [(t.weight.shape[0], t.weight.shape[1], int(ad.layers[t.name].r[name]) if true_rank
                      else t.lora_A.shape[0], ltx2_token_share(t.name)) for t in targets]
            hit = self._layer_cost_cache[(name, true_rank)] = (targets, costs)
        return hit[1]

    def cost_model(self) -> CostModel | None:
        """The auto policy's cost model (built at first use: it probes the device), free memory now."""
        if self.costs is None:
            ex = self.executor
            # the manager's own LoRAs; with none, the LoRAs its slots hold now (the first request's)
            own = [n for n in ex.adapters.names if n not in ex.adapters.slots] or ex.adapters.names
            targets = [t for n in own for t in ex.adapters.targets(n)]
            if not targets:  # no LoRA anywhere yet: nothing to measure (a phase with none runs the base)
                return None
            self.costs = CostModel.for_targets(targets, ex.adapters.forward.name,
                                               compiled=is_compiled(self.mode.base.module))
        self.costs.refresh_headroom()
        return self.costs

    def _observe_merge(self, ahead: bool) -> None:
        """The auto policy prices the next merge from this one."""
        assert self.costs is not None
        self._merged = self._priced
        merged = self._priced and self._priced.merged
        if not ahead:  # a merge ahead's switch is its tail: most of it ran in stage 1
            self.costs.observe_merge(max(self.executor.trace[-1].duration_ms, 1e-3), merged)
        self.costs.observe_records(self.executor.stack.last_exception_fraction)



@dataclass(frozen=True)
class _Proposal:
    """What a rank would do for a phase, before anything moves: the strengths by LoRA and by
    adapter, whether a merge ahead completes, and the policy's decision."""

    strengths: dict[str, float]
    keyed: dict[str, float]
    ahead: bool
    kind: ApplyKind

    def taking(self, kind: ApplyKind) -> _Proposal:
        """This proposal with rank 0's decision (a merge ahead completes only when it merges)."""
        return dataclasses.replace(self, kind=kind, ahead=self.ahead and kind is ApplyKind.MERGED)


@dataclass(frozen=True)
class _Ahead:
    """Whether a rank can merge a phase ahead, what it would merge, and whether its policy would."""

    phase: Phase
    strengths: dict[str, float]
    plan: list[tuple[str, float]]
    can: bool
    merges: bool


def _strengths(req: Request, phase: Phase, overrides: Mapping[str, float] | None
               ) -> tuple[dict[str, float], dict[str, float]]:
    """The request's strengths in ``phase`` by LoRA name, and by the adapter that holds each LoRA
    (the manager's own adapter, or the LoRA slot it was loaded into)."""
    strengths = req.loras.phase(phase, overrides)
    unheld = [n for n, s in strengths.items() if s != 0.0 and n not in req.adapters]
    if unheld:
        raise StrengthError(f"LoRA {unheld[0]!r} was not loaded for this request (loras=None loads the added "
                            f"LoRAs whose strengths are not all 0); name it in request(loras={{...}})")
    return strengths, {req.adapters[n]: s for n, s in strengths.items() if n in req.adapters}
