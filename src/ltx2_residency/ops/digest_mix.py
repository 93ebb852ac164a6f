"""The digest itself, in torch: the reference the Triton kernel (``_triton``) reproduces bit for bit.

Each 32-bit word of a tensor is mixed with its position (two multiply-xorshift rounds) and the mixes
are summed per tensor in 64 bits; :mod:`.fingerprint` turns digests into fingerprints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Digest = tuple[int, int, int]

# the keys (``_triton`` compiles the same ones into the kernel)
DIGEST_KEY = 0x9E3779B9
DIGEST_M1, DIGEST_M2 = 0x7FEB352D, 0x846CA68B
DIGEST_M3, DIGEST_M4 = 0x21F0AAAD, 0xD35A2D97

_MASK = 0xFFFFFFFF
# words per step of the torch path: bounds its int64 temporaries (a GPU without Triton takes
# bigger steps, so that launches do not dominate)
_TORCH_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}


def _signed(c: int) -> int:
    """``c`` mod 2^32 as the representative of least magnitude (< 2^31), so that a 32-bit word
    times it fits an int64 exactly and its low 32 bits are the unsigned product's."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mul(x: torch.Tensor, c: int) -> torch.Tensor:
    return x.mul_(_signed(c)).bitwise_and_(_MASK)


def _xorshift(x: torch.Tensor, s: int) -> torch.Tensor:
    return x.bitwise_xor_(x >> s)


def _mixes(w: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h1, h2)`` of words ``w`` at position keys ``k`` (int64 holding 32-bit values; ``w`` is
    consumed)."""
    h1 = _xorshift(_mul(_xorshift(_mul(_xorshift(w, 16).bitwise_xor_(k), DIGEST_M1), 15), DIGEST_M2), 16)
    h2 = _xorshift(_mul(_xorshift(_mul(h1 ^ k, DIGEST_M3), 15), DIGEST_M4), 15)
    return h1, h2


def _words32(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as int32 words, zero-padded to a whole word."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if raw.numel() % 4 or raw.storage_offset() % 4:
        padded = torch.zeros((raw.numel() + 3) // 4 * 4, dtype=torch.uint8, device=raw.device)
        padded[: raw.numel()] = raw
        raw = padded
    return raw.view(torch.int32)


def _torch_digests(tensors: Sequence[torch.Tensor]) -> list[Digest]:
    """The digests in torch: the words of several tensors are mixed together in batches of up
    to a chunk (a few ops over many small tensors, not many ops per tensor), and each word's
    mixes are summed into its tensor's row."""
    words = [_words32(t) for t in tensors]
    sums = {w.device: torch.zeros(len(tensors), 2, dtype=torch.int64, device=w.device) for w in words}
    batch: list[tuple[int, int, torch.Tensor]] = []  # (tensor, first word's position, words)
    size = 0

    def flush() -> None:
        nonlocal size
        if not batch:
            return
        device = batch[0][2].device
        rows = torch.tensor([i for i, _, _ in batch], dtype=torch.int64, device=device)
        if len(batch) == 1:
            _, first, w = batch[0]
            positions = torch.arange(first, first + len(w), dtype=torch.int64, device=device)
            w = w.to(torch.int64)
        else:
            lengths = torch.tensor([len(w) for _, _, w in batch], dtype=torch.int64, device=device)
            ends = torch.cumsum(lengths, 0)
            firsts = torch.tensor([first for _, first, _ in batch], dtype=torch.int64, device=device)
            # a word's position in its own tensor: its index in the batch, less where its piece
            # starts in the batch, plus where the piece starts in the tensor
            positions = torch.arange(int(ends[-1]), dtype=torch.int64, device=device).sub_(
                torch.repeat_interleave(ends - lengths - firsts, lengths))
            w = torch.cat([w for _, _, w in batch]).to(torch.int64)
        h1, h2 = _mixes(w.bitwise_and_(_MASK), _mul(positions.bitwise_and_(_MASK), DIGEST_KEY))
        if len(batch) == 1:
            pieces = torch.stack((h1.sum(), h2.sum())).unsqueeze(0)
        else:  # each piece's sums from running sums at the pieces' ends
            at_ends = torch.stack((h1.cumsum(0), h2.cumsum(0)), 1)[ends - 1]
            pieces = at_ends - torch.cat((torch.zeros_like(at_ends[:1]), at_ends[:-1]))
        sums[device].index_add_(0, rows, pieces)
        batch.clear()
        size = 0

    with torch.no_grad():
        for i, tw in enumerate(words):
            chunk = _TORCH_CHUNK.get(tw.device.type, _TORCH_CHUNK["cpu"])
            for first in range(0, len(tw), chunk):
                piece = tw[first:first + chunk]
                if size + len(piece) > chunk or (batch and batch[0][2].device != piece.device):
                    flush()
                batch.append((i, first, piece))
                size += len(piece)
        flush()
        rows_by_device = {d: s.tolist() for d, s in sums.items()}  # one device sync per device
    return [(*rows_by_device[w.device][i], t.numel() * t.element_size())  # type: ignore[misc]
            for i, (t, w) in enumerate(zip(tensors, words, strict=True))]


def tensor_digest(t: torch.Tensor) -> Digest:
    """The digest of one tensor's bits, in torch (the reference for the kernel)."""
    return _torch_digests([t])[0]
