"""Exact weight fingerprints over bit patterns.

Each tensor's bytes are read as 16-bit words ``x_i`` and folded into three integer sums:
``Σ x_i``, ``Σ x_i·(i mod 2^15 + 1)`` and ``Σ x_i·(i div 2^15 + 1)``. Integers, not floats:
``-0.0`` and ``0.0`` differ, NaN payloads differ, and nothing rounds. A change of one or two
words always changes a digest (the three sums pin down the value and the position of each
change); patterns of three or more changes escape only through an exact cancellation in all
three sums at once. The words stay 16-bit and each product fits int32 (|x·w| < 2^30), so a
pass reads about 14 bytes per element; sums accumulate in int64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

_CHUNK = 1 << 15  # words per block: |x·w| <= 2^15 · 2^15 = 2^30 fits an int32 product
_weights_cache: dict[torch.device, torch.Tensor] = {}

Digest = tuple[int, int, int]


def _words(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().view(-1)
    raw = flat.view(torch.uint8)
    if raw.numel() % 2:
        return raw.to(torch.int16)
    return raw.view(torch.int16)


def _low_weights(device: torch.device) -> torch.Tensor:
    low = _weights_cache.get(device)
    if low is None:
        low = _weights_cache[device] = torch.arange(1, _CHUNK + 1, dtype=torch.int32, device=device)
    return low


def tensor_digest(t: torch.Tensor) -> Digest:
    """The three-sum digest of one tensor's bits."""
    words = _words(t)
    n = words.numel()
    low = _low_weights(words.device)
    full, tail = divmod(n, _CHUNK)
    i64 = torch.int64
    sums = [words.sum(dtype=i64)]
    s1 = torch.zeros((), dtype=i64, device=words.device)
    s2 = torch.zeros((), dtype=i64, device=words.device)
    if full:
        blocks = words[: full * _CHUNK].view(full, _CHUNK)
        s1 = s1 + (blocks * low).sum(dtype=i64)  # int16 x int32 -> int32, no int64 copy
        high = torch.arange(1, full + 1, dtype=i64, device=words.device)
        s2 = s2 + (blocks.sum(dim=1, dtype=i64) * high).sum()
    if tail:
        rest = words[full * _CHUNK:]
        s1 = s1 + (rest * low[:tail]).sum(dtype=i64)
        s2 = s2 + rest.sum(dtype=i64) * (full + 1)
    sums += [s1, s2]
    s0, s1v, s2v = torch.stack(sums).tolist()  # one device sync per tensor
    return (s0, s1v, s2v)


def _kernels_fit(tensors: list[torch.Tensor]) -> bool:
    """One Triton launch can digest these (one CUDA device, contiguous, whole 16-bit words)."""
    if not tensors:
        return False
    from . import kernels

    device = tensors[0].device
    return kernels.available(device) and not any(
        t.device != device or not t.is_contiguous() or (t.numel() * t.element_size()) % 2 for t in tensors)


def _kernel_digests(tensors: list[torch.Tensor]) -> list[Digest] | None:
    """All digests in one Triton launch when the tensors allow it; ``None`` sends the caller
    down the torch path. Same sums, same bits."""
    if not _kernels_fit(tensors):
        return None
    from . import kernels

    return kernels.digests([t.detach() for t in tensors])


@dataclass(frozen=True)
class Fingerprint:
    """Digests of named tensors; two fingerprints compare tensor by tensor."""

    digests: Mapping[str, Digest]

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Fingerprint:
        items = list(named)
        with torch.no_grad():
            fast = _kernel_digests([t for _, t in items])
            if fast is not None:
                return cls({name: d for (name, _), d in zip(items, fast, strict=True)})
            return cls({name: tensor_digest(t) for name, t in items})

    @classmethod
    def launch(cls, named: Iterable[tuple[str, torch.Tensor]]) -> PendingFingerprint:
        """Start fingerprinting on the current stream without waiting for it (one kernel launch
        where the kernels fit; otherwise computed now, the torch path syncs anyway)."""
        items = list(named)
        tensors = [t.detach() for _, t in items]
        if not _kernels_fit(tensors):
            return PendingFingerprint([n for n, _ in items], cls.of(items))
        from . import kernels

        with torch.no_grad():
            return PendingFingerprint([n for n, _ in items], kernels.launch_digests(tensors))

    def differing(self, other: Fingerprint) -> list[str]:
        names = sorted(set(self.digests) | set(other.digests))
        return [n for n in names if self.digests.get(n) != other.digests.get(n)]

    def __len__(self) -> int:
        return len(self.digests)


class PendingFingerprint:
    """A fingerprint whose sums may still be on their way (see :meth:`Fingerprint.launch`)."""

    def __init__(self, names: list[str], sums: torch.Tensor | Fingerprint) -> None:
        self._names = names
        self._sums = sums

    def result(self) -> Fingerprint:
        """The fingerprint; waits for the sums when they are still being computed."""
        if isinstance(self._sums, torch.Tensor):
            rows = self._sums.tolist()
            self._sums = Fingerprint({n: tuple(r) for n, r in zip(self._names, rows, strict=True)})  # type: ignore[misc]
        return self._sums
