"""Merge policies: for a phase and its strengths, merge in place, run dynamic, or run base.

Policies are small pure objects chosen from :data:`POLICIES`; they never touch weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .costmodel import RECIPE, CostModel, Decision, MixCost, PhaseWork, ltx2_reference_model
from .domain import ApplyKind, MergePolicyName, Phase, ResidencyMode, parse_enum
from .ops.forward import HOST_BOUND_TOKENS


@dataclass(frozen=True)
class PhaseContext:
    mode: ResidencyMode
    phase: Phase
    strengths: Mapping[str, float]  # every managed LoRA's strength for this request and phase
    stage1_strengths: Mapping[str, float]  # the request's stage-1 strengths (HQ detection)
    native_ltx23: bool
    work: PhaseWork | None = None  # what the phase will run (AutoPolicy); None: the LTX-2 recipe's
    costs: CostModel | None = None  # the manager's measured model (AutoPolicy); None: the reference one
    ahead: bool = False  # the merge would run ahead, behind the phase before's last calls (req.prepare)
    mix: MixCost | None = None  # the request's live LoRAs priced (AutoPolicy); None: the manager's own


class MergePolicy(Protocol):
    name: MergePolicyName

    def decide(self, ctx: PhaseContext) -> ApplyKind: ...


def _live(strengths: Mapping[str, float]) -> bool:
    return any(s != 0.0 for s in strengths.values())


class SGLangPolicy:
    """sglang's ``_should_merge_lora_for_phase`` (PR #25591).

    Original mode runs stage 2 dynamic. Otherwise a phase merges only for the native LTX-2.3
    variant, as stage 2, or as stage 1 of the HQ pipeline (a non-zero stage-1 strength).
    """

    name = MergePolicyName.SGLANG

    def decide(self, ctx: PhaseContext) -> ApplyKind:
        if not _live(ctx.strengths):
            return ApplyKind.NONE
        if ctx.mode is ResidencyMode.ORIGINAL and ctx.phase is Phase.STAGE2:
            return ApplyKind.DYNAMIC
        hq_stage1 = ctx.phase is Phase.STAGE1 and _live(ctx.stage1_strengths)
        if ctx.native_ltx23 and (ctx.phase is Phase.STAGE2 or hq_stage1):
            return ApplyKind.MERGED
        return ApplyKind.DYNAMIC


class DynamicPolicy:
    """Never merge into the shared DiT: every live phase runs PEFT adapters."""

    name = MergePolicyName.DYNAMIC

    def decide(self, ctx: PhaseContext) -> ApplyKind:
        return ApplyKind.DYNAMIC if _live(ctx.strengths) else ApplyKind.NONE


class MergePolicyAlways:
    """Merge every live phase in place, with an exact restore afterwards."""

    name = MergePolicyName.MERGE

    def decide(self, ctx: PhaseContext) -> ApplyKind:
        return ApplyKind.MERGED if _live(ctx.strengths) else ApplyKind.NONE


class AutoPolicy:
    """Whichever of merge and dynamic the cost model says is cheaper for this phase's work.

    Without ``ctx.work`` the phase is taken to run the LTX-2 recipe (:data:`costmodel.RECIPE`);
    without ``ctx.costs``, on the reference model (the real DiT, a rank-384 LoRA on all its
    block linears, H100 rates, no memory limit). At the recipe both stages merge there, which is
    what the full-scale measurements show, so a manager that passes nothing behaves like "merge".
    ``last`` keeps the latest decision with its estimates and reason, for tracing.
    """

    name = MergePolicyName.AUTO

    def __init__(self) -> None:
        self.last: Decision | None = None
        self._reference: CostModel | None = None

    def decide(self, ctx: PhaseContext) -> ApplyKind:
        costs = ctx.costs
        if costs is None:
            if self._reference is None:
                self._reference = ltx2_reference_model()
            costs = self._reference
        # previous_merged only adds the same restore to both sides (see CostModel.choose)
        self.last = costs.choose(ctx.work or RECIPE[ctx.phase], _live(ctx.strengths), ahead=ctx.ahead, mix=ctx.mix)
        return self.last.kind


POLICIES: Mapping[MergePolicyName, type[MergePolicy]] = {
    MergePolicyName.SGLANG: SGLangPolicy,
    MergePolicyName.DYNAMIC: DynamicPolicy,
    MergePolicyName.MERGE: MergePolicyAlways,
    MergePolicyName.AUTO: AutoPolicy,
}


def make_policy(name: MergePolicyName | str) -> MergePolicy:
    return POLICIES[parse_enum(MergePolicyName, name, "merge policy")]()


def hides_merge(running: PhaseWork | None, device_type: str, compiled: bool = False) -> bool:
    """Whether a merge launched behind the running phase's last DiT call can hide there: on a GPU
    only a host-bound call (at most ``HOST_BOUND_TOKENS`` video tokens a call, on average over the
    step's calls) leaves the device idle between launches; a device-bound call leaves no gaps to
    fill (measured in docs/results/measured_constants.md#merge-behind-a-host-bound-call), and a
    compiled DiT's calls are device-bound at any size (its graphs launch ahead of the device). On
    the CPU the merge runs inline either way. Without a declared work, the LTX-2 recipe (1536
    tokens a call at 768x512)."""
    if device_type != "cuda":
        return True
    return not compiled and (running is None or running.tokens <= HOST_BOUND_TOKENS)
