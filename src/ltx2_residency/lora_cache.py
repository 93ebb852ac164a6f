"""Where registered LoRAs live: on disk, in a host cache, in the device's LoRA slots.

:class:`LoRACache` is the registry's storage. ``register`` validates a LoRA against the model and
hashes its file, outside the DiT's lock (requests keep running), then publishes it. A request is
*admitted* before it waits for the DiT: the added LoRAs it chose are held in the host cache for it
(not evicted while it runs), and those not there are read from disk on a loader thread while it
waits, their hash checked against the registered one; once a host copy is there, one of them is
copied to the device on a side stream (:mod:`.ops.staging`). Once the request holds the DiT,
``bind`` puts them into LoRA slots (:mod:`.ops.slots`). The host cache is an LRU within a byte budget, pinned
where there is a GPU; a LoRA given as in-memory tensors has no file to come back from and stays.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import LoRACacheError, LoRAChangedError, LoRAFitError, LoRAFormatError
from .linears import is_linear
from .lora import LoadedLoRA, LoRASpec, TargetLoRA, validate_lora
from .ops.ahead import OUTSIDE, block_of
from .ops.slots import LoRASlots
from .ops.staging import Staging
from .registry import ChosenLoRAs, LoRARegistry, RegisteredLoRA, file_digest

CPU = torch.device("cpu")


class HostCache:
    """Host copies of added LoRAs, least recently used first, within ``budget`` bytes. A LoRA in use
    by an admitted request is not evicted; nor is one without a file to read it back from."""

    def __init__(self, budget: int, pin: bool) -> None:
        self.budget = budget
        self.pin = pin
        self._lock = threading.RLock()
        self._held: OrderedDict[int, LoadedLoRA] = OrderedDict()
        self._kept: set[int] = set()  # no file: never evicted
        self._users: dict[int, set[int]] = {}  # LoRA -> the admissions holding it
        self._gone: set[int] = set()  # removed from the registry: freed once unused
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(lo.nbytes for lo in self._held.values())

    @property
    def kept_nbytes(self) -> int:
        """Bytes of the LoRAs given as tensors: never evicted."""
        with self._lock:
            return sum(self._held[uid].nbytes for uid in self._kept if uid in self._held)

    def __contains__(self, uid: int) -> bool:
        return uid in self._held

    def peek(self, uid: int) -> LoadedLoRA | None:
        """The host copy, if held, counted as neither hit nor miss and not made recent."""
        with self._lock:
            return self._held.get(uid)

    def get(self, uid: int) -> LoadedLoRA | None:
        with self._lock:
            lora = self._held.get(uid)
            if lora is None:
                self.misses += 1
                return None
            self.hits += 1
            self._held.move_to_end(uid)
            return lora

    def put(self, entry: RegisteredLoRA, lora: LoadedLoRA) -> LoadedLoRA:
        """Hold ``lora`` (pinned where there is a GPU); returns the copy held."""
        if self.pin:
            lora = _pinned(lora)
        with self._lock:
            if entry.uid in self._gone and not self._users.get(entry.uid):
                return lora
            self._held[entry.uid] = lora
            if entry.digest is None:
                self._kept.add(entry.uid)
            self._evict()
        return lora

    def use(self, uid: int, holder: int) -> None:
        """``holder`` (an admission) holds ``uid``: not evicted until every holder lets go."""
        with self._lock:
            self._users.setdefault(uid, set()).add(holder)

    def release(self, holder: int) -> None:
        """``holder`` lets go of every LoRA it holds (idempotent: a release cut short is finished by
        the next call, and never lets go for another holder)."""
        with self._lock:
            for uid in [u for u, holders in self._users.items() if holder in holders]:
                holders = self._users[uid]
                holders.discard(holder)
                if not holders:
                    del self._users[uid]
                    if uid in self._gone:
                        self._drop(uid)
            self._evict()

    def forget(self, uid: int) -> None:
        """The LoRA was removed from the registry: free it now, or when its last request ends."""
        with self._lock:
            self._gone.add(uid)
            if not self._users.get(uid):
                self._drop(uid)

    def _drop(self, uid: int) -> None:
        # the uid stays in _gone: a read still under way for a request must not cache it for good
        self._held.pop(uid, None)
        self._kept.discard(uid)

    def _evict(self) -> None:
        total = self.nbytes
        for uid in list(self._held):
            if total <= self.budget:
                return
            if uid in self._kept or self._users.get(uid):
                continue
            total -= self._held.pop(uid).nbytes
            self.evictions += 1


def _pinned(lora: LoadedLoRA) -> LoadedLoRA:
    """Page-locked copies: host-to-device copies from them are asynchronous."""
    return LoadedLoRA(lora.spec, {m: TargetLoRA(m, t.lora_A.pin_memory(), t.lora_B.pin_memory(), t.alpha)
                                  for m, t in lora.targets.items()})


_holders = itertools.count(1)


@dataclass
class Admission:
    """A request's added LoRAs, held in the host cache for it, some still being read."""

    chosen: ChosenLoRAs
    pending: dict[int, Future[LoadedLoRA]] = field(default_factory=dict)
    holder: int = field(default_factory=lambda: next(_holders))
    host: HostCache | None = None  # set once it holds LoRAs there
    staging: Staging | None = None  # set once it may have a LoRA staged
    sources: dict[str, str] = field(default_factory=dict)  # added LoRA -> tier bind found it in

    def release(self) -> None:
        """Let go of the LoRAs (idempotent)."""
        if self.staging is not None:
            self.staging.drop(self.holder)
        if self.host is not None:
            self.host.release(self.holder)


class LoRACache:
    """The registry's storage and its tiers (disk, host cache, device slots)."""

    def __init__(self, model: nn.Module, own: list[LoadedLoRA], slots: LoRASlots, host_budget: int) -> None:
        self.registry = LoRARegistry()
        for lora in own:  # the manager's own LoRAs: registered as the PEFT adapters built for them
            self.registry.publish(RegisteredLoRA(lora.spec, None, lora.nbytes, _rank(lora), frozenset(lora.targets),
                                                 lora.name))
        self.model = model
        self.slots = slots
        self.managed = frozenset(slots.managed)
        device = next((p.device for p in model.parameters() if p.is_cuda), CPU)
        self.host = HostCache(host_budget, pin=device.type == "cuda")
        self.staging = Staging(device)
        self._loader: ThreadPoolExecutor | None = None
        self._loader_lock = threading.Lock()
        self.disk_loads = 0
        self.disk_bytes = 0

    # ------------------------------------------------------------------ registration
    def register(self, spec: LoRASpec) -> RegisteredLoRA:
        """Validate ``spec`` against the model, hash its file and publish it (a typed error, and
        nothing registered, when it does not fit)."""
        self.registry.refuse_clash(spec.name)
        lora, digest = self._read(spec, None)
        self._check_fit(spec, lora)
        entry = RegisteredLoRA(spec, digest, lora.nbytes, _rank(lora), frozenset(lora.targets), None)
        self.host.put(entry, lora)
        try:
            self.registry.publish(entry)
        except BaseException:
            self.host.forget(entry.uid)
            raise
        return entry

    def remove(self, name: object) -> RegisteredLoRA:
        entry = self.registry.unpublish(name)
        self.host.forget(entry.uid)
        return entry

    def _read(self, spec: LoRASpec, expected: str | None) -> tuple[LoadedLoRA, str | None]:
        """The LoRA's host copy and its file's hash, checked to be the same before and after reading
        (and equal to ``expected``, the registered hash, when given)."""
        if spec.path is None:
            return validate_lora(spec, self.model, place=CPU), None
        try:
            before = file_digest(spec.path)
        except OSError as exc:
            if expected is not None:
                raise LoRAChangedError(f"LoRA {spec.name!r}: {spec.source} can no longer be read "
                                       f"({exc.strerror or exc}); it was moved or removed since it was registered: "
                                       "remove_lora() it, or put the file back") from None
            validate_lora(spec, self.model, place=CPU)  # its typed error names what is wrong with the path
            raise LoRAFormatError(f"LoRA {spec.name!r}: cannot read {spec.source} ({exc.strerror or exc})") from None
        if expected is not None and before != expected:
            raise LoRAChangedError(f"LoRA {spec.name!r}: {spec.source} changed since it was registered "
                                   f"(SHA-256 {before[:12]}..., registered {expected[:12]}...); register the new "
                                   "file under a new name, or remove_lora() and add_lora() it again")
        lora = validate_lora(spec, self.model, place=CPU)
        if file_digest(spec.path) != before:
            raise LoRAChangedError(f"LoRA {spec.name!r}: {spec.source} changed while it was being read; "
                                   "write LoRA files to a new path and rename them into place")
        return lora, before

    def _check_fit(self, spec: LoRASpec, lora: LoadedLoRA) -> None:
        outside = sorted(set(lora.targets) - self.managed)
        if outside:
            raise LoRAFitError(
                f"LoRA {spec.name!r} targets {len(outside)} layers this manager does not manage (e.g. "
                f"{outside[0]!r}); a manager takes added LoRAs on the layers of the LoRAs it was built with "
                f"({len(self.managed)} layers), or on every block Linear when built with none")
        rank = _rank(lora)
        if rank > self.slots.rank:
            raise LoRAFitError(f"LoRA {spec.name!r} has rank {rank}, above the LoRA slots' rank "
                               f"{self.slots.rank}; build the manager with ManagerOptions(lora_slot_rank={rank})")
        if not len(self.slots):
            raise LoRAFitError(f"LoRA {spec.name!r} cannot be added: the device LoRA cache has no slot "
                               "(ManagerOptions(device_lora_cache_bytes=...) is below one slot's size)")
        if spec.path is None and self.host.kept_nbytes + lora.nbytes > self.host.budget:
            raise LoRAFitError(f"LoRA {spec.name!r} is given as tensors, which the host LoRA cache can never evict "
                               f"(there is no file to read them back from), and the cache's "
                               f"{self.host.budget} bytes are taken by such LoRAs; add it from a file, or raise "
                               "ManagerOptions(host_lora_cache_bytes=...)")
        if lora.nbytes > self.host.budget:
            raise LoRAFitError(f"LoRA {spec.name!r} takes {lora.nbytes} bytes, more than the host LoRA cache's "
                               f"{self.host.budget}; raise ManagerOptions(host_lora_cache_bytes=...)")

    # ------------------------------------------------------------------ requests
    def check(self, chosen: ChosenLoRAs) -> None:
        """Refuse, before anything moves, a request that needs more slots than there are."""
        added = chosen.added()
        if len(added) > len(self.slots):
            raise LoRACacheError(
                f"the request runs {len(added)} added LoRAs ({', '.join(e.name for e in added)}) but the device "
                f"LoRA cache has {len(self.slots)} slots; choose fewer with request(loras=...), or raise "
                "ManagerOptions(device_lora_cache_bytes=...)")

    def admit(self, admission: Admission) -> None:
        """Hold the request's added LoRAs in the host cache and start reading those not there."""
        admission.host = self.host  # before the first hold: a release, even cut short, lets go of all
        admission.staging = self.staging
        added = admission.chosen.added()
        for entry in added:
            self.host.use(entry.uid, admission.holder)
        for entry in added:
            if self.slots.slot_of(entry.uid) is not None:
                continue
            held = self.host.peek(entry.uid)
            if held is not None:
                self.staging.offer(entry.uid, admission.holder, held)
                continue
            future = admission.pending[entry.uid] = self._fetch(entry)
            future.add_done_callback(lambda f, uid=entry.uid: self._stage(f, uid, admission.holder))

    def _stage(self, future: Future[LoadedLoRA], uid: int, holder: int) -> None:
        """A read finished (on the loader thread): start its copy to the device."""
        if not future.cancelled() and future.exception() is None:
            self.staging.offer(uid, holder, future.result())

    def bind(self, admission: Admission) -> dict[str, str]:
        """Under the DiT: each chosen LoRA's adapter (its own, or the slot it is loaded into)."""
        chosen = admission.chosen
        keys = {n: e.adapter for n, e in chosen.entries.items() if e.adapter is not None}
        sources = admission.sources

        def load(entry: RegisteredLoRA) -> LoadedLoRA:
            pending = admission.pending.pop(entry.uid, None)
            lora = pending.result() if pending is not None else self.host.get(entry.uid)
            sources[entry.name] = "disk" if pending is not None or lora is None else "host"
            if lora is None:
                lora = self._load(entry)
            staged = self.staging.take(entry.uid)
            return lora if staged is None else staged

        live = {e.uid for e in [*self.registry.entries.values(), *chosen.added()]}
        for uid in [u for u in self.slots.held.values() if u is not None and u not in live]:
            self.slots.drop(uid)  # a removed LoRA's slot is the first to be reused
        added = chosen.added()
        sources.update((e.name, "device") for e in added if self.slots.slot_of(e.uid) is not None)
        keys.update(self.slots.bind(added, load))
        return keys

    def _fetch(self, entry: RegisteredLoRA) -> Future[LoadedLoRA]:
        with self._loader_lock:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ltx2-lora-loader")
            return self._loader.submit(self._load, entry)

    def _load(self, entry: RegisteredLoRA) -> LoadedLoRA:
        cached = self.host.get(entry.uid)
        if cached is not None:
            return cached
        lora, _ = self._read(entry.spec, entry.digest)
        self.disk_loads += 1
        self.disk_bytes += lora.nbytes
        return self.host.put(entry, lora)  # the pinned copy: copies from it to the device are asynchronous

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self.staging.drop()

    # ------------------------------------------------------------------ reports
    def stats(self) -> dict[str, Mapping[str, Any]]:
        """Hits, misses and bytes per tier."""
        host, slots = self.host, self.slots
        return {
            "host": {"bytes": host.nbytes, "budget_bytes": host.budget, "loras": len(host._held),
                     "hits": host.hits, "misses": host.misses, "hit_rate": _rate(host.hits, host.misses),
                     "evictions": host.evictions},
            "device": {"bytes": slots.nbytes, "slots": len(slots),
                       "slots_used": sum(u is not None for u in slots.held.values()), "hits": slots.hits,
                       "loads": slots.loads, "hit_rate": _rate(slots.hits, slots.loads),
                       "bytes_loaded": slots.bytes_loaded, "staged": self.staging.staged,
                       "staged_used": self.staging.used, "bytes_staged": self.staging.bytes_staged},
            "disk": {"loads": self.disk_loads, "bytes_read": self.disk_bytes},
        }


def managed_layers(model: nn.Module, loras: list[LoadedLoRA]) -> list[str]:
    """The layers a manager manages, and added LoRAs may target: those of the LoRAs it is built
    with, or every plain ``nn.Linear`` in the DiT's numbered blocks when it is built with none."""
    if loras:
        return sorted({m for lo in loras for m in lo.targets})
    return sorted(name for name, m in model.named_modules() if is_linear(m) and block_of(name) != OUTSIDE)


def slot_names(model: nn.Module, managed: list[str], rank: int, budget: int | None,
               taken: Mapping[str, object]) -> list[str]:
    """Names for the LoRA slots the device budget holds (``None``: two), unlike any LoRA's."""
    weights = [model.get_submodule(m).weight for m in managed]
    per_slot = rank * sum(sum(w.shape) * w.element_size() for w in weights)
    count = 0 if not managed else 2 if budget is None else budget // max(per_slot, 1)
    names: list[str] = []
    i = 0
    while len(names) < count:
        name = f"ltx2_slot{i}"
        if name not in taken:
            names.append(name)
        i += 1
    return names


def _rank(lora: LoadedLoRA) -> int:
    return max(t.rank for t in lora.targets.values())


def _rate(hits: int, misses: int) -> float:
    return hits / (hits + misses) if hits + misses else 0.0
