"""Merged LoRAs on the shared weights as a stack, undone exactly and last-in-first-out.

Each layer is merged by the chosen :class:`~.undo.ExactMerge` kernel, its undo recorded before its
single write; :meth:`MergeStack.pop_all` undoes the frames newest first. With ``check_layers=True``
every undo is checked against the layer's pre-merge digest (one more pass over the weights at merge
and at restore); by default the manager instead checks the whole DiT once, against its clean
fingerprint, when the request ends. Either way a non-deterministic delta or a damaged record is
caught instead of silently leaving drift.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import LoRAValueError
from ..faults import FaultInjector
from .fingerprint import tensor_digest
from .side_stream import keep_for_stream
from .undo import ExactMerge, LayerTarget, LayerUndo, MergeFrame, NonFiniteMergeError, RestoreMismatchError


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

    def __init__(self, strategy: ExactMerge, faults: FaultInjector,
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

    def record_ahead(self, frame: MergeFrame) -> bool:
        """Take ``frame``'s undo records now, before any of its layers is written, where the
        strategy can (``fused``: one launch, asynchronous, the weights only read); its launches
        then only write. Returns whether it did."""
        if frame.layers:
            return False
        with torch.no_grad(), _reported(frame):
            return self.strategy.record_ahead(frame)

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
        if side_stream and not self.strategy.keeps_for_stream:
            keep_for_stream([t for frame in self.frames for _, undo in frame.layers for t in undo.tensors])
        written = 0
        batched = self.strategy.batched and not self.check_layers
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
        self.strategy.undo_batch(frame.layers[::-1], frame.strength)
        written = sum(t.weight.numel() * t.weight.element_size() for t, _ in frame.layers)
        frame.layers.clear()
        return written

    def _undo(self, frame: MergeFrame, batch: list[tuple[LayerTarget, LayerUndo]]) -> int:
        """Undo ``batch`` (the newest layers of ``frame``, newest first), check, then pop them."""
        if self.strategy.batched:
            self.strategy.undo_batch(batch, frame.strength)
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
                    f"pre-merge bits (exact kernel {self.strategy.name!r})"
                )
            frame.layers.pop()
            written += target.weight.numel() * target.weight.element_size()
        return written

    def forget(self) -> None:
        """Drop every capture without undoing (after a repair rewrote the weights)."""
        self.frames.clear()
