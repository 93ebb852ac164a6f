"""The ``fused`` restore strategy: the exact merge and undo of ``recompute``, each one Triton
kernel per layer (see :mod:`.kernels`), launched back to back with one host sync per LoRA.

A layer's undo record is its tile flags plus its slice of a pool of (flat index, original bits)
records shared by the frame. The pool is sized from the last merge of the same LoRA at the same
strength (the count is deterministic), or from an estimate the first time, then trimmed to what
was used; tiles that found no room are left unmerged and merged into a second pool after the
sync shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kernels
from .fingerprint import Digest
from .merge import LayerTarget, LayerUndo, MergeFrame, NonFiniteMergeError

FIRST_GUESS = 0.125  # of the elements: 7.7 % need a record at ‖ΔW‖ = 10 % of ‖W‖, 12.5 % at 20 %


@dataclass
class _Pool:
    """The records of one launch pass and, per layer, the reservation counter after it."""

    idx: torch.Tensor
    val: torch.Tensor
    counters: torch.Tensor  # int64 [reserved, valid end]
    ends: list[torch.Tensor] = field(default_factory=list)
    host_ends: list[int] | None = None

    @classmethod
    def new(cls, capacity: int, device: torch.device) -> _Pool:
        return cls(torch.empty(capacity, dtype=torch.int32, device=device),
                   torch.empty(capacity, dtype=torch.int16, device=device),
                   torch.zeros(2, dtype=torch.int64, device=device))

    def mark_end(self) -> int:
        self.ends.append(self.counters[:1].clone())
        return len(self.ends) - 1

    def segment(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.host_ends is None:  # one sync for the whole pass
            valid = int(self.counters[1])
            self.host_ends = [min(int(v), valid) for v in torch.cat(self.ends).tolist()]
        start = self.host_ends[i - 1] if i else 0
        end = max(start, self.host_ends[i])
        return self.idx[start:end], self.val[start:end]


@dataclass
class _Layer:
    flags: torch.Tensor
    parts: list[tuple[_Pool, int]]


class FusedRestore:
    name = "fused"

    def __init__(self) -> None:
        self._known: dict[tuple[str, float], int] = {}  # (LoRA, strength) -> records it needed
        self._pool: _Pool | None = None
        self._pending: list[tuple[LayerTarget, LayerUndo, _Layer]] = []

    @staticmethod
    def _factors(target: LayerTarget) -> tuple[torch.Tensor, torch.Tensor]:
        w = target.weight
        return (target.lora_B.detach().to(device=w.device, dtype=w.dtype).contiguous(),
                target.lora_A.detach().to(device=w.device, dtype=w.dtype).contiguous())

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None:
        elements = sum(t.weight.numel() for t in targets)
        capacity = self._known.get((frame.lora, frame.strength), max(1024, int(elements * FIRST_GUESS)))
        device = targets[0].weight.device if targets else torch.device("cpu")
        self._pool = _Pool.new(capacity, device)
        self._pending = []

    def merge(self, target: LayerTarget, strength: float, digest: Digest | None) -> LayerUndo:
        w = target.weight.detach()
        b, a = self._factors(target)
        if not kernels.supports(w, a, b):
            raise TypeError(f"the fused restore needs contiguous 2-D bfloat16 weights and factors; "
                            f"{target.name!r} is {tuple(w.shape)} {w.dtype}; use restore='recompute'")
        pool = self._pool
        assert pool is not None, "begin() first"
        rows, cols = kernels.tile_grid(w)
        flags = torch.zeros(rows * cols, dtype=torch.int8, device=w.device)
        kernels.lora_tiles(0, w, b, a, strength * target.scale, flags, pool.counters, pool.idx, pool.val)
        layer = _Layer(flags, [(pool, pool.mark_end())])
        undo = LayerUndo(digest, (flags,), handle=layer)
        self._pending.append((target, undo, layer))
        return undo

    def finish(self, frame: MergeFrame) -> None:
        """One sync for the frame: report a non-finite layer, merge the tiles that found no room
        into a pool sized by what the first pass asked for, and trim the records to size."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flags = torch.cat([layer.flags for _, _, layer in pending])
        non_finite, no_room = torch.stack([(flags == kernels.TILE_NON_FINITE).any(),
                                           (flags == kernels.TILE_NO_ROOM).any()]).tolist()
        if non_finite:
            first = next(t for t, _, layer in pending if bool((layer.flags == kernels.TILE_NON_FINITE).any()))
            raise NonFiniteMergeError(first.name)
        if no_room:
            asked = int(pending[0][2].parts[0][0].counters[0])
            retry = _Pool.new(max(1024, asked), flags.device)
            for target, _, layer in pending:
                if bool((layer.flags == kernels.TILE_NO_ROOM).any()):
                    b, a = self._factors(target)
                    kernels.lora_tiles(0, target.weight.detach(), b, a, frame.strength * target.scale, layer.flags,
                                       retry.counters, retry.idx, retry.val)
                    layer.parts.append((retry, retry.mark_end()))
        segments = [[pool.segment(i) for pool, i in layer.parts] for _, _, layer in pending]
        total = sum(idx.numel() for segs in segments for idx, _ in segs)
        self._known[(frame.lora, frame.strength)] = total
        pools = {id(pool): pool for _, _, layer in pending for pool, _ in layer.parts}
        if len(pools) == 1 and next(iter(pools.values())).idx.numel() == total:
            for _, undo, layer in pending:  # sized exactly (from the last merge): keep the pool as is
                idx, val = layer.parts[0][0].segment(layer.parts[0][1])
                undo.tensors = (layer.flags, idx, val)
                undo.exceptions = idx.numel()
            return
        # one pool of exactly the records kept: no slack from the first guess is held while merged
        idx_parts = [idx for segs in segments for idx, _ in segs]
        val_parts = [val for segs in segments for _, val in segs]
        trimmed = _Pool(torch.cat(idx_parts) if total else flags.new_empty(0, dtype=torch.int32),
                        torch.cat(val_parts) if total else flags.new_empty(0, dtype=torch.int16),
                        flags.new_zeros(2, dtype=torch.int64))
        end = 0
        trimmed.host_ends = []
        for (_, undo, layer), segs in zip(pending, segments, strict=True):
            end += sum(idx.numel() for idx, _ in segs)
            layer.parts = [(trimmed, len(trimmed.host_ends))]
            trimmed.host_ends.append(end)
            idx, val = trimmed.segment(len(trimmed.host_ends) - 1)
            undo.tensors = (layer.flags, idx, val)
            undo.exceptions = idx.numel()

    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None:
        layer = undo.handle
        assert isinstance(layer, _Layer)
        w = target.weight.detach()
        b, a = self._factors(target)
        none = torch.empty(0, dtype=torch.int32, device=w.device)
        kernels.lora_tiles(1, w, b, a, strength * target.scale, layer.flags,
                           torch.zeros(2, dtype=torch.int64, device=w.device), none, none.to(torch.int16))
        for pool, i in layer.parts:
            idx, val = pool.segment(i)
            kernels.scatter(w, idx, val)
