"""Moving one DiT between the compute device and a pinned host snapshot.

The snapshot is captured once and is the DiT's truth while it is away: releasing the DiT
rebinds every parameter and buffer to its snapshot tensor (no device-to-host copy: the
weights did not change), and prefetching copies the snapshot back into fresh device tensors
on a dedicated stream, recording an event that the compute stream waits on before the DiT
runs. On a CPU-only machine the same steps run synchronously, so every mode's logic is
testable without a GPU.

Where each DiT is (:class:`~ltx2_residency.domain.Residency`) is stored here, by the
operations themselves, and never read back from ``param.device``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..domain import Residency
from ..faults import FaultInjector


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


class DiTCopy:
    """One DiT, its pinned host snapshot, and where its weights are right now."""

    def __init__(self, name: str, module: nn.Module, device: torch.device,
                 faults: FaultInjector, residency: Residency = Residency.RESIDENT) -> None:
        self.name = name
        self.module = module
        self.device = device
        self.faults = faults
        self.residency = residency
        self._slots = _tensors(module)
        self._snapshot: list[torch.Tensor] | None = None
        self._staging: list[torch.Tensor] | None = None
        self._event: torch.cuda.Event | None = None
        self._stream: torch.cuda.Stream | None = None

    # ------------------------------------------------------------------ snapshot
    def capture(self) -> None:
        """Take the host snapshot (pinned when the device is CUDA). Call while the DiT is clean."""
        pin = self.device.type == "cuda"
        snap = []
        with torch.no_grad():
            for t in self._slots:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                host.copy_(t.detach())
                snap.append(host)
        self._snapshot = snap

    def adopt_snapshot(self) -> None:
        """The module's tensors already live on the host (built there): they are the snapshot."""
        self._snapshot = [t.detach() for t in self._slots]
        self.residency = Residency.OFFLOADED

    def snapshot_of(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The host snapshot tensor behind each of ``tensors`` that is one of this DiT's own."""
        if self._snapshot is None:
            return {}
        by_slot = {id(s): h for s, h in zip(self._slots, self._snapshot, strict=True)}
        return {name: by_slot[id(t)] for name, t in tensors.items() if id(t) in by_slot}

    # ------------------------------------------------------------------ moves
    def release(self) -> int:
        """Rebind every tensor to its snapshot; the device copies are freed. Returns bytes freed."""
        assert self._snapshot is not None, "release needs a snapshot"
        self.cancel()
        freed = 0
        with torch.no_grad():
            for slot, host in zip(self._slots, self._snapshot, strict=True):
                if slot.data_ptr() != host.data_ptr():
                    freed += slot.numel() * slot.element_size()
                slot.data = host
        self.residency = Residency.OFFLOADED
        return freed

    def prefetch(self, stream: torch.cuda.Stream | None) -> int:
        """Start copying the snapshot to the device; returns bytes in flight."""
        assert self._snapshot is not None, "prefetch needs a snapshot"
        self.faults.hit("prefetch.before")
        moved = sum(h.numel() * h.element_size() for h in self._snapshot)
        if self.device.type == "cuda" and stream is not None:
            self._stream = stream
            with torch.cuda.stream(stream):
                staging = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in self._snapshot]
                for dev, host in zip(staging, self._snapshot, strict=True):
                    dev.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._event = event
        else:
            staging = [h.clone() for h in self._snapshot]  # a CPU "device": synchronous
            self._event = None
        self._staging = staging
        self.residency = Residency.PREFETCHING
        self.faults.hit("prefetch.after")
        return moved

    def wait(self) -> None:
        """Make the compute stream wait for the prefetch, then bind the device tensors."""
        assert self._staging is not None, "wait without a prefetch"
        if self._event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._event)
            for t in self._staging:
                t.record_stream(compute)  # freed only after the compute stream is done with it
        with torch.no_grad():
            for slot, dev in zip(self._slots, self._staging, strict=True):
                slot.data = dev
        self._staging, self._event = None, None
        self.residency = Residency.RESIDENT

    def cancel(self) -> None:
        """Abandon an in-flight prefetch: wait for the copy engine, drop the staging tensors."""
        if self._event is not None:
            self._event.synchronize()  # no stream work may outlive the tensors it writes
        self._staging, self._event = None, None
        if self.residency is Residency.PREFETCHING:
            self.residency = Residency.OFFLOADED

    def ensure_resident(self, stream: torch.cuda.Stream | None) -> None:
        if self.residency is Residency.OFFLOADED:
            self.prefetch(stream)
        if self.residency is Residency.PREFETCHING:
            self.wait()

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._slots)

    def bytes_by_place(self) -> dict[str, int]:
        """Bytes this DiT holds, by place: the device, pinned host (snapshot), in flight."""
        out = {"device": 0, "host_snapshot": 0, "in_flight": 0}
        if self._snapshot is not None:
            out["host_snapshot"] = sum(h.numel() * h.element_size() for h in self._snapshot)
        if self.residency is Residency.RESIDENT:
            out["device"] = self.nbytes() if self._snapshot is None or self.device.type == "cuda" \
                else sum(t.numel() * t.element_size() for t, h in zip(self._slots, self._snapshot, strict=True)
                         if t.data_ptr() != h.data_ptr())
        if self._staging is not None:
            out["in_flight"] = sum(t.numel() * t.element_size() for t in self._staging)
        return out
