"""Where ``repair()`` gets clean weights from when an exact undo is no longer possible."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..faults import FaultInjector


class HostCopy:
    """A copy of every managed weight, taken while the model is known clean.

    On the host (pinned when the weights live on a CUDA device), so it costs no GPU memory:
    one extra copy of the adapted Linear weights in host RAM. ``shared`` names host tensors
    that already hold a weight's clean bits and are never written (snapshot mode's base
    snapshot): those are referenced, not copied, so the mode does not keep a third host copy.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor],
                 shared: Mapping[str, torch.Tensor] | None = None) -> None:
        self._copies: dict[str, torch.Tensor] = {}
        self._owned = 0
        shared = shared or {}
        with torch.no_grad():
            for name, w in weights.items():
                host = shared.get(name)
                if host is not None and host.shape == w.shape and host.dtype == w.dtype:
                    self._copies[name] = host
                    continue
                pin = w.device.type == "cuda"
                copy = torch.empty(w.shape, dtype=w.dtype, device="cpu", pin_memory=pin)
                copy.copy_(w.detach())
                self._copies[name] = copy
                self._owned += copy.numel() * copy.element_size()

    @property
    def nbytes(self) -> int:
        """Host bytes this source holds of its own (shared snapshot tensors excluded)."""
        return self._owned

    @property
    def shared_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies.values()) - self._owned

    def restore(self, weights: Mapping[str, torch.Tensor], faults: FaultInjector) -> int:
        written = 0
        with torch.no_grad():
            for name, w in weights.items():
                faults.hit("repair.layer")
                w.detach().copy_(self._copies[name])
                written += w.numel() * w.element_size()
        return written
