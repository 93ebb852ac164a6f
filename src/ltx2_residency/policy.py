"""Merge policies: for a phase and its strengths, merge in place, run dynamic, or run base.

Policies are small pure objects chosen from :data:`POLICIES`; they never touch weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .domain import ApplyKind, MergePolicyName, Phase, ResidencyMode, parse_enum


@dataclass(frozen=True)
class PhaseContext:
    mode: ResidencyMode
    phase: Phase
    strengths: Mapping[str, float]  # every managed LoRA's strength for this request and phase
    stage1_strengths: Mapping[str, float]  # the request's stage-1 strengths (HQ detection)
    native_ltx23: bool


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


POLICIES: Mapping[MergePolicyName, type[MergePolicy]] = {
    MergePolicyName.SGLANG: SGLangPolicy,
    MergePolicyName.DYNAMIC: DynamicPolicy,
    MergePolicyName.MERGE: MergePolicyAlways,
}


def make_policy(name: MergePolicyName | str) -> MergePolicy:
    return POLICIES[parse_enum(MergePolicyName, name, "merge policy")]()
