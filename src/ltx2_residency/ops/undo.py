"""What an exact merge records and the protocol its kernels follow.

A merge writes ``W <- bf16(W + s·B·A)`` (the product and the sum in float32, one rounding). That
rounding loses bits of ``W`` wherever the sum has a larger exponent than ``W``, so subtracting the
delta again cannot give ``W`` back in general. Each layer's merge therefore records, before the
layer's first byte changes, what its undo needs (:class:`LayerUndo`); the frames of merged LoRAs
are undone last-in-first-out by :class:`~.merge.MergeStack`. The kernels (:class:`ExactMerge`) are
chosen from :data:`~.exact.EXACT_KERNELS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ResidencyError
from .fingerprint import Digest

_HALF = (torch.bfloat16, torch.float16)


class RestoreMismatchError(ResidencyError, RuntimeError):
    """An undo did not reproduce the pre-merge bits of a layer."""


@dataclass(frozen=True)
class LayerTarget:
    """One LoRA's view of one Linear: the weight it mutates and the factors of its delta."""

    name: str
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float  # alpha / rank

    def delta(self, strength: float) -> torch.Tensor:
        """``strength · scale · B @ A`` in float32. Deterministic: undo recomputes it."""
        w = self.weight
        b = self.lora_B.detach().to(device=w.device)
        a = self.lora_A.detach().to(device=w.device)
        if w.is_cuda and a.dtype in _HALF and b.dtype == a.dtype:
            # tensor cores with float32 accumulation: the products of half-precision factors are
            # exact in float32, so this is the float32 product at a fraction of the cost
            product = torch.mm(b, a, out_dtype=torch.float32)
        else:
            product = torch.mm(b.to(torch.float32), a.to(torch.float32))
        return product.mul_(strength * self.scale)


@dataclass
class LayerUndo:
    """What undoing one layer's merge needs, recorded before the layer's first byte changes.

    A write and the bookkeeping after it are two steps, and an interrupt may fall between them.
    So while a torch strategy's write is in flight, the record holds the bits the layer will
    have once it lands (``merging``): comparing the layer with them tells whether the write
    happened, and the undo neither skips a written layer nor undoes one that never was. (An
    interrupted undo is not retried: it quarantines the DiT.)"""

    digest: Digest | None  # the layer before this merge (None: layer checks are off)
    captured: tuple[torch.Tensor, ...] = ()
    exceptions: int = 0
    handle: object = None  # strategy-private state (the fused strategy's tile flags and records)
    merging: torch.Tensor | None = None  # the merged layer, until its write is known to have landed

    def written(self, weight: torch.Tensor) -> bool:
        """Whether the layer holds this merge (``False``: an interrupt fell before its write)."""
        return self.merging is None or same_bits(weight, self.merging)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What the undo reads (a strategy that pools its records makes views of them on demand)."""
        return self.captured

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(_bits(a.detach()), _bits(b.detach())))


class NonFiniteMergeError(Exception):
    """Internal: a layer's merge is not finite (the stack reports it as a LoRAValueError)."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


@dataclass
class MergeFrame:
    """One LoRA merged at one strength: the layers written so far, in write order."""

    lora: str
    strength: float
    layers: list[tuple[LayerTarget, LayerUndo]] = field(default_factory=list)
    state: Any = None  # the strategy's own (fused: the launch's plan, flags and record pools)

    @property
    def nbytes_held(self) -> int:
        return sum(u.nbytes for _, u in self.layers)


class ExactMerge(Protocol):
    """A merge kernel with its exact undo: merge each layer (recording what the undo needs first),
    write it, and undo it bit for bit. Chosen from :data:`~.exact.EXACT_KERNELS`."""

    name: str
    #: undoes a frame's layers together (:meth:`undo_batch`), not layer by layer (:meth:`undo`)
    batched: bool
    #: marks its own records for a side stream's undo (else the stack marks every record tensor)
    keeps_for_stream: bool

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None: ...
    def merge(self, frame: MergeFrame, target: LayerTarget, digest: Digest | None) -> LayerUndo: ...
    def write(self, target: LayerTarget, undo: LayerUndo) -> None: ...
    def flush(self, frame: MergeFrame) -> None: ...
    def finish(self, frame: MergeFrame) -> None: ...
    def record_ahead(self, frame: MergeFrame) -> bool: ...
    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None: ...
    def undo_batch(self, batch: list[tuple[LayerTarget, LayerUndo]], strength: float) -> None: ...
