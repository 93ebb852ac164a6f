"""The ``fused`` restore strategy: the exact merge and undo of ``recompute``, each one Triton
launch for all the layers of a LoRA (see :mod:`.kernels`), with one host sync per merge.

``merge`` only registers a layer; ``finish`` launches the whole LoRA. A layer's undo record is
its tiles' flags plus its region of a pool of (flat index, original bits) records. Each layer's
region is sized from the last merge of the same LoRA at the same strength (the counts are
deterministic), or from an estimate the first time; tiles that find no room are left unmerged,
merged again into a second pool once the sync shows them, and the records are then packed so no
slack is held while the LoRA stays merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import kernels
from .fingerprint import Digest
from .merge import LayerTarget, LayerUndo, MergeFrame, NonFiniteMergeError
from .overlap import keep_for_stream

FIRST_GUESS = 0.125  # of the elements: 7.7 % need a record at ‖ΔW‖ = 10 % of ‖W‖, 12.5 % at 20 %
MIN_REGION = 256


@dataclass
class _Frame:
    """One LoRA's launch: the layers registered, the plan, the flags and the packed records."""

    strength: float
    targets: list[LayerTarget] = field(default_factory=list)
    undos: list[LayerUndo] = field(default_factory=list)
    factors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    plan: kernels.Plan | None = None
    flags: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    val: torch.Tensor | None = None
    rec_start: torch.Tensor | None = None
    count: torch.Tensor | None = None
    host_count: list[int] | None = None
    everyone: torch.Tensor | None = None  # all layers active: the usual undo, made at merge (no H2D copy then)
    host_start: list[int] | None = None

    def views(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer ``i``'s tile flags, record indices and record values (views into the pools)."""
        if self.plan is None or self.flags is None or self.idx is None or self.val is None:
            return ()
        lo, hi = self.plan.tile_offsets[i], self.plan.tile_offsets[i + 1]
        if self.host_count is None or self.host_start is None:
            return (self.flags[lo:hi],)
        start, count = self.host_start[i], self.host_count[i]
        return self.flags[lo:hi], self.idx[start:start + count], self.val[start:start + count]


class _FusedUndo(LayerUndo):
    """A layer's undo record as views into its LoRA's pools, made when asked for (``memory()``,
    tests): making and freeing three views per layer at 1344 layers was most of the critical
    path of an overlapped restore."""

    @property  # type: ignore[override]
    def tensors(self) -> tuple[torch.Tensor, ...]:
        state, i = self.handle  # type: ignore[misc]
        return state.views(i)

    @tensors.setter
    def tensors(self, value: tuple[torch.Tensor, ...]) -> None:
        pass  # the views are derived; the dataclass constructor's empty tuple is dropped


def _exclusive_cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out


class FusedRestore:
    name = "fused"
    batched = True
    keeps_for_stream = True  # undo_batch marks its pooled tensors for an overlapped undo's stream

    def __init__(self) -> None:
        self._known: dict[tuple[str, float], list[int]] = {}  # (LoRA, strength) -> records per layer
        self._frame: _Frame | None = None
        # per layer: the factors as the kernel reads them, valid while the adapter tensors are the
        # same objects at the same version on the weight's device; per (LoRA, strength): the launch
        # tables, valid while every address is the same (per-layer Python was most of a merge)
        self._factor_cache: dict[str, tuple[Any, ...]] = {}
        self._plans: dict[tuple[str, float], tuple[tuple[int, ...], kernels.Plan]] = {}

    def _factors(self, target: LayerTarget) -> tuple[torch.Tensor, torch.Tensor]:
        w = target.weight
        key = (target.lora_A, target.lora_B, target.lora_A._version, target.lora_B._version, w.device, w.dtype)
        hit = self._factor_cache.get(target.name)
        if hit is not None and hit[0] is key[0] and hit[1] is key[1] and hit[2:6] == key[2:]:
            return hit[-1]  # type: ignore[no-any-return]
        factors = kernels.pad_rank(target.lora_B.detach().to(device=w.device, dtype=w.dtype).contiguous(),
                                   target.lora_A.detach().to(device=w.device, dtype=w.dtype).contiguous())
        self._factor_cache[target.name] = (*key, factors)
        return factors

    def _plan(self, frame: MergeFrame, state: _Frame, weights: list[torch.Tensor]) -> kernels.Plan:
        addresses = tuple(t.data_ptr() for w, (b, a) in zip(weights, state.factors, strict=True) for t in (w, b, a))
        hit = self._plans.get((frame.lora, frame.strength))
        if hit is not None and hit[0] == addresses:
            return hit[1]
        p = kernels.plan(weights, state.factors, [frame.strength * t.scale for t in state.targets])
        self._plans[(frame.lora, frame.strength)] = (addresses, p)
        return p

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None:
        self._frame = _Frame(frame.strength)

    def merge(self, target: LayerTarget, strength: float, digest: Digest | None) -> LayerUndo:
        w = target.weight.detach()
        b, a = self._factors(target)
        if not kernels.supports(w, a, b):
            raise TypeError(f"the fused restore needs contiguous 2-D bfloat16 weights and factors; "
                            f"{target.name!r} is {tuple(w.shape)} {w.dtype}; use restore='recompute'")
        state = self._frame
        assert state is not None, "begin() first"
        undo = _FusedUndo(digest, handle=(state, len(state.targets)))
        state.targets.append(target)
        state.undos.append(undo)
        state.factors.append((b, a))
        return undo  # written by finish(): a failure before it leaves every weight untouched

    def finish(self, frame: MergeFrame) -> None:
        state, self._frame = self._frame, None
        if state is None or not state.targets:
            return
        try:
            self._launch(frame, state)
        finally:
            # each LayerUndo holds its frame state: dropping the reverse references leaves no cycle,
            # so a popped frame's records (GiBs at real shapes) are freed at once, not by the GC
            state.undos = []

    def _launch(self, frame: MergeFrame, state: _Frame) -> None:
        weights = [t.weight.detach() for t in state.targets]
        device = weights[0].device
        p = self._plan(frame, state, weights)
        n = p.layers
        caps = self._known.get((frame.lora, frame.strength)) or [
            max(MIN_REGION, int(w.numel() * FIRST_GUESS)) for w in weights]
        state.flags = torch.zeros(p.tiles, dtype=torch.int8, device=device)
        everyone = state.everyone = torch.ones(n, dtype=torch.int8, device=device)
        counters, valid = (torch.zeros(n, dtype=torch.int64, device=device) for _ in range(2))
        starts = _exclusive_cumsum(caps)
        idx = torch.empty(sum(caps), dtype=torch.int32, device=device)
        val = torch.empty(sum(caps), dtype=torch.int16, device=device)
        rec_start = torch.tensor(starts, dtype=torch.int64, device=device)
        state.idx, state.val, state.rec_start, state.count = idx, val, rec_start, valid
        capacity = torch.tensor(caps, dtype=torch.int64, device=device)
        state.plan = p  # from here on an undo has something to undo
        kernels.lora_tiles(0, p, everyone, state.flags, counters, valid, rec_start, capacity, idx, val)
        # the one sync of the merge: non-finite tiles, tiles without room, records per layer
        summary = torch.cat([torch.stack([(state.flags == kernels.TILE_NON_FINITE).any(),
                                          (state.flags == kernels.TILE_NO_ROOM).any()]).to(torch.int64),
                             valid, counters]).tolist()
        non_finite, no_room = summary[:2]
        got, asked = summary[2:2 + n], summary[2 + n:]
        if non_finite:
            bad = int(p.tile_layer[state.flags == kernels.TILE_NON_FINITE].min())
            raise NonFiniteMergeError(state.targets[bad].name)
        parts = [[(start, count)] for start, count in zip(starts, got, strict=True)]
        pools = [(idx, val)]
        if no_room:
            short = [int(asked[i]) if got[i] < asked[i] else 0 for i in range(n)]
            starts2 = _exclusive_cumsum(short)
            idx2 = torch.empty(max(1, sum(short)), dtype=torch.int32, device=device)
            val2 = torch.empty(max(1, sum(short)), dtype=torch.int16, device=device)
            valid2 = torch.zeros(n, dtype=torch.int64, device=device)
            kernels.lora_tiles(0, p, torch.tensor([1 if s else 0 for s in short], dtype=torch.int8, device=device),
                               state.flags, torch.zeros(n, dtype=torch.int64, device=device), valid2,
                               torch.tensor(starts2, dtype=torch.int64, device=device),
                               torch.tensor(short, dtype=torch.int64, device=device), idx2, val2)
            for i, extra in enumerate(valid2.tolist()):
                parts[i].append((starts2[i], extra))
            pools.append((idx2, val2))
        counts = [sum(c for _, c in layer_parts) for layer_parts in parts]
        self._known[(frame.lora, frame.strength)] = counts
        if not no_room and counts == caps:
            packed = (idx, val)  # sized exactly from the last merge: nothing to pack
        else:  # pack every layer's records into one pool of exactly the records kept
            pieces = [(pools[j][0][s:s + c], pools[j][1][s:s + c]) for layer_parts in parts
                      for j, (s, c) in enumerate(layer_parts) if c]
            packed = (torch.cat([i for i, _ in pieces]) if pieces else idx[:0],
                      torch.cat([v for _, v in pieces]) if pieces else val[:0])
            starts = _exclusive_cumsum(counts)
            state.rec_start = torch.tensor(starts, dtype=torch.int64, device=device)
            state.count = torch.tensor(counts, dtype=torch.int64, device=device)
        state.idx, state.val = packed
        state.host_count = counts
        state.host_start = starts
        for i, undo in enumerate(state.undos):
            undo.exceptions = counts[i]

    def undo(self, target: LayerTarget, undo: LayerUndo, strength: float) -> None:
        self.undo_batch([(target, undo)], strength)

    def undo_batch(self, batch: list[tuple[LayerTarget, LayerUndo]], strength: float) -> None:
        """Undo these layers (all of one LoRA) with one restore launch and one scatter launch."""
        if not batch:
            return
        state = batch[0][1].handle[0]  # type: ignore[index]
        assert isinstance(state, _Frame)
        p = state.plan
        if p is None:
            return  # finish() never launched: nothing was written
        assert state.flags is not None and state.idx is not None and state.val is not None
        assert state.rec_start is not None and state.count is not None
        device = state.flags.device
        chosen = [0] * p.layers
        for _, undo in batch:
            chosen[undo.handle[1]] = 1  # type: ignore[index]
        if all(chosen) and state.everyone is not None:
            active = state.everyone
        else:  # part of a LoRA (a fault stopped the undo part way): a host-to-device copy
            active = torch.tensor(chosen, dtype=torch.int8, device=device)
        none = torch.zeros(p.layers, dtype=torch.int64, device=device)
        kernels.lora_tiles(1, p, active, state.flags, none, none, state.rec_start, none, state.idx, state.val)
        if state.host_count is None:  # finish() raised after its launch: the records as they fell
            state.host_count = [int(c) for c in state.count.tolist()]
        most = max((state.host_count[i] for i, c in enumerate(chosen) if c), default=0)
        kernels.scatter(p, active, state.rec_start, state.count, most, state.idx, state.val)
        # on an overlapped undo's side stream, what the two launches read and the pop frees must
        # outlive them (the factors and the launch tables are cached: they are not freed here)
        keep_for_stream([state.flags, state.idx, state.val, state.rec_start, state.count, active, none])
