"""Exact weight fingerprints over bit patterns.

Each tensor's bytes are read as 16-bit words ``x_i`` and folded into three integer sums:
``Σ x_i``, ``Σ x_i·(i mod 2^16 + 1)`` and ``Σ x_i·(i div 2^16 + 1)``. Integers, not floats:
``-0.0`` and ``0.0`` differ, NaN payloads differ, and nothing rounds. A change of one or two
words always changes a digest (the three sums pin down the value and the position of each
change); patterns of three or more changes escape only through an exact cancellation in all
three sums at once. Chunks keep every partial sum far from int64 overflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

_CHUNK = 1 << 16  # words per chunk: keeps |x·w| sums below 2^15 · 2^16 · 2^16 = 2^47
_weights_cache: dict[torch.device, torch.Tensor] = {}

Digest = tuple[int, int, int]


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    raw = flat.view(torch.uint8)
    if raw.numel() % 2:
        return raw.to(torch.int64)
    return raw.view(torch.int16).to(torch.int64)


def _low_weights(device: torch.device) -> torch.Tensor:
    low = _weights_cache.get(device)
    if low is None:
        low = _weights_cache[device] = torch.arange(1, _CHUNK + 1, dtype=torch.int64, device=device)
    return low


def tensor_digest(t: torch.Tensor) -> Digest:
    """The three-sum digest of one tensor's bits."""
    words = _words(t)
    n = words.numel()
    low = _low_weights(words.device)
    full, tail = divmod(n, _CHUNK)
    s0 = int(words.sum())
    s1 = 0
    s2 = 0
    if full:
        blocks = words[: full * _CHUNK].view(full, _CHUNK)
        s1 += int((blocks * low).sum())
        high = torch.arange(1, full + 1, dtype=torch.int64, device=words.device)
        s2 += int((blocks.sum(dim=1) * high).sum())
    if tail:
        rest = words[full * _CHUNK:]
        s1 += int((rest * low[:tail]).sum())
        s2 += int(rest.sum()) * (full + 1)
    return (s0, s1, s2)


@dataclass(frozen=True)
class Fingerprint:
    """Digests of named tensors; two fingerprints compare tensor by tensor."""

    digests: Mapping[str, Digest]

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Fingerprint:
        with torch.no_grad():
            return cls({name: tensor_digest(t) for name, t in named})

    def differing(self, other: Fingerprint) -> list[str]:
        names = sorted(set(self.digests) | set(other.digests))
        return [n for n in names if self.digests.get(n) != other.digests.get(n)]

    def __len__(self) -> int:
        return len(self.digests)
