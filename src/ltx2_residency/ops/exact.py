"""The exact-merge kernels in torch, and the table the manager picks a kernel from.

``recompute``
    Undo recomputes ``bf16(W' - s·B·A)`` and patches the positions where that differs from the
    original, whose indices and original bits were recorded at merge time (by running the very same
    computation). Memory: 6 bytes per differing element (int32 index + bf16 value); how many
    elements differ is measured in docs/architecture.md.
``copy`` / ``copy_host``
    A copy of the layer's weight (on the weight's device, or pinned on the host); undo copies it
    back. Memory: one full copy of the merged layers.
``fused``
    The recompute undo as Triton kernels, one launch per LoRA (:mod:`.fused`).

Each pass is fused where torch allows it (``torch.add(delta, W, out=W')`` computes in float32 and
rounds once into bfloat16) because a merge is memory-bound: the floor is one read and one write of
``W``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ..errors import ConfigError
from . import kernels
from .fingerprint import Digest
from .undo import ExactMerge, LayerTarget, LayerUndo, MergeFrame, NonFiniteMergeError, _bits


def _merge_checked(target: LayerTarget, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bf16(W + d), d)`` computed aside; raises before anything is written if not finite."""
    w = target.weight.detach()
    delta = target.delta(strength)
    merged = torch.add(delta, w, out=torch.empty_like(w))
    if not bool(torch.isfinite(merged).all()):
        raise NonFiniteMergeError(target.name)
    return merged, delta


class _TorchStrategy:
    """Per layer: compute the merge aside, check it, capture the undo; the stack records it, then
    :meth:`write` writes the layer once."""

    name = "torch"
    batched = False
    keeps_for_stream = False

    def capture(self, target: LayerTarget, merged: torch.Tensor, delta: torch.Tensor,
                digest: Digest | None) -> LayerUndo:
        raise NotImplementedError

    def merge(self, frame: MergeFrame, target: LayerTarget, digest: Digest | None) -> LayerUndo:
        merged, delta = _merge_checked(target, frame.strength)
        undo = self.capture(target, merged, delta, digest)
        undo.merging = merged
        return undo

    def write(self, target: LayerTarget, undo: LayerUndo) -> None:
        """Write the recorded merge into the layer (the record is on the stack already)."""
        assert undo.merging is not None
        target.weight.detach().copy_(undo.merging)
        undo.merging = None  # landed: the merged copy is no longer needed

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None:
        """A frame starts; the torch strategies keep nothing across layers."""

    def flush(self, frame: MergeFrame) -> None:
        """The layers given so far must be written now; the torch strategies wrote them already."""

    def finish(self, frame: MergeFrame) -> None:
        """Every layer of a frame is merged; nothing is pending for the torch strategies."""

    def record_ahead(self, frame: MergeFrame) -> bool:
        """The torch strategies record each layer as they merge it: nothing to take ahead."""
        return False

    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None:
        raise NotImplementedError

    def undo_batch(self, batch: list[tuple[LayerTarget, LayerUndo]], strength: float) -> None:
        """Layer by layer (the stack calls :meth:`undo` itself; this serves a caller with a batch)."""
        for target, undo in batch:
            if undo.written(target.weight):
                self.undo(target, undo, strength)


class RecomputeExactMerge(_TorchStrategy):
    name = "recompute"

    def capture(self, target: LayerTarget, merged: torch.Tensor, delta: torch.Tensor,
                digest: Digest | None) -> LayerUndo:
        w = target.weight.detach()
        # exactly the arithmetic undo() will run, so the misses recorded are the misses it makes
        redo = torch.sub(merged, delta, out=torch.empty_like(merged))
        miss = (_bits(redo) != _bits(w)).view(-1).nonzero().view(-1)
        if w.numel() < 2**31:
            miss = miss.to(torch.int32)
        values = w.reshape(-1)[miss]
        return LayerUndo(digest, (miss, values), int(miss.numel()))

    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None:
        w = target.weight.detach()
        torch.sub(w, target.delta(strength), out=w)
        miss, values = undo.tensors
        w.view(-1)[miss.to(torch.int64)] = values


class CopyExactMerge(_TorchStrategy):
    name = "copy"

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = device

    def capture(self, target: LayerTarget, merged: torch.Tensor, delta: torch.Tensor,
                digest: Digest | None) -> LayerUndo:
        w = target.weight.detach()
        device = torch.device(self.device) if self.device is not None else w.device
        pin = device.type == "cpu" and w.device.type == "cuda"
        backup = torch.empty(w.shape, dtype=w.dtype, device=device, pin_memory=pin)
        backup.copy_(w)
        return LayerUndo(digest, (backup,))

    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None:
        target.weight.detach().copy_(undo.tensors[0], non_blocking=False)


def _fused() -> ExactMerge:
    from .fused import FusedExactMerge  # Triton is optional: imported when asked for

    return FusedExactMerge()


#: exact-merge kernel name -> a factory of its strategy
EXACT_KERNELS: Mapping[str, Callable[[], ExactMerge]] = {
    "recompute": RecomputeExactMerge,
    "copy": CopyExactMerge,
    "copy_host": lambda: CopyExactMerge("cpu"),
    "fused": _fused,
}


def choose_exact_kernel(name: str, weights: Iterable[torch.Tensor]) -> str:
    """Resolve ``"auto"``; refuse ``"fused"`` where its kernels cannot run."""
    ws = list(weights)
    fused_ok = bool(ws) and all(w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() for w in ws) and \
        kernels.available(ws[0].device)
    if name == "auto":
        return "fused" if fused_ok and ws[0].device.type == "cuda" else "recompute"
    if name == "fused" and not fused_ok:
        raise ConfigError("exact_kernel='fused' needs Triton and contiguous 2-D bfloat16 weights on a CUDA "
                          "device (or TRITON_INTERPRET=1); use exact_kernel='recompute'")
    return name
