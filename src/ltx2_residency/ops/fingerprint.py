"""Exact weight fingerprints over bit patterns, with a digest that structured damage cannot cancel.

A tensor's bytes are read as little-endian 32-bit words ``w_j`` (zero-padded to a whole word;
``j`` the word's index in the tensor). Each word is mixed with its position:

    k  = j · 0x9E3779B9                                          (mod 2^32; odd, so distinct per j)
    h1 = R(w ^ (w >> 16) ^ k;  0x7FEB352D, 15, 0x846CA68B, 16)
    h2 = R(h1 ^ k;             0x21F0AAAD, 15, 0xD35A2D97, 15)

where ``R(x; a, s, b, t)`` multiplies by ``a``, xors in ``x >> s``, multiplies by ``b`` and xors
in ``x >> t`` (32-bit unsigned arithmetic: two rounds of the multiply-xorshift mixing used by
integer hash functions). The digest is ``(Σ h1, Σ h2, bytes)``, the sums taken exactly in 64 bits
(modulo 2^64 beyond 2^31 words, far above any weight's size). Integers, not floats: ``-0.0`` and
``0.0`` differ, NaN payloads differ, nothing rounds.

Why structured damage cannot cancel: a linear checksum (``Σ c_j·w_j``) is blind to every edit
whose weighted sum is zero — ``+1, −2, +1`` on three neighbouring words of a position-weighted
sum, equal and opposite changes anywhere in a plain one. Here the words enter only through the
mixes, which carry no arithmetic structure: any change to a word moves its ``h1`` and ``h2`` by
amounts that look random and unrelated to the size of the change, so ``±1`` patterns, sign flips,
bit flips, swaps and shifts (every moved word meets a new position key) leave two independent
sums to cancel by chance. For a fixed position each mix is a bijection of the word, so a change
confined to one word always changes the digest. Changes to several words escape only if the
changes of both sums cancel exactly, which the mixes leave to chance: about one in 2^64 for damage
that does not know the keys. The one systematic way to keep a sum of mixes — handing the same
values of ``h1`` around between positions — is closed by ``h2``, which re-keys ``h1`` with the
position before mixing it again.

What it does not promise: it is not a cryptographic hash. The keys are in this file, the sums are
additive, and an adversary who writes the weights on purpose can solve for compensating words.
It detects accidents (a wrong undo, a stray write, a kernel bug, memory corruption), not attacks.

On CUDA with Triton every tensor's digest comes from one kernel launch that reads each word once
(``digest_kernel``); elsewhere the torch path below computes the same function, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .digest_mix import Digest, _torch_digests, tensor_digest

__all__ = ["Digest", "Fingerprint", "FingerprintPlan", "tensor_digest"]


def _kernel_digests(tensors: list[torch.Tensor]) -> list[Digest] | None:
    """All digests in one Triton launch when the tensors allow it; ``None`` sends the caller
    down the torch path. Same function, same bits."""
    from . import digest_kernel

    tensors = [t.detach() for t in tensors]
    if not digest_kernel.fits(tensors):
        return None
    return [tuple(row) for row in digest_kernel.launch_digests(tensors).tolist()]  # type: ignore[misc]


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
    def of(cls, named: Iterable[tuple[str, torch.Tensor]], *, use_kernel: bool = True) -> Fingerprint:
        """The fingerprint of ``(name, tensor)`` pairs: one Triton launch where the tensors allow it, else
        (or with ``use_kernel=False``) the torch path, which gives the same digests."""
        items = list(named)
        with torch.no_grad():
            fast = _kernel_digests([t for _, t in items]) if use_kernel else None
            if fast is not None:
                return cls({name: d for (name, _), d in zip(items, fast, strict=True)})
            return cls({name: d for (name, _), d in zip(items, _torch_digests([t for _, t in items]),
                                                          strict=True)})

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
    verify): whether the kernel fits and its block tables are worked out once, and again only
    when a tensor has moved (a residency change rebinds ``.data``). Per verify the host then
    reads the addresses and makes one launch (and the per-tensor sum); rebuilding the tables
    each time costs a sizeable share of the kernel at LTX-2 scale."""

    def __init__(self, named: Mapping[str, torch.Tensor]) -> None:
        self._names = list(named)
        self._tensors = list(named.values())
        self._addresses: list[int] | None = None
        self._layout: Any = None  # digest_kernel.Layout; None: the torch path

    def compute(self) -> Fingerprint:
        """The fingerprint, launched on the current stream without waiting: on the kernel path its
        sums may still be in flight, and comparing or reading them waits for that stream (a
        deferred verify launches it on the undo's side stream and compares at the settle)."""
        addresses = [t.data_ptr() for t in self._tensors]
        if addresses != self._addresses:
            from . import digest_kernel

            tensors = [t.detach() for t in self._tensors]
            self._layout = digest_kernel.layout(tensors) if digest_kernel.fits(tensors) else None
            self._addresses = addresses
        if self._layout is None:
            return Fingerprint.of(zip(self._names, self._tensors, strict=True))
        from . import digest_kernel

        with torch.no_grad():
            sums = digest_kernel.launch(self._tensors[self._layout.lowest].detach(), self._layout)
        return Fingerprint(names=self._names, sums=sums)
