"""The fingerprint's CUDA path: every tensor's digest in one Triton launch.

A table of base pointers and one program per block of a tensor (``_triton.digest_blocks``);
each program reads its block once, as 32-bit words, and writes the block's two sums of mixes
and its byte count; the blocks' rows are summed per tensor on the device. The digest is a sum
over words, so the blocking is free to change without changing a bit of it: the torch path in
``fingerprint`` computes the same function word by word.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from . import kernels

#: 16-bit words per program, tile rows and columns (16-bit words), warps. ``LTX2_DIGEST_TILES``
#: overrides them for tuning runs.
DEFAULT_TILES = "65536,2,1024,4"
_MAX_WORDS = 1 << 31  # 16-bit words of one tensor: the kernel's positions and byte counts stay exact


def tiles() -> tuple[int, int, int, int]:
    raw = os.environ.get("LTX2_DIGEST_TILES", DEFAULT_TILES)
    try:
        chunk, rows, cols, warps = (int(x) for x in raw.split(","))
    except ValueError:
        chunk = rows = cols = warps = 0
    tile = rows * cols
    if min(chunk, rows, cols, warps) < 1 or tile < 4 or chunk % tile or tile & (tile - 1) or warps & (warps - 1):
        raise ConfigError(f"LTX2_DIGEST_TILES={raw!r}: give 'block,rows,cols,warps' with the block a whole number "
                          "of rows x cols tiles and the tile (at least 4) and the warps powers of two "
                          f"(default {DEFAULT_TILES!r})")
    return chunk, rows, cols, warps


@dataclass(frozen=True)
class Layout:
    """The block tables of one list of tensors, valid while every address stays the same.
    Empty tensors get no block (their digest is all zeros, as on the torch path)."""

    lowest: int  # index of the tensor the offsets count from (the lowest address)
    count: int  # tensors, empty ones included
    offsets: torch.Tensor  # int64 per tensor, in units of ``unit`` 16-bit words
    words: torch.Tensor  # int64 per tensor: its 16-bit words
    block_tensor: torch.Tensor  # int32 per block
    block_index: torch.Tensor  # int64 per block: its index within its tensor
    unit: int  # 8 when every tensor is 16-byte aligned, 2 when 4-byte aligned, else 1
    chunk: int  # 16-bit words per block


def fits(tensors: Sequence[torch.Tensor]) -> bool:
    """One launch can digest these: the kernels run on their (one) device, every tensor is
    contiguous with whole 16-bit words, and at least one is non-empty."""
    if not tensors or not kernels.available(tensors[0].device):
        return False
    device = tensors[0].device
    return any(t.numel() for t in tensors) and not any(
        t.device != device or not t.is_contiguous() or (t.numel() * t.element_size()) % 2
        or t.numel() * t.element_size() // 2 >= _MAX_WORDS for t in tensors)


def layout(tensors: Sequence[torch.Tensor]) -> Layout:
    """The block tables over ``tensors`` (see :func:`fits`). Building them is host work that a
    caller digesting the same tensors again and again keeps (``fingerprint.FingerprintPlan``)."""
    chunk = tiles()[0]
    device = tensors[0].device
    words = [t.numel() * t.element_size() // 2 for t in tensors]
    live = [i for i, n in enumerate(words) if n]
    addresses = [tensors[i].data_ptr() for i in live]
    unit = 8 if all(a % 16 == 0 for a in addresses) else 2 if all(a % 4 == 0 for a in addresses) else 1
    lowest = live[min(range(len(live)), key=addresses.__getitem__)]
    base = tensors[lowest].data_ptr()
    offsets = [0] * len(tensors)
    for i, a in zip(live, addresses, strict=True):
        offsets[i] = (a - base) // (2 * unit)
    blocks = [(n + chunk - 1) // chunk for n in words]
    counts = torch.tensor(blocks, dtype=torch.int64, device=device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    return Layout(lowest, len(tensors), torch.tensor(offsets, dtype=torch.int64, device=device),
                  torch.tensor(words, dtype=torch.int64, device=device), block_tensor.to(torch.int32),
                  torch.arange(block_tensor.numel(), device=device) - first[block_tensor], unit, chunk)


def launch(lowest: torch.Tensor, plan: Layout) -> torch.Tensor:
    """The digests of the planned tensors as a ``(count, 3)`` int64 device tensor, launched on
    the current stream without waiting (``lowest``: the tensor at ``plan.lowest``, whose storage
    the offsets count from)."""
    _, rows, cols, warps = tiles()
    base = lowest.reshape(-1).view(torch.int16)
    blocks = plan.block_tensor.numel()
    out = torch.empty(blocks, 3, dtype=torch.int64, device=base.device)
    kernels._load().digest_blocks[(blocks,)](base, plan.offsets, plan.words, plan.block_tensor, plan.block_index,
                                             out, UNIT=plan.unit, CHUNK_=plan.chunk, COLS=cols, ROWS=rows,
                                             num_warps=warps)
    sums = torch.zeros(plan.count, 3, dtype=torch.int64, device=base.device)
    sums.index_add_(0, plan.block_tensor, out)
    return sums


def launch_digests(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`launch` with tables built for this one call."""
    plan = layout(tensors)
    return launch(tensors[plan.lowest], plan)
