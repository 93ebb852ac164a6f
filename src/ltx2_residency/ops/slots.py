"""The device tier of the LoRA cache: LoRA slots, PEFT adapters that take an added LoRA's tensors.

Each slot is a PEFT adapter of one rank on every managed layer (:class:`~.dynamic.PeftAdapters`),
zero until a request needs it. Slots are injected with the manager's own adapters at start-up
when their budget is given, or when the manager has no adapter of its own; otherwise the first
time a request runs an added LoRA (a manager that never adds one pays nothing for them). Loading an
added LoRA into a slot copies its factors into the slot's tensors (a smaller rank fills the leading
rows, the rest stays zero, so the product is the LoRA's) and its alpha/rank into the slot's scales,
in place: the model's module tree and every forward stay as they were, so a compiled DiT runs
any LoRA a request chooses without a new graph. The merge path and both dynamic forwards read the
slot as they read any adapter.

A slot is emptied before it is written (record before you write): a load cut short leaves an empty
slot, never a slot that claims a LoRA it only half holds. Slots are written only while the DiT is
held (at a request's start), never under a running forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..lora import LoadedLoRA
from ..registry import RegisteredLoRA
from .dynamic import PeftAdapters
from .forward import set_ratio


class LoRASlots:
    """``adapters.slots``, each holding one added LoRA (by registry entry) or none; least recently
    used first when a request needs a slot."""

    def __init__(self, adapters: PeftAdapters, rank: int, names: Sequence[str], managed: Sequence[str]) -> None:
        self.adapters = adapters
        self.rank = rank
        self.managed = list(managed)
        self.held: dict[str, int | None] = dict.fromkeys(names)  # slot -> the entry's uid
        self._order = list(names)  # least recently used first
        self.hits = 0
        self.loads = 0
        self.bytes_loaded = 0

    def __len__(self) -> int:
        return len(self.held)

    def slot_of(self, uid: int) -> str | None:
        return next((s for s, held in self.held.items() if held == uid), None)

    def bind(self, entries: Sequence[RegisteredLoRA], load: Callable[[RegisteredLoRA], LoadedLoRA]) -> dict[str, str]:
        """A slot for each of ``entries`` (a request's added LoRAs): those already held are hits, the
        others are loaded (``load`` gives the host copy) into the least recently used slots the
        request does not need. Returns LoRA name -> slot."""
        assert len(entries) <= len(self.held), "LoRACache.check refuses such a request at request()"
        wanted = {e.uid for e in entries}
        bound: dict[str, str] = {}
        missing = [s for s in self.held if s not in self.adapters.slots]
        if entries and missing:
            self.adapters.add_slots(missing, self.rank, self.managed)
        for entry in entries:
            slot = self.slot_of(entry.uid)
            if slot is not None:
                self.hits += 1
                bound[entry.name] = slot
                self._touch(slot)
        for entry in entries:
            if entry.name in bound:
                continue
            slot = next(s for s in self._order if self.held[s] not in wanted)
            self.write(slot, entry.uid, load(entry))
            bound[entry.name] = slot
            self._touch(slot)
        return bound

    def drop(self, uid: int) -> None:
        """A removed LoRA's slot becomes the first to be reused (its tensors stay until then)."""
        slot = self.slot_of(uid)
        if slot is not None:
            self.held[slot] = None
            self._order = [slot, *(s for s in self._order if s != slot)]  # one assignment: no slot lost

    def _touch(self, slot: str) -> None:
        self._order = [*(s for s in self._order if s != slot), slot]

    def write(self, slot: str, uid: int, lora: LoadedLoRA) -> None:
        """Copy ``lora`` into ``slot`` in place: every managed layer, zero where it has no target."""
        ad = self.adapters
        self.held[slot] = None  # before the first write: a load cut short leaves the slot empty
        ad.covers[slot] = frozenset()
        ad.forget(slot)
        with torch.no_grad():
            for module in ad._targets[slot]:
                layer = ad.layers[module]
                a, b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                target = lora.targets.get(module)
                if target is None:
                    a.zero_()
                    b.zero_()
                    continue
                r = target.rank
                a[:r].copy_(target.lora_A, non_blocking=True)
                a[r:].zero_()
                b[:, :r].copy_(target.lora_B, non_blocking=True)
                b[:, r:].zero_()
                alpha = target.alpha if target.alpha is not None else float(r)
                # the LoRA's own rank and alpha: PEFT scales by lora_alpha / r, and the eager forward
                # computes only the leading r rows (and chooses its form by the true rank)
                layer.r[slot] = r
                layer.lora_alpha[slot] = alpha
                layer.scaling[slot] = alpha / r
                set_ratio(layer, slot, alpha / r)
        ad.covers[slot] = frozenset(lora.targets)
        self.held[slot] = uid
        self.loads += 1
        self.bytes_loaded += lora.nbytes

    @property
    def nbytes(self) -> int:
        """Device bytes the slots take (their rank on every managed layer)."""
        ad = self.adapters
        layers = [(slot, ad.layers[m]) for slot in ad.slots for m in ad._targets.get(slot, ())]
        return sum(p.numel() * p.element_size() for slot, layer in layers
                   for p in (layer.lora_A[slot].weight, layer.lora_B[slot].weight))
