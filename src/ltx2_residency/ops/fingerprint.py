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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


class Fingerprint:
    """Digests of named tensors; two fingerprints compare tensor by tensor.

    A fingerprint from the kernels keeps its sums on the device: two of the same names compare
    there, and only the names that differ come back to the host (1344 digests through
    ``tolist()`` and a dict comparison cost about a millisecond at every verify)."""

    __slots__ = ("_digests", "_names", "_sums")

    def __init__(self, digests: Mapping[str, Digest] | None = None, *, names: Sequence[str] = (),
                 sums: torch.Tensor | None = None) -> None:
        self._digests = dict(digests) if digests is not None else None
        self._names = list(names)
        self._sums = sums  # (len(names), 3) int64 on the device, when digests is None

    @property
    def digests(self) -> Mapping[str, Digest]:
        if self._digests is None:
            assert self._sums is not None
            rows = self._sums.tolist()
            self._digests = {n: tuple(r) for n, r in zip(self._names, rows, strict=True)}  # type: ignore[misc]
        return self._digests

    @classmethod
    def of(cls, named: Iterable[tuple[str, torch.Tensor]]) -> Fingerprint:
        items = list(named)
        with torch.no_grad():
            fast = _kernel_digests([t for _, t in items])
            if fast is not None:
                return cls({name: d for (name, _), d in zip(items, fast, strict=True)})
            return cls({name: tensor_digest(t) for name, t in items})

    def differing(self, other: Fingerprint) -> list[str]:
        a, b = self._sums, other._sums
        if (a is not None and b is not None and a.shape == b.shape and a.device == b.device
                and self._names == other._names):
            rows = (a != b).any(dim=1).nonzero().flatten().tolist()  # the one sync
            return sorted(self._names[i] for i in rows)
        mine, theirs = self.digests, other.digests
        names = sorted(set(mine) | set(theirs))
        return [n for n in names if mine.get(n) != theirs.get(n)]

    def __len__(self) -> int:
        return len(self._names) if self._digests is None else len(self._digests)


class FingerprintPlan:
    """Fingerprints one fixed set of named tensors again and again (a manager's weights at every
    verify): whether the kernels fit and their block tables are worked out once, and again only
    when a tensor has moved (a residency change rebinds ``.data``). Per launch the host then
    reads 1344 addresses and launches two kernels; rebuilding the tables each time cost ~6 ms at
    LTX-2 scale, a third of the kernel."""

    def __init__(self, named: Mapping[str, torch.Tensor]) -> None:
        self._names = list(named)
        self._tensors = list(named.values())
        self._addresses: list[int] | None = None
        self._layout: tuple[Any, ...] | None = None  # None: the torch path

    def compute(self) -> Fingerprint:
        """The fingerprint, launched on the current stream without waiting: on the kernel path its
        sums may still be in flight, and comparing or reading them waits for that stream (a
        deferred verify launches it on the undo's side stream and compares at the settle)."""
        addresses = [t.data_ptr() for t in self._tensors]
        if addresses != self._addresses:
            from . import kernels

            tensors = [t.detach() for t in self._tensors]
            self._layout = kernels.digest_layout(tensors) if _kernels_fit(tensors) else None
            self._addresses = addresses
        if self._layout is None:
            return Fingerprint.of(zip(self._names, self._tensors, strict=True))
        from . import kernels

        with torch.no_grad():
            sums = kernels.launch_planned_digests(self._tensors[self._layout[0]].detach(), self._layout,
                                                  len(self._tensors))
        return Fingerprint(names=self._names, sums=sums)
