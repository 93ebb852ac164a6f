"""In-place LoRA merge with an exact, last-in-first-out undo.

A merge writes ``W <- bf16(W + s·B·A)`` (the product and the sum in float32, one rounding).
That rounding loses bits of ``W`` wherever the sum has a larger exponent than ``W``, so
subtracting the delta again cannot give ``W`` back in general. Each layer write therefore
captures, before it commits, what its undo needs; the capture strategy is chosen from
:data:`RESTORE_STRATEGIES`:

``recompute``
    Undo recomputes ``bf16(W' - s·B·A)`` and patches the positions where that differs from
    the original, whose indices and original bits were recorded at merge time (by running
    the very same computation). Memory: 6 bytes per differing element (int32 index + bf16
    value). Measured with ‖ΔW‖ = 5 / 10 / 20 % of ‖W‖: 3.7 / 6.2 / 10.2 % of the elements differ
    on the tiny model, 7.7 % at 10 % on the real LTX-2 shapes (rank 384) - i.e. 11-31 % of the
    bytes of a full copy (23 % at real shapes).
``copy``
    A copy of the layer's weight (on a chosen device, pinned on the host when it is a CUDA
    weight); undo copies it back. Memory: one full copy of the merged layers.

With ``check_layers=True`` every undo is checked against the layer's pre-merge digest (one
more pass over the weights at merge and at restore); by default the manager instead checks
the whole DiT once, against its clean fingerprint, when the request ends. Either way a
non-deterministic delta or a damaged capture is caught instead of silently leaving drift.

Each pass is fused where torch allows it (``torch.add(delta, W, out=W')`` computes in float32
and rounds once into bfloat16) because a merge is memory-bound: the floor is one read and one
write of ``W``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import LoRAValueError, ResidencyError
from ..faults import FaultInjector
from .fingerprint import Digest, tensor_digest
from .overlap import keep_for_stream

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


class RecomputeRestore(_TorchStrategy):
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


class CopyRestore(_TorchStrategy):
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


class RestoreStrategy(Protocol):
    name: str

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None: ...
    def merge(self, frame: MergeFrame, target: LayerTarget, digest: Digest | None) -> LayerUndo: ...
    def write(self, target: LayerTarget, undo: LayerUndo) -> None: ...
    def flush(self, frame: MergeFrame) -> None: ...
    def finish(self, frame: MergeFrame) -> None: ...
    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None: ...


def _fused() -> RestoreStrategy:
    from .fused import FusedRestore  # Triton is optional: imported when asked for

    return FusedRestore()


RESTORE_STRATEGIES: Mapping[str, Callable[[], RestoreStrategy]] = {
    "recompute": RecomputeRestore,
    "copy": CopyRestore,
    "copy_host": lambda: CopyRestore("cpu"),
    "fused": _fused,
}


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


@contextlib.contextmanager
def _reported(frame: MergeFrame) -> Iterator[None]:
    """A non-finite merge surfaces as the user's error: the LoRA, its strength, the layer."""
    try:
        yield
    except NonFiniteMergeError as exc:
        raise LoRAValueError(
            f"merging LoRA {frame.lora!r} at strength {frame.strength} into {exc.layer!r} gives "
            "non-finite weights; lower the strength or check the LoRA"
        ) from None


class MergeStack:
    """Merged deltas on the shared weights, undone last-in-first-out (like PEFT's LoraLayer)."""

    def __init__(self, strategy: RestoreStrategy, faults: FaultInjector,
                 check_layers: bool = False) -> None:
        self.strategy = strategy
        self.faults = faults
        self.check_layers = check_layers
        self.frames: list[MergeFrame] = []
        self.last_exception_fraction = 0.0

    def __bool__(self) -> bool:
        return bool(self.frames)

    @property
    def nbytes_held(self) -> int:
        return sum(f.nbytes_held for f in self.frames)

    def push(self, lora: str, targets: list[LayerTarget], strength: float) -> int:
        """Merge one LoRA into every target layer; returns weight bytes written.

        Each layer is computed, checked finite and captured before its single write, and
        recorded right after it: a failure at any point leaves a stack that undoes exactly
        what was written.
        """
        frame = self.open(lora, targets, strength)
        self.merge_layers(frame, targets)
        return self.close(frame)

    def open(self, lora: str, targets: list[LayerTarget], strength: float) -> MergeFrame:
        """Start merging one LoRA into ``targets``; :meth:`merge_layers` then takes them in this
        order, in one call (:meth:`push`) or group by group, and :meth:`close` ends the frame."""
        frame = MergeFrame(lora, strength)
        self.frames.append(frame)
        with torch.no_grad():
            self.strategy.begin(frame, targets)
        return frame

    def check(self, frame: MergeFrame) -> bool:
        """Take ``frame``'s undo records now, before any of its layers is written, where the
        strategy can (``fused``: one launch, asynchronous, the weights only read); its launches
        then only write. Returns whether it did."""
        check = getattr(self.strategy, "check", None)
        if check is None or frame.layers:
            return False
        with torch.no_grad(), _reported(frame):
            check(frame)
        return True

    def merge_layers(self, frame: MergeFrame, targets: list[LayerTarget], launch: bool = False) -> None:
        """Merge the next ``targets`` of ``frame``. A batched strategy writes them at
        :meth:`close` unless ``launch`` asks for them now (asynchronously, on the current stream)."""
        with torch.no_grad(), _reported(frame):
            for target in targets:
                self.faults.hit("merge.layer")
                digest = tensor_digest(target.weight.detach()) if self.check_layers else None
                undo = self.strategy.merge(frame, target, digest)
                frame.layers.append((target, undo))  # recorded before the layer's first byte changes
                self.strategy.write(target, undo)
                self.faults.hit("merge.layer.written")
            if launch:
                self.strategy.flush(frame)

    def close(self, frame: MergeFrame) -> int:
        """End ``frame``: every layer written and checked; returns weight bytes written."""
        with torch.no_grad(), _reported(frame):
            self.strategy.finish(frame)
        weights = [t.weight for t, _ in frame.layers]
        elements = sum(w.numel() for w in weights)
        exceptions = sum(u.exceptions for _, u in frame.layers)
        self.last_exception_fraction = exceptions / elements if elements else 0.0
        return sum(w.numel() * w.element_size() for w in weights)

    def pop_all(self, side_stream: bool = False) -> int:
        """Undo every frame, newest first, each layer checked; returns weight bytes written.

        A batched strategy (``fused``) undoes the layers of a frame together; the per-layer fault
        point still fires layer by layer, and the layers passed before a fault are undone first.
        ``side_stream``: the undo is queued on a side stream (the current one) while the pops free
        what it reads, so that memory is marked for the stream first; a strategy that marks its own
        (fused: a few pooled tensors, not 3 views a layer) says so with ``keeps_for_stream``.
        """
        if side_stream and not getattr(self.strategy, "keeps_for_stream", False):
            keep_for_stream([t for frame in self.frames for _, undo in frame.layers for t in undo.tensors])
        written = 0
        batched = getattr(self.strategy, "batched", False) and not self.check_layers
        with torch.no_grad():
            while self.frames:
                frame = self.frames[-1]
                if batched and self.faults.hit_many("restore.layer", len(frame.layers)):
                    # no fault armed per layer: the frame in one batch, with no per-layer Python
                    # (at 1344 layers that is most of an overlapped restore's critical path)
                    written += self._undo_frame(frame)
                    self.frames.pop()
                    continue
                batch: list[tuple[LayerTarget, LayerUndo]] = []
                try:
                    for target, undo in reversed(list(frame.layers)):
                        self.faults.hit("restore.layer")
                        batch.append((target, undo))
                        if not batched:
                            todo, batch = batch, []  # emptied first: a failing undo is not run twice
                            written += self._undo(frame, todo)
                finally:
                    if batch:
                        todo, batch = batch, []
                        written += self._undo(frame, todo)
                self.frames.pop()
        return written

    def _undo_frame(self, frame: MergeFrame) -> int:
        """Undo all of ``frame`` with a batched strategy (no per-layer checks)."""
        self.strategy.undo_batch(frame.layers[::-1], frame.strength)  # type: ignore[attr-defined]
        written = sum(t.weight.numel() * t.weight.element_size() for t, _ in frame.layers)
        frame.layers.clear()
        return written

    def _undo(self, frame: MergeFrame, batch: list[tuple[LayerTarget, LayerUndo]]) -> int:
        """Undo ``batch`` (the newest layers of ``frame``, newest first), check, then pop them."""
        undo_batch = getattr(self.strategy, "undo_batch", None)
        if undo_batch is not None:
            undo_batch(batch, frame.strength)
        else:
            for target, undo in batch:
                if undo.written(target.weight):  # an interrupted merge may not have landed
                    self.strategy.undo(target, undo, frame.strength)
                self.faults.hit("restore.layer.written")
        written = 0
        for target, undo in batch:
            if undo.digest is not None and tensor_digest(target.weight) != undo.digest:
                raise RestoreMismatchError(
                    f"undoing LoRA {frame.lora!r} on {target.name!r} did not give back the "
                    f"pre-merge bits (restore strategy {self.strategy.name!r})"
                )
            frame.layers.pop()
            written += target.weight.numel() * target.weight.element_size()
        return written

    def forget(self) -> None:
        """Drop every capture without undoing (after a repair rewrote the weights)."""
        self.frames.clear()


def choose_restore(name: str, weights: Iterable[torch.Tensor]) -> str:
    """Resolve ``"auto"``; refuse ``"fused"`` where its kernels cannot run."""
    from ..errors import ConfigError
    from . import kernels

    ws = list(weights)
    fused_ok = bool(ws) and all(w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() for w in ws) and \
        kernels.available(ws[0].device)
    if name == "auto":
        return "fused" if fused_ok and ws[0].device.type == "cuda" else "recompute"
    if name == "fused" and not fused_ok:
        raise ConfigError("restore='fused' needs Triton and contiguous 2-D bfloat16 weights on a CUDA device "
                          "(or TRITON_INTERPRET=1); use restore='recompute'")
    return name
