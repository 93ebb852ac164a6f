"""Resident mode: the base and a pre-merged stage-2 DiT both on the device; activating stage 2
rebinds a pointer, never a merge into the base weights. Also the base of snapshot mode."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..domain import ApplyKind, Phase, Residency, ResidencyMode, WeightState
from ..errors import ModeNotAvailableError, RepairError
from ..faults import FaultInjector
from ..lora import LoadedLoRA
from ..ops.fingerprint import Fingerprint, FingerprintPlan
from ..ops.residency import DiTCopy
from ..ops.stage2_copy import build_stage2_copy, rebuild_stage2_copy
from .original import OriginalMode
from .table import (
    REST_STATES,
    Edge,
    Fire,
    ModeTable,
    Move,
    PhaseDecision,
    Step,
    Undo,
    apply_steps,
    quarantine_edges,
    undo_edges,
)

S = WeightState
GIB = 2**30


def stage1_edges() -> tuple[Edge, ...]:
    """Stage 1 always runs on the base DiT, as in original mode."""
    return (
        Edge("merge", S.CLEAN, S.MERGING, "merge"),
        Edge("merged_stage1", S.MERGING, S.STAGE1_MERGED),
        Edge("attach", S.CLEAN, S.ATTACHING, "attach"),
        Edge("attached_stage1", S.ATTACHING, S.STAGE1_DYNAMIC),
        # a stage-2 strength the stage-2 copy was not built with: dynamic on the base
        Edge("attached_stage2", S.ATTACHING, S.STAGE2_DYNAMIC),
    )


RESIDENT = ModeTable(
    mode=ResidencyMode.RESIDENT,
    initial=S.CLEAN,
    summary="base and pre-merged stage-2 DiT both on the device; activating stage 2 rebinds a "
    "pointer",
    edges=(
        *stage1_edges(),
        Edge("activate_stage2", S.CLEAN, S.STAGE2_MERGED, "activate"),
        *undo_edges((S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC, S.MERGING, S.ATTACHING),
                    behind=(S.STAGE1_MERGED, S.MERGING)),
        *quarantine_edges((S.CLEAN, S.MERGING, S.ATTACHING, S.RESTORING, S.UNDO_PENDING)),
    ),
)


class ResidentMode(OriginalMode):
    table = RESIDENT
    rest_moves: tuple[Step, ...] = (Move.RELEASE_STAGE2,)  # e.g. the prefetch a stage 1 without LoRA started

    def __init__(self, base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                 faults: FaultInjector, low_vram: bool | None) -> None:
        super().__init__(base, loras, strengths, faults, low_vram)
        self.stage2_strengths = dict(strengths)
        place = self._stage2_place()
        if place.type == "cuda":
            free, _ = torch.cuda.mem_get_info(place)
            need = self.base.nbytes()
            if need > free:
                raise ModeNotAvailableError(
                    f"{self.mode.value} mode needs room for a second DiT on {place}: {need / GIB:.1f} GiB, "
                    f"but {free / GIB:.1f} GiB are free; use mode='snapshot' or mode='original'"
                )
        module = build_stage2_copy(base, loras, strengths, place)
        self.stage2 = DiTCopy("stage2", module, self.device, faults)
        self._stage2_fingerprints = FingerprintPlan(dict(self._stage2_weights(loras)))
        self._clean_stage2 = self._stage2_fingerprints.compute()
        self._loras = loras

    def _stage2_place(self) -> torch.device:
        return self.device

    def _stage2_weights(self, loras: list[LoadedLoRA]) -> list[tuple[str, torch.Tensor]]:
        assert self.stage2 is not None
        names = sorted({m for lo in loras for m in lo.targets})
        return [(n, self.stage2.module.get_submodule(n).weight) for n in names]

    def serves_stage2(self, strengths: Mapping[str, float]) -> bool:
        """Whether the stage-2 copy holds exactly these strengths (zero strengths aside)."""
        live = {n: s for n, s in strengths.items() if s != 0.0}
        built = {n: s for n, s in self.stage2_strengths.items() if s != 0.0}
        return bool(live) and live == built

    # ------------------------------------------------------------------ plans
    def decide(self, phase: Phase, kind: ApplyKind, strengths: Mapping[str, float]) -> ApplyKind:
        """Stage 2 runs on the copy at its strengths; any other strength runs dynamic on the base,
        whose weights stay untouched."""
        if phase is not Phase.STAGE2:
            return kind
        if self.serves_stage2(strengths):
            return ApplyKind.MERGED
        return ApplyKind.NONE if kind is ApplyKind.NONE else ApplyKind.DYNAMIC

    def plan(self, state: WeightState, phase: Phase, decision: PhaseDecision) -> tuple[Step, ...]:
        steps: list[Step] = [] if state in REST_STATES else [Undo(final=False)]
        rest = state if state in REST_STATES else S.CLEAN
        if phase is Phase.STAGE2 and self.serves_stage2(decision.strengths):
            return (*steps, *self.activation_steps)
        if phase is Phase.STAGE2:
            steps.append(Move.RELEASE_STAGE2)
        if rest is S.OFFLOADED:
            steps += [Fire("load_base"), Fire("loaded")]
        steps += apply_steps(phase, decision)
        if phase is Phase.STAGE1:
            steps.append(Move.PREFETCH_STAGE2)
        return tuple(steps)

    #: the steps that put the stage-2 copy in charge
    activation_steps: tuple[Step, ...] = (Fire("activate_stage2"),)

    # ------------------------------------------------------------------ moves
    def activate_stage2(self) -> int:
        assert self.stage2 is not None
        self.active = self.stage2  # a pointer swap: both DiTs are resident
        return 0

    # ------------------------------------------------------------------ clean checks and repair
    def stage2_fingerprint(self) -> Fingerprint | None:
        """The copy's digest while it is on the device (None when away: nothing of ours writes to
        a host snapshot, and digesting a whole DiT on the host would cost seconds)."""
        assert self.stage2 is not None
        if self.stage2.residency is not Residency.RESIDENT:
            return None
        return self._stage2_fingerprints.compute()

    def stage2_differing(self) -> list[str]:
        now = self.stage2_fingerprint()
        return [] if now is None else [f"stage2:{n}" for n in self._clean_stage2.differing(now)]

    def repair_stage2(self, base_weights: Mapping[str, torch.Tensor]) -> int:
        # only a device copy can be damaged (nothing of ours writes a host snapshot, and reset
        # releases snapshot mode's device copy); it is rebuilt from the clean base in place
        if not self.stage2_differing():
            return 0
        assert self.stage2 is not None
        written = rebuild_stage2_copy(self.stage2.module, base_weights, self._loras, self.stage2_strengths)
        still = self.stage2_differing()
        if still:
            raise RepairError(f"rebuilding the stage-2 DiT from the clean base did not give its clean "
                              f"fingerprint ({len(still)} weights differ, e.g. {still[0]!r})")
        return written

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        return 2 * self.base.nbytes() + lora_bytes
