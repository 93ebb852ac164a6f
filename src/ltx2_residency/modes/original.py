"""Original mode: one shared DiT; each phase's LoRAs are attached or merged in place and undone
exactly before the request ends. Also the base of the modes that hold a second, stage-2 DiT."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..domain import ApplyKind, Phase, Residency, ResidencyMode, WeightState
from ..faults import FaultInjector
from ..lora import LoadedLoRA
from ..ops.residency import DiTCopy
from .table import (
    APPLIED_STATES,
    REST_STATES,
    Edge,
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

ORIGINAL = ModeTable(
    mode=ResidencyMode.ORIGINAL,
    initial=S.CLEAN,
    summary="one shared DiT; each phase's LoRA is attached or merged in place and undone "
    "exactly before the request ends",
    edges=(
        Edge("merge", S.CLEAN, S.MERGING, "merge"),
        Edge("merged_stage1", S.MERGING, S.STAGE1_MERGED),
        Edge("merged_stage2", S.MERGING, S.STAGE2_MERGED),
        Edge("attach", S.CLEAN, S.ATTACHING, "attach"),
        Edge("attached_stage1", S.ATTACHING, S.STAGE1_DYNAMIC),
        Edge("attached_stage2", S.ATTACHING, S.STAGE2_DYNAMIC),
        # merging ahead (req.prepare): stage 2's merge starts behind stage 1's last DiT calls,
        # block by block, and the switch completes it
        Edge("merge_ahead", S.CLEAN, S.MERGING_AHEAD, "merge_ahead"),
        Edge("merge", S.MERGING_AHEAD, S.MERGING, "merge"),
        *undo_edges((*APPLIED_STATES, S.MERGING, S.ATTACHING, S.MERGING_AHEAD),
                    behind=(S.STAGE1_MERGED, S.STAGE2_MERGED, S.MERGING, S.MERGING_AHEAD)),
        *quarantine_edges((S.CLEAN, S.MERGING_AHEAD, S.MERGING, S.ATTACHING, S.RESTORING, S.UNDO_PENDING)),
    ),
)


def device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


class OriginalMode:
    """Which DiT a phase runs on and how it gets there, for one residency mode: the table, the
    plans over it, and the moves of the DiT copies (:mod:`..ops.residency`)."""

    table = ORIGINAL
    #: the strengths the stage-2 copy was built with (none in original mode)
    stage2_strengths: Mapping[str, float] = {}

    def __init__(self, base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                 faults: FaultInjector, low_vram: bool | None) -> None:
        self.device = device_of(base)
        self.base = DiTCopy("base", base, self.device, faults)
        self.stage2: DiTCopy | None = None
        self.active = self.base
        self.low_vram = False
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def mode(self) -> ResidencyMode:
        return self.table.mode

    @property
    def dits(self) -> list[DiTCopy]:
        return [d for d in (self.base, self.stage2) if d is not None]

    # ------------------------------------------------------------------ plans
    def decide(self, phase: Phase, kind: ApplyKind, strengths: Mapping[str, float]) -> ApplyKind:
        """The mode's say over the policy's verdict (original mode: none)."""
        return kind

    def plan(self, state: WeightState, phase: Phase, decision: PhaseDecision) -> tuple[Step, ...]:
        """The steps from ``state`` to ``phase`` applied as ``decision`` says."""
        if decision.ahead:  # the merge req.prepare() started: the switch completes it (no undo first)
            return apply_steps(phase, decision)
        undo = () if state in REST_STATES else (Undo(final=False),)
        return (*undo, *apply_steps(phase, decision))

    def plan_end(self, state: WeightState, behind: bool) -> tuple[Step, ...]:
        """The steps that end a request (or a failed switch) in ``state``."""
        if state is S.QUARANTINED:
            return ()
        if state in REST_STATES:
            return self.rest_moves
        return (Undo(final=True, behind=behind),)

    #: what a request that applied nothing leaves to do
    rest_moves: tuple[Step, ...] = ()

    # ------------------------------------------------------------------ moves
    def move(self, move: Move) -> None:
        """A residency move of the stage-2 copy (original mode has none)."""

    def load_base(self) -> int:
        """Make the base DiT runnable (low-VRAM snapshot: it may be away); returns bytes moved."""
        return 0

    def activate_stage2(self) -> int:
        raise AssertionError("original mode has no stage-2 DiT")

    def deactivate(self, final: bool = True) -> None:
        """Back to the base DiT. ``final``: the request is over (not just moving from stage 1 to 2)."""
        self.active = self.base

    def settled_event(self) -> str:
        """The event that ends an undo: ``restored``, or ``offloaded`` when the base is away."""
        return "restored" if self.base.residency is Residency.RESIDENT else "offloaded"

    def reset(self) -> None:
        """After a failure: cancel moves, make the base active and resident."""
        for d in self.dits:
            d.cancel()
        self.active = self.base
        self.base.ensure_resident(self.stream)

    # ------------------------------------------------------------------ clean checks and repair
    def stage2_differing(self) -> list[str]:
        """Weights of the stage-2 copy that differ from its clean fingerprint (none here)."""
        return []

    def shared_clean_copies(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors that already hold ``weights``' clean bits and that nothing writes: the
        repair source may use them instead of a copy of its own."""
        return {}

    def repair_stage2(self, base_weights: Mapping[str, torch.Tensor]) -> int:
        """After ``reset`` and with a clean base: bring the stage-2 DiT back too; returns bytes written."""
        return 0

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        return self.base.nbytes() + lora_bytes
