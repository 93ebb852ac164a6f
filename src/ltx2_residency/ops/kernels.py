"""Triton kernels for the two memory-bound passes over the DiT: the exact merge/restore and the
fingerprint. Optional: without Triton (or off CUDA) the pure-torch paths in ``merge`` and
``fingerprint`` run instead; with ``TRITON_INTERPRET=1`` these kernels run on the CPU, which is
how CI checks them against the torch paths.

**Merge/restore.** One kernel, two modes, so both compute the delta with the same tiles in the
same order and therefore get the same float32 bits. Each program owns one ``BN x BK`` tile of
``W``: it accumulates ``B[tile rows] @ A[:, tile cols]`` over the rank in float32 on the tensor
cores, scales it, and then

- *merge*: writes ``W' = bf16(W + d)`` unless a value is non-finite, and records every position
  where the undo ``bf16(W' - d)`` will not give ``W`` back (flat index, original bits) into a
  shared pool, at slots reserved with one atomic per tile. A tile whose records do not fit in
  the pool, or whose merge is non-finite, is left unwritten and flagged; the host sees the flags
  after the whole LoRA is launched (one sync) and merges the rest into a bigger pool;
- *restore*: writes ``bf16(W' - d)`` for the tiles the merge wrote; the recorded originals are
  then scattered back.

The merge also comes in two halves, for a merge started ahead while the weights are still in
use: *check* is the merge without its write (records and flags, ``W`` untouched), and *write*
later writes ``bf16(W + d)`` for the checked tiles only. The write is the undo's cost (one GEMM
and one read and write of ``W``, no check, no records), about half the whole merge's.

Memory traffic is one read and one write of ``W`` plus 6 bytes per recorded position (7.7 % of
the elements at ‖ΔW‖ = 10 % of ‖W‖): the floor of an in-place merge, with the delta's FLOPs
hidden under it.

**Fingerprint.** One launch for any number of tensors: a table of base pointers and one program
per 2^15-word block; each writes its block's three partial sums, summed per tensor on the device.
The integer sums are exact, so the digests equal ``fingerprint.tensor_digest``'s bit for bit.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CHUNK = 1 << 15  # must equal fingerprint._CHUNK: the digests are the same function
ALIGN = 16  # bytes: the unit of the kernels' address offsets
TILE_NOT_RUN, TILE_MERGED, TILE_NON_FINITE, TILE_NO_ROOM, TILE_CHECKED = 0, 1, 2, 3, 4
MERGE, UNDO, CHECK, WRITE = 0, 1, 2, 3  # lora_tiles' modes

_module: Any = None
_module_interprets = False


def available(device: torch.device) -> bool:
    """The kernels can run for tensors on ``device``: compiled on CUDA, or (tests) under Triton's
    interpreter when ``TRITON_INTERPRET=1`` was set before Triton was imported and
    ``LTX2_RESIDENCY_KERNELS=interpret`` opts in."""
    if importlib.util.find_spec("triton") is None or os.environ.get("LTX2_RESIDENCY_KERNELS") == "0":
        return False
    if _interpreting():
        return os.environ.get("LTX2_RESIDENCY_KERNELS") == "interpret"
    return device.type == "cuda"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _load() -> Any:
    """The kernel module, imported afresh when the interpreter setting changed since last time."""
    global _module, _module_interprets
    if _module is None or _module_interprets != _interpreting():
        import importlib

        from . import _triton  # imported here, not at the top: Triton is optional

        _module = importlib.reload(_triton) if _module is not None else _triton
        _module_interprets = _interpreting()
    return _module


# ---------------------------------------------------------------------------- merge / restore
def _tiles() -> tuple[int, int, int, int, int, int]:
    """(BN, BK, BR, warps, stages, early weight load); ``LTX2_FUSED_TILES`` overrides them for
    tuning runs (the sixth field optional)."""
    raw = os.environ.get("LTX2_FUSED_TILES", "128,64,64,4,3,1")
    bn, bk, br, warps, stages, *early = (int(x) for x in raw.split(","))
    return bn, bk, br, warps, stages, (early[0] if early else 0)


@dataclass
class Plan:
    """The device tables of one grouped launch: per layer its tensors' addresses (a base tensor
    plus offsets in 16-byte units), shape, rank and scale; per tile its layer and its index
    within the layer."""

    layers: int
    tiles: int
    tile_layer: torch.Tensor
    tile_local: torch.Tensor
    bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # W, B, A: the lowest address of each
    tables: tuple[torch.Tensor, ...]  # w, b, a offsets; rows, cols (in units), grid_k, scale, rank/16
    unit: int  # elements per offset unit: 8 (16 bytes) when every address and row allows, else 1
    max_rank: int
    tile_offsets: list[int]


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % ALIGN == 0


def _based(tensors: Sequence[torch.Tensor], unit_bytes: int) -> tuple[torch.Tensor, list[int]]:
    """The lowest-addressed tensor and every tensor's distance from it in ``unit_bytes``."""
    base = min(tensors, key=lambda t: t.data_ptr())
    return base, [(t.data_ptr() - base.data_ptr()) // unit_bytes for t in tensors]


def pad_rank(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the rank to a multiple of 16 (aligned rows of ``B``; the products of the zeros
    add exact zeros, so the delta's bits do not change)."""
    r = a.shape[0]
    pad = -r % 16
    if not pad:
        return b, a
    return (torch.nn.functional.pad(b, (0, pad)).contiguous(),
            torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous())


def plan(weights: Sequence[torch.Tensor], factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
         scales: Sequence[float]) -> Plan:
    """Tables for ``weights`` (see :func:`supports`) with rank-padded ``(B, A)`` factors."""
    bn, bk, *_ = _tiles()
    device = weights[0].device
    shapes = [tuple(w.shape) for w in weights]
    grid_k = [(c + bk - 1) // bk for _, c in shapes]
    counts = [((r + bn - 1) // bn) * gk for (r, _), gk in zip(shapes, grid_k, strict=True)]
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    ranks = [a.shape[0] for _, a in factors]
    assert all(r % 16 == 0 for r in ranks), "pad_rank() the factors first"

    def table(values: Sequence[int | float], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=dtype, device=device)

    counts_t = table(counts, torch.int64)
    tile_layer = torch.repeat_interleave(torch.arange(len(weights), device=device), counts_t)
    tile_local = torch.arange(offsets[-1], device=device) - table(offsets[:-1], torch.int64)[tile_layer]
    groups = (weights, [b for b, _ in factors], [a for _, a in factors])
    wide = all(aligned(t) for ts in groups for t in ts) and all(c % 8 == 0 for _, c in shapes)
    unit = ALIGN // 2 if wide else 1  # elements (bf16)
    (wb, wo), (bb, bo), (ab, ao) = (_based(ts, unit * 2) for ts in groups)  # bf16: 2 bytes
    tables = (table(wo, torch.int64), table(bo, torch.int64), table(ao, torch.int64),
              table([r for r, _ in shapes], torch.int32), table([c // unit for _, c in shapes], torch.int32),
              table(grid_k, torch.int32), table(scales, torch.float32), table([r // 16 for r in ranks], torch.int32))
    return Plan(len(weights), offsets[-1], tile_layer.to(torch.int32), tile_local.to(torch.int32), (wb, bb, ab),
                tables, unit, max(ranks), offsets)


def supports(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """The fused path takes contiguous 2-D bfloat16 weights with bfloat16 factors (fastest when
    16-byte aligned with rows a multiple of 8 elements wide, as LTX-2's are)."""
    return (weight.dim() == 2 and weight.is_contiguous() and weight.dtype == torch.bfloat16
            and lora_a.dtype == lora_b.dtype == weight.dtype and weight.numel() < 2**31)


def lora_tiles(mode: int, p: Plan, active: torch.Tensor, flags: torch.Tensor, counters: torch.Tensor,
               valid: torch.Tensor, rec_start: torch.Tensor, capacity: torch.Tensor, idx: torch.Tensor,
               val: torch.Tensor) -> None:
    """One launch over every tile of every layer: merge, undo, check or write (``mode``, see
    :data:`MERGE`) the layers whose ``active`` entry is set; asynchronous."""
    bn, bk, br, warps, stages, early = _tiles()
    br = min(br, max(16, 1 << (p.max_rank - 1).bit_length()))  # tl.dot needs >= 16; no wider than the rank
    _load().lora_tiles[(p.tiles,)](
        p.tile_layer, p.tile_local, *p.bases, *p.tables, active, flags, counters, valid, rec_start, capacity, idx,
        val, -1.0 if mode == UNDO else 1.0, UNIT=p.unit, RANK=p.max_rank, MODE=mode, F32_DOT=_interpreting(),
        BN=bn, BK=bk, BR=br, EARLY_W=bool(early), num_warps=warps, num_stages=stages)


def scatter(p: Plan, active: torch.Tensor, rec_start: torch.Tensor, count: torch.Tensor, max_count: int,
            idx: torch.Tensor, val: torch.Tensor) -> None:
    """Put the recorded original words of the ``active`` layers back, in one launch; asynchronous."""
    if max_count:
        block = 4096
        _load().scatter_records[(p.layers, (max_count + block - 1) // block)](
            p.bases[0], p.tables[0], active, rec_start, count, idx, val, UNIT=p.unit, BLOCK=block)


# ---------------------------------------------------------------------------- fingerprint
def digests(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """The three-sum digest of each tensor (contiguous, even byte count, one device), in one launch."""
    if not tensors:
        return []
    return [tuple(row) for row in launch_digests(tensors).tolist()]  # type: ignore[misc]


def launch_digests(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`digests` without the sync: an ``(n, 3)`` int64 device tensor, ready once the
    current stream reaches it."""
    layout = digest_layout(tensors)
    return launch_planned_digests(tensors[layout[0]], layout, len(tensors))


def launch_planned_digests(lowest: torch.Tensor, layout: tuple[Any, ...], count: int) -> torch.Tensor:
    """:func:`launch_digests` with the tables of :func:`digest_layout` (``lowest``: the tensor at
    the lowest address, the one the offsets count from)."""
    _, off_table, words_table, block_tensor, block_index, unit = layout
    base = lowest.reshape(-1).view(torch.int16)
    out = torch.empty(block_tensor.numel(), 3, dtype=torch.int64, device=base.device)
    # ROWS=4 with 4 warps read 2.5 TB/s on an H100 (the copy engine's rate); 8 warps halved it
    _load().digest_blocks[(block_tensor.numel(),)](base, off_table, words_table, block_tensor, block_index, out,
                                                   UNIT=unit, CHUNK_=CHUNK, COLS=1024, ROWS=4, num_warps=4)
    sums = torch.zeros(count, 3, dtype=torch.int64, device=base.device)
    sums.index_add_(0, block_tensor, out)
    return sums


def digest_layout(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """The digest kernel's block tables over ``tensors``: (index of the lowest-addressed tensor,
    per-tensor offsets and word counts, per-block tensor (int32) and block index, address unit).
    Building them costs a third of the kernel at 1344 layers: a caller that fingerprints the same
    tensors again and again keeps them (``fingerprint.FingerprintPlan``)."""
    device = tensors[0].device
    words = [t.numel() * t.element_size() // 2 for t in tensors]
    blocks = [max(1, (n + CHUNK - 1) // CHUNK) for n in words]
    unit = ALIGN // 2 if all(aligned(t) for t in tensors) else 1  # 16-bit words
    base, offs = _based(tensors, unit * 2)
    lowest = next(i for i, t in enumerate(tensors) if t.data_ptr() == base.data_ptr())
    counts = torch.tensor(blocks, dtype=torch.int64, device=device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    return (lowest, torch.tensor(offs, dtype=torch.int64, device=device),
            torch.tensor(words, dtype=torch.int64, device=device), block_tensor.to(torch.int32),
            torch.arange(block_tensor.numel(), device=device) - first[block_tensor], unit)
