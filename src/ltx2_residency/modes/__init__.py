"""The residency modes: per mode, its transition table (data) and its strategy (plans and moves).

- ``original`` (:mod:`.original`): one shared DiT; nothing to move.
- ``resident`` (:mod:`.resident`): a pre-merged stage-2 DiT on the device beside the base.
- ``snapshot`` (:mod:`.snapshot`): pinned host snapshots of both; stage 2's DiT is prefetched.

:data:`MODES` maps each mode to its strategy class; a strategy's ``table`` is its mode's table.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..domain import ResidencyMode
from .original import ORIGINAL, OriginalMode, device_of
from .resident import GIB, RESIDENT, ResidentMode
from .snapshot import SNAPSHOT, SnapshotMode
from .table import (
    PHASE_TARGET,
    REST_STATES,
    TRANSIENT_STATES,
    Edge,
    Fire,
    ModeTable,
    Move,
    PhaseDecision,
    Step,
    Undo,
    mermaid,
)

__all__ = [
    "MODES",
    "ORIGINAL",
    "PHASE_TARGET",
    "RESIDENT",
    "REST_STATES",
    "SNAPSHOT",
    "TABLES",
    "TRANSIENT_STATES",
    "Edge",
    "Fire",
    "ModeTable",
    "Move",
    "OriginalMode",
    "PhaseDecision",
    "ResidentMode",
    "SnapshotMode",
    "Step",
    "Undo",
    "choose_auto",
    "device_of",
    "mermaid",
]

#: residency mode -> its strategy (whose ``table`` is the mode's transition table)
MODES: Mapping[ResidencyMode, type[OriginalMode]] = {
    ResidencyMode.ORIGINAL: OriginalMode,
    ResidencyMode.RESIDENT: ResidentMode,
    ResidencyMode.SNAPSHOT: SnapshotMode,
}

#: residency mode -> its transition table
TABLES: Mapping[ResidencyMode, ModeTable] = {mode: strategy.table for mode, strategy in MODES.items()}


def choose_auto(module: nn.Module, lora_bytes: int, reserve_bytes: int) -> tuple[ResidencyMode, str]:
    """Resident when two DiTs, the LoRAs and an activation reserve fit the device, else original."""
    device = device_of(module)
    if device.type != "cuda":
        return ResidencyMode.ORIGINAL, f"the DiT is on {device.type}, not a CUDA device: one shared DiT"
    total = torch.cuda.get_device_properties(device).total_memory
    dit = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    need = 2 * dit + lora_bytes + reserve_bytes
    verdict = (f"two DiTs ({2 * dit / GIB:.1f} GiB) + LoRAs ({lora_bytes / GIB:.1f} GiB) + reserve "
               f"({reserve_bytes / GIB:.1f} GiB) = {need / GIB:.1f} GiB vs {total / GIB:.1f} GiB on the device")
    if need <= total:
        return ResidencyMode.RESIDENT, verdict + ": resident"
    return ResidencyMode.ORIGINAL, verdict + ": original"
