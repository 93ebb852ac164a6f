"""Snapshot mode: pinned host snapshots of the base and a pre-merged stage-2 DiT. The stage-2 DiT
is prefetched on a side stream one stage early (while stage 1 runs) and released after the
request. The low-VRAM variant evicts the base before the stage-2 prefetch (no overlap: both never
sit on the device) and prefetches the base back, asynchronously, when the request ends."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..domain import Residency, ResidencyMode, WeightState
from ..faults import FaultInjector
from ..lora import LoadedLoRA
from .resident import GIB, ResidentMode, stage1_edges
from .table import Edge, Fire, ModeTable, Move, Step, quarantine_edges, undo_edges

S = WeightState
#: below this much device memory, snapshot mode never holds both DiTs on the device (one LTX-2 DiT
#: fits an 80 GB card, two need a 141 GB one)
LOW_VRAM_BELOW = 130 * GIB

SNAPSHOT = ModeTable(
    mode=ResidencyMode.SNAPSHOT,
    initial=S.CLEAN,
    summary="pinned host snapshots of the base and a pre-merged stage-2 DiT; stage 2's DiT is "
    "prefetched on a side stream while stage 1 runs (low-VRAM: the base is evicted first)",
    edges=(
        *stage1_edges(),
        Edge("activate_stage2", S.CLEAN, S.PREFETCHING, "activate"),
        Edge("activate_stage2", S.OFFLOADED, S.PREFETCHING, "activate"),
        Edge("activated", S.PREFETCHING, S.STAGE2_MERGED),
        Edge("load_base", S.OFFLOADED, S.PREFETCHING, "load"),
        Edge("loaded", S.PREFETCHING, S.CLEAN),
        *undo_edges((S.STAGE1_MERGED, S.STAGE2_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC,
                     S.MERGING, S.ATTACHING, S.PREFETCHING),
                    behind=(S.STAGE1_MERGED, S.MERGING), settled=(S.CLEAN, S.OFFLOADED)),
        *quarantine_edges((S.CLEAN, S.OFFLOADED, S.MERGING, S.ATTACHING, S.PREFETCHING, S.RESTORING,
                           S.UNDO_PENDING)),
    ),
)


class SnapshotMode(ResidentMode):
    table = SNAPSHOT
    activation_steps: tuple[Step, ...] = (Fire("activate_stage2"), Fire("activated"))

    def __init__(self, base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                 faults: FaultInjector, low_vram: bool | None) -> None:
        super().__init__(base, loras, strengths, faults, low_vram)
        assert self.stage2 is not None
        self.stage2.adopt_snapshot()  # built on the host: its tensors are the snapshot
        self.base.capture()
        if low_vram is None:
            low_vram = (self.device.type == "cuda"
                        and torch.cuda.get_device_properties(self.device).total_memory < LOW_VRAM_BELOW)
        self.low_vram = low_vram

    def _stage2_place(self) -> torch.device:
        return torch.device("cpu")

    def shared_clean_copies(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.base.snapshot_of(weights)  # captured clean, never written

    def load_base(self) -> int:
        self.base.ensure_resident(self.stream)
        return self.base.nbytes()

    def move(self, move: Move) -> None:
        assert self.stage2 is not None
        if move is Move.PREFETCH_STAGE2:
            if not self.low_vram and self.stage2.residency is Residency.OFFLOADED:
                self.stage2.prefetch(self.stream)  # overlaps stage 1's denoising
        elif self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()  # cancels an early prefetch: its device memory is not needed

    def activate_stage2(self) -> int:
        assert self.stage2 is not None
        moved = 0
        if self.low_vram and self.base.residency is not Residency.OFFLOADED:
            self.base.release()  # never both on the device
        if self.stage2.residency is Residency.OFFLOADED:
            moved = self.stage2.prefetch(self.stream)
        self.stage2.wait()
        self.active = self.stage2
        return moved

    def deactivate(self, final: bool = True) -> None:
        assert self.stage2 is not None
        # undoing stage 1 on the way to stage 2 must not throw away stage 2's early prefetch
        if (final or self.active is self.stage2) and self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()
        self.active = self.base
        if final and self.low_vram and self.base.residency is Residency.OFFLOADED:
            self.base.prefetch(self.stream)  # back for the next request, off the critical path

    def reset(self) -> None:
        assert self.stage2 is not None
        for d in self.dits:
            d.cancel()
        if self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()  # first: low VRAM never holds both DiTs, not even in a repair
        super().reset()

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        factor = 1 if self.low_vram else 2
        return factor * self.base.nbytes() + lora_bytes
