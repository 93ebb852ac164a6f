"""Residency-mode strategies: which DiT a phase runs on and how it gets there.

One small class per mode, chosen from :data:`MODE_STRATEGIES`. The manager sequences the
events; these classes hold the second DiT and do the moves (``ops.residency``).

- ``original``: one DiT; nothing to move.
- ``resident``: the base and a pre-merged stage-2 DiT both on the device; activating stage 2
  rebinds a pointer.
- ``snapshot``: pinned host snapshots of both; the stage-2 DiT is prefetched on a side stream
  one stage early (while stage 1 runs) and released after the request. The low-VRAM variant
  evicts the base before the stage-2 prefetch (no overlap: both never sit on the device) and
  prefetches the base back, asynchronously, when the request ends.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .domain import Residency, ResidencyMode
from .errors import ModeNotAvailableError, RepairError
from .faults import FaultInjector
from .lora import LoadedLoRA
from .ops.fingerprint import Fingerprint, FingerprintPlan
from .ops.premerged import build_premerged, rebuild_premerged
from .ops.residency import DiTCopy

GIB = 2**30
LOW_VRAM_BELOW = 130 * GIB  # an 80 GB card holds one 19 B DiT, a 141 GB card two


def device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


class OriginalMode:
    mode = ResidencyMode.ORIGINAL
    premerged_strengths: Mapping[str, float] = {}

    def __init__(self, base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                 faults: FaultInjector, low_vram: bool | None) -> None:
        self.device = device_of(base)
        self.base = DiTCopy("base", base, self.device, faults)
        self.stage2: DiTCopy | None = None
        self.active = self.base
        self.low_vram = False
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def dits(self) -> list[DiTCopy]:
        return [d for d in (self.base, self.stage2) if d is not None]

    def uses_premerged(self, strengths: Mapping[str, float]) -> bool:
        return False

    def prepare_base(self) -> None:
        """Make the base DiT runnable (snapshot low-VRAM: it may be away)."""

    def after_stage1(self) -> None:
        """Stage 1 is set up: the moment to start moving stage 2's DiT."""

    def activate_stage2(self) -> int:
        raise AssertionError("original mode has no stage-2 DiT")

    def skip_stage2(self) -> None:
        """Stage 2 runs on the base this time (an override): the second DiT is not needed."""

    def deactivate(self, final: bool = True) -> bool:
        """Back to the base DiT; returns whether the base is resident afterwards. ``final``: the
        request is over (not just moving from stage 1 to stage 2)."""
        self.active = self.base
        return self.base.residency is Residency.RESIDENT

    def reset(self) -> None:
        """After a failure: cancel moves, make the base active and resident."""
        for d in self.dits:
            d.cancel()
        self.active = self.base
        self.base.ensure_resident(self.stream)

    def settle(self) -> None:
        """A request or a switch ends with nothing to restore: release whatever it started moving."""

    def stage2_fingerprint(self) -> Fingerprint | None:
        return None

    def shared_clean_copies(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors that already hold ``weights``' clean bits and that nothing writes: the
        repair source may use them instead of a copy of its own."""
        return {}

    def repair_stage2(self, base_weights: Mapping[str, torch.Tensor]) -> int:
        """After ``reset`` and with a clean base: bring the stage-2 DiT back too; returns bytes written."""
        return 0

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        return self.base.nbytes() + lora_bytes


class ResidentMode(OriginalMode):
    mode = ResidencyMode.RESIDENT

    def __init__(self, base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                 faults: FaultInjector, low_vram: bool | None) -> None:
        super().__init__(base, loras, strengths, faults, low_vram)
        self.premerged_strengths = dict(strengths)
        place = self._stage2_place()
        if place.type == "cuda":
            free, _ = torch.cuda.mem_get_info(place)
            need = self.base.nbytes()
            if need > free:
                raise ModeNotAvailableError(
                    f"{self.mode.value} mode needs room for a second DiT on {place}: {need / GIB:.1f} GiB, "
                    f"but {free / GIB:.1f} GiB are free; use mode='snapshot' or mode='original'"
                )
        module = build_premerged(base, loras, strengths, place)
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

    def uses_premerged(self, strengths: Mapping[str, float]) -> bool:
        live = {n: s for n, s in strengths.items() if s != 0.0}
        premerged = {n: s for n, s in self.premerged_strengths.items() if s != 0.0}
        return bool(live) and live == premerged

    def activate_stage2(self) -> int:
        assert self.stage2 is not None
        self.active = self.stage2  # a pointer swap: both DiTs are resident
        return 0

    def stage2_fingerprint(self) -> Fingerprint | None:
        """The copy's digest while it is on the device (None when away: nothing of ours writes to
        a host snapshot, and digesting 35 GiB on the host would cost seconds)."""
        assert self.stage2 is not None
        if self.stage2.residency is not Residency.RESIDENT:
            return None
        return self._stage2_fingerprints.compute()

    def repair_stage2(self, base_weights: Mapping[str, torch.Tensor]) -> int:
        # only a device copy can be damaged (nothing of ours writes a host snapshot, and reset
        # releases snapshot mode's device copy); it is rebuilt from the clean base in place
        now = self.stage2_fingerprint()
        if now is None or not self._clean_stage2.differing(now):
            return 0
        assert self.stage2 is not None
        written = rebuild_premerged(self.stage2.module, base_weights, self._loras, self.premerged_strengths)
        after = self.stage2_fingerprint()
        still = self._clean_stage2.differing(after) if after is not None else []
        if still:
            raise RepairError(f"rebuilding the stage-2 DiT from the clean base did not give its clean "
                              f"fingerprint ({len(still)} weights differ, e.g. {still[0]!r})")
        return written

    @property
    def clean_stage2(self) -> Fingerprint:
        return self._clean_stage2

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        return 2 * self.base.nbytes() + lora_bytes


class SnapshotMode(ResidentMode):
    mode = ResidencyMode.SNAPSHOT

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

    def prepare_base(self) -> None:
        self.base.ensure_resident(self.stream)

    def after_stage1(self) -> None:
        assert self.stage2 is not None
        if not self.low_vram and self.stage2.residency is Residency.OFFLOADED:
            self.stage2.prefetch(self.stream)  # overlaps stage 1's denoising

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

    def deactivate(self, final: bool = True) -> bool:
        assert self.stage2 is not None
        # undoing stage 1 on the way to stage 2 must not throw away stage 2's early prefetch
        if (final or self.active is self.stage2) and self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()
        self.active = self.base
        if final and self.low_vram and self.base.residency is Residency.OFFLOADED:
            self.base.prefetch(self.stream)  # back for the next request, off the critical path
        return self.base.residency is Residency.RESIDENT

    def skip_stage2(self) -> None:
        assert self.stage2 is not None
        if self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()  # cancels the early prefetch: its device memory is not needed

    def reset(self) -> None:
        assert self.stage2 is not None
        for d in self.dits:
            d.cancel()
        if self.stage2.residency is not Residency.OFFLOADED:
            self.stage2.release()  # first: low VRAM never holds both DiTs, not even in a repair
        super().reset()

    def settle(self) -> None:
        self.skip_stage2()  # e.g. the stage-2 prefetch a stage 1 without LoRA started

    def expected_peak_bytes(self, lora_bytes: int) -> int:
        factor = 1 if self.low_vram else 2
        return factor * self.base.nbytes() + lora_bytes


MODE_STRATEGIES: dict[ResidencyMode, type[OriginalMode]] = {
    ResidencyMode.ORIGINAL: OriginalMode,
    ResidencyMode.RESIDENT: ResidentMode,
    ResidencyMode.SNAPSHOT: SnapshotMode,
}


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
