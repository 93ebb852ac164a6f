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
from typing import Any

import torch

CHUNK = 1 << 15  # must equal fingerprint._CHUNK: the digests are the same function
TILE_NOT_RUN, TILE_MERGED, TILE_NON_FINITE, TILE_NO_ROOM = 0, 1, 2, 3

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
def _tiles() -> tuple[int, int, int, int, int]:
    """(BN, BK, BR, warps, stages); ``LTX2_FUSED_TILES`` overrides them for tuning runs."""
    raw = os.environ.get("LTX2_FUSED_TILES", "128,128,64,8,3")
    bn, bk, br, warps, stages = (int(x) for x in raw.split(","))
    return bn, bk, br, warps, stages


def tile_grid(weight: torch.Tensor) -> tuple[int, int]:
    bn, bk, *_ = _tiles()
    rows, cols = weight.shape
    return (rows + bn - 1) // bn, (cols + bk - 1) // bk


def supports(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """The fused path takes contiguous 2-D bfloat16 weights with bfloat16 factors."""
    return (weight.dim() == 2 and weight.is_contiguous() and weight.dtype == torch.bfloat16
            and lora_a.dtype == lora_b.dtype == weight.dtype and lora_a.is_contiguous() and lora_b.is_contiguous()
            and weight.numel() < 2**31)


def lora_tiles(mode: int, weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float,
               flags: torch.Tensor, counters: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    """Launch the merge (mode 0) or restore (mode 1) kernel on one layer; asynchronous.
    ``counters``: int64 ``[reserved, valid_end]`` of the record pool ``idx``/``val``."""
    module = _load()
    bn, bk, br, warps, stages = _tiles()
    rank = lora_a.shape[0]
    br = min(br, max(16, 1 << (rank - 1).bit_length()))  # tl.dot needs >= 16; no wider than the rank
    rows, cols = weight.shape
    module.lora_tile[tile_grid(weight)](
        weight, lora_b, lora_a, flags, counters, counters[1:], idx, val, idx.numel(), rows, cols, float(scale),
        RANK=rank, MODE=mode, F32_DOT=_interpreting(), BN=bn, BK=bk, BR=br, num_warps=warps, num_stages=stages)


def scatter(weight: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
    """``weight.view(-1)[idx] = val`` bitwise, ``idx`` int32, in one launch; asynchronous."""
    n = idx.numel()
    if n:
        _load().scatter16[((n + 4095) // 4096,)](weight.view(-1).view(torch.int16), idx, val, n, BLOCK=4096)


# ---------------------------------------------------------------------------- fingerprint
def digests(tensors: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """The three-sum digest of each tensor (contiguous, even byte count, one device), in one launch."""
    if not tensors:
        return []
    kernels = _load()
    device = tensors[0].device
    words = [t.numel() * t.element_size() // 2 for t in tensors]
    blocks = [max(1, (n + CHUNK - 1) // CHUNK) for n in words]
    ptr_table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)
    words_table = torch.tensor(words, dtype=torch.int64, device=device)
    counts = torch.tensor(blocks, dtype=torch.int64, device=device)
    block_tensor = torch.repeat_interleave(torch.arange(len(tensors), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    block_index = torch.arange(block_tensor.numel(), device=device) - first[block_tensor]
    out = torch.empty(block_tensor.numel(), 3, dtype=torch.int64, device=device)
    kernels.digest_blocks[(block_tensor.numel(),)](ptr_table, words_table, block_tensor.to(torch.int32),
                                                       block_index, out, CHUNK_=CHUNK, STEP=4096)
    sums = torch.zeros(len(tensors), 3, dtype=torch.int64, device=device)
    sums.index_add_(0, block_tensor, out)
    return [tuple(row) for row in sums.tolist()]  # type: ignore[misc]
