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
from .side_stream import keep_for_stream
from .undo import LayerTarget, LayerUndo, MergeFrame, NonFiniteMergeError

# Records reserved per element at a LoRA's first merge: enough at the delta norms measured in
# docs/results/measured_constants.md#undo-record-reserve (tiles that find no room are merged again).
FIRST_GUESS = 0.125
MIN_REGION = 256


@dataclass
class _Frame:
    """One LoRA's launch: the layers registered, the plan, the flags and the packed records."""

    strength: float
    targets: list[LayerTarget] = field(default_factory=list)
    undos: list[LayerUndo] = field(default_factory=list)
    factors: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    plan: kernels.Plan | None = None  # set by the first launch: from then on an undo has something to undo
    full: kernels.Plan | None = None  # every target of the frame, planned at begin()
    planned: list[LayerTarget] = field(default_factory=list)  # the plan's order: merge() must follow it
    parts: dict[Any, kernels.Plan] = field(default_factory=dict)  # plans of parts launched alone (cached)
    launched: int = 0  # layers launched so far (in target order)
    caps: list[int] = field(default_factory=list)
    flags: torch.Tensor | None = None
    idx: torch.Tensor | None = None
    val: torch.Tensor | None = None
    rec_start: torch.Tensor | None = None
    count: torch.Tensor | None = None
    counters: torch.Tensor | None = None
    capacity: torch.Tensor | None = None
    host_count: list[int] | None = None
    everyone: torch.Tensor | None = None  # all layers active: the usual undo, made at merge (no H2D copy then)
    host_start: list[int] | None = None
    streams: set[int] = field(default_factory=set)  # side streams the pools were marked for
    checked: bool = False  # record_ahead() ran: launches write the checked tiles (records already taken)

    def pools(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
        """What a launch reads and writes, made by ``begin()``: tile flags, per-layer counters,
        record counts, region starts and capacities, the all-layers mask, record indices and values."""
        pools = (self.flags, self.counters, self.count, self.rec_start, self.capacity, self.everyone, self.idx,
                 self.val)
        assert all(t is not None for t in pools), "begin() first"
        return pools  # type: ignore[return-value]

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

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        state, i = self.handle  # type: ignore[misc]
        return state.views(i)


def _exclusive_cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        out.append(total)
        total += v
    return out


class FusedExactMerge:
    name = "fused"
    batched = True
    keeps_for_stream = True  # undo_batch marks its pooled tensors for an overlapped undo's stream

    def __init__(self) -> None:
        # (LoRA, strength) -> records per layer name (a frame may order its layers either way:
        # a merge ahead plans them block by block in the order the model declares its blocks)
        self._known: dict[tuple[str, float], dict[str, int]] = {}
        # per layer: the factors as the kernel reads them, valid while the adapter tensors are the
        # same objects at the same version on the weight's device; per (LoRA, strength): the launch
        # tables, valid while every address is the same (per-layer Python was most of a merge)
        self._factor_cache: dict[str, tuple[Any, ...]] = {}
        # per frame layout: the addresses and scales it was planned for, its plan, and its parts' plans
        self._plans: dict[tuple[str, float, int], tuple[tuple[float, ...], kernels.Plan, dict[Any, kernels.Plan]]] = {}
        # per frame layout: record regions as the device reads them, kept while the sizes are the same
        # (a host list to a device tensor waits for the stream: at a merge ahead, for stage 1's work)
        self._regions: dict[tuple[str, float, int], tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    def _factors(self, target: LayerTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-padded factors of ``target`` on its weight's device, checked once for the kernels."""
        w = target.weight
        key = (target.lora_A, target.lora_B, target.lora_A._version, target.lora_B._version, w.data_ptr(), w.dtype)
        hit = self._factor_cache.get(target.name)
        if hit is not None and hit[0] is key[0] and hit[1] is key[1] and hit[2:6] == key[2:]:
            return hit[-1]  # type: ignore[no-any-return]
        b, a = kernels.pad_rank(target.lora_B.detach().to(device=w.device, dtype=w.dtype).contiguous(),
                                target.lora_A.detach().to(device=w.device, dtype=w.dtype).contiguous())
        if not kernels.supports(w.detach(), a, b):
            raise TypeError(f"the fused restore needs contiguous 2-D bfloat16 weights and factors; "
                            f"{target.name!r} is {tuple(w.shape)} {w.dtype}; use exact_kernel='recompute'")
        self._factor_cache[target.name] = (*key, (b, a))
        return b, a

    def _plan(self, key: tuple[str, float, int], frame: MergeFrame, targets: list[LayerTarget],
              factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[kernels.Plan, dict[Any, kernels.Plan]]:
        """The launch tables of a frame's layers, and a cache for its parts' (see :meth:`flush`),
        kept while every address is the same."""
        weights = [t.weight.detach() for t in targets]
        # the scales too: a LoRA slot takes another LoRA (another alpha/rank) in the same tensors
        scales = [frame.strength * t.scale for t in targets]
        addresses = (*(t.data_ptr() for w, (b, a) in zip(weights, factors, strict=True) for t in (w, b, a)), *scales)
        hit = self._plans.get(key)
        if hit is not None and hit[0] == addresses:
            return hit[1], hit[2]
        p = kernels.plan(weights, factors, scales)
        self._plans[key] = (addresses, p, {})
        return p, self._plans[key][2]

    def _region_tables(self, key: tuple[str, float, int], caps: list[int],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's first record slot and its capacity, as device tensors."""
        hit = self._regions.get(key)
        if hit is None or hit[0] != caps:
            starts = _exclusive_cumsum(caps)
            hit = self._regions[key] = (list(caps), torch.tensor(starts, dtype=torch.int64, device=device),
                                        torch.tensor(caps, dtype=torch.int64, device=device))
        return hit[1], hit[2]

    def begin(self, frame: MergeFrame, targets: list[LayerTarget]) -> None:
        """Check every target, plan the whole LoRA and size its record pools; nothing is written."""
        state = frame.state = _Frame(frame.strength)
        if not targets:
            return
        state.factors = [self._factors(t) for t in targets]
        state.planned = list(targets)
        key = (frame.lora, frame.strength, hash(tuple(t.name for t in targets)))
        full, state.parts = self._plan(key, frame, targets, state.factors)
        state.full = full
        device, n = targets[0].weight.device, full.layers
        known = self._known.get((frame.lora, frame.strength), {})
        caps = state.caps = [c if (c := known.get(t.name)) is not None else
                             max(MIN_REGION, int(t.weight.numel() * FIRST_GUESS)) for t in targets]
        state.flags = torch.zeros(full.tiles, dtype=torch.int8, device=device)
        state.everyone = torch.ones(n, dtype=torch.int8, device=device)
        state.counters, state.count = (torch.zeros(n, dtype=torch.int64, device=device) for _ in range(2))
        state.host_start = _exclusive_cumsum(caps)
        state.idx = torch.empty(sum(caps), dtype=torch.int32, device=device)
        state.val = torch.empty(sum(caps), dtype=torch.int16, device=device)
        state.rec_start, state.capacity = self._region_tables(key, caps, device)  # read-only for the kernels

    def merge(self, frame: MergeFrame, target: LayerTarget, digest: Digest | None) -> LayerUndo:
        state = frame.state
        assert isinstance(state, _Frame) and state.full is not None, "begin() first"
        i = len(state.targets)
        if i >= len(state.planned) or state.planned[i] is not target:
            # a layer's tiles, flags and records sit where begin() planned it: another order would
            # launch one layer's tiles with another's records
            raise RuntimeError(f"fused merge: {target.name!r} registered out of the order begin() planned")
        undo = _FusedUndo(digest, handle=(state, i))
        state.targets.append(target)
        state.undos.append(undo)
        return undo  # written by flush() or finish(): a failure before leaves every weight untouched

    def write(self, target: LayerTarget, undo: LayerUndo) -> None:
        """Nothing per layer: :meth:`flush` and :meth:`finish` launch the registered layers, each
        tile's flag recorded by the kernel with its write."""

    def flush(self, frame: MergeFrame) -> None:
        """Launch the layers registered since the last launch (asynchronous, current stream)."""
        state = frame.state
        assert isinstance(state, _Frame)
        lo, hi = state.launched, len(state.targets)
        if hi == lo or state.full is None:
            return
        flags, counters, count, rec_start, capacity, everyone, idx, val = state.pools()
        full = state.full
        p = full if (lo, hi) == (0, full.layers) else state.parts.get((lo, hi))
        if p is None:  # a part's tiles are that slice of the frame's tiles: its flags and counters are slices
            p = state.parts[(lo, hi)] = kernels.plan([t.weight.detach() for t in state.targets[lo:hi]],
                                                     state.factors[lo:hi],
                                                     [frame.strength * t.scale for t in state.targets[lo:hi]])
        t0, t1 = full.tile_offsets[lo], full.tile_offsets[hi]
        self._mark_for_stream(state, p)
        state.plan = full
        state.launched = hi
        kernels.lora_tiles(kernels.WRITE if state.checked else kernels.MERGE, p, everyone[lo:hi], flags[t0:t1],
                           counters[lo:hi], count[lo:hi], rec_start[lo:hi], capacity[lo:hi], idx, val)

    def record_ahead(self, frame: MergeFrame) -> bool:
        """Take the whole frame's records now, writing no weight (asynchronous, current stream):
        a merge ahead checks while the weights still serve the phase before, so that what is
        left for the last call's gaps is the write, half the merge's work. Before any layer is
        registered; the tiles' flags then say which tiles the launches of :meth:`flush` write."""
        state = frame.state
        assert isinstance(state, _Frame) and not state.targets, "record_ahead() right after begin()"
        p = state.full
        if p is None:
            return True  # nothing to merge: nothing to record
        flags, counters, count, rec_start, capacity, everyone, idx, val = state.pools()
        self._mark_for_stream(state, p)
        state.checked = True
        kernels.lora_tiles(kernels.CHECK, p, everyone, flags, counters, count, rec_start, capacity, idx, val)
        return True

    @staticmethod
    def _mark_for_stream(state: _Frame, p: kernels.Plan) -> None:
        pools = state.pools()
        stream = torch.cuda.current_stream(pools[0].device).cuda_stream if pools[0].is_cuda else 0
        if stream not in state.streams:
            # launched on a side stream (a merge ahead): the pools made on the caller's stream
            # must outlive this stream's use of them, whichever stream frees them
            state.streams.add(stream)
            keep_for_stream([*pools, *p.tables, p.tile_layer, p.tile_local])

    def finish(self, frame: MergeFrame) -> None:
        state = frame.state
        assert isinstance(state, _Frame)
        if not state.targets:
            return
        try:
            self.flush(frame)
            self._settle(frame, state)
        finally:
            # each LayerUndo holds its frame state: dropping the reverse references leaves no cycle,
            # so a popped frame's records (GiBs at real shapes) are freed at once, not by the GC
            state.undos = []

    def _settle(self, frame: MergeFrame, state: _Frame) -> None:
        """The one sync of a merge: non-finite tiles, tiles without room, records per layer; then
        the tiles without room merged into a second pool and the records packed."""
        p = state.full
        assert p is not None and state.flags is not None and state.count is not None
        assert state.counters is not None and state.idx is not None and state.val is not None
        device, n, caps = state.flags.device, p.layers, state.caps
        idx, val, valid, starts = state.idx, state.val, state.count, state.host_start
        assert starts is not None
        summary = torch.cat([torch.stack([(state.flags == kernels.TILE_NON_FINITE).any(),
                                          (state.flags == kernels.TILE_NO_ROOM).any()]).to(torch.int64),
                             valid, state.counters]).tolist()
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
            kernels.lora_tiles(kernels.MERGE, p,
                               torch.tensor([1 if s else 0 for s in short], dtype=torch.int8, device=device),
                               state.flags, torch.zeros(n, dtype=torch.int64, device=device), valid2,
                               torch.tensor(starts2, dtype=torch.int64, device=device),
                               torch.tensor(short, dtype=torch.int64, device=device), idx2, val2)
            for i, extra in enumerate(valid2.tolist()):
                parts[i].append((starts2[i], extra))
            pools.append((idx2, val2))
        counts = [sum(c for _, c in layer_parts) for layer_parts in parts]
        self._known[(frame.lora, frame.strength)] = {t.name: c for t, c in zip(state.targets, counts, strict=True)}
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
        kernels.lora_tiles(kernels.UNDO, p, active, state.flags, none, none, state.rec_start, none, state.idx,
                           state.val)
        if state.host_count is None:  # finish() raised after its launch: the records as they fell
            state.host_count = [int(c) for c in state.count.tolist()]
        most = max((state.host_count[i] for i, c in enumerate(chosen) if c), default=0)
        kernels.scatter(p, active, state.rec_start, state.count, most, state.idx, state.val)
        # on an overlapped undo's side stream, what the two launches read and the pop frees must
        # outlive them (the factors and the launch tables are cached: they are not freed here)
        keep_for_stream([state.flags, state.idx, state.val, state.rec_start, state.count, active, none])
