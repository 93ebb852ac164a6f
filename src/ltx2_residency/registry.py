"""The LoRAs a manager knows, by name, and the LoRAs a request chooses from them.

A registered LoRA is an immutable :class:`RegisteredLoRA`: its spec, the content hash of its file
taken at registration, its size and ranks, and how the manager holds it (a PEFT adapter built with
the manager, or a LoRA slot it is copied into when a request needs it). The registry publishes a new
mapping on every add and remove (copy on write under one small lock, never the DiT's): a request
reads a consistent set without waiting for the DiT, and the entries it chose stay alive, and usable,
after they are removed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .domain import Phase, check_strength, parse_enum, shown
from .errors import ConfigError, LoRANameClashError, StrengthError, UnknownLoRAError
from .lora import LoRASpec

_uids = itertools.count(1)
_CHUNK = 8 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class RegisteredLoRA:
    """One registered LoRA. Compared by identity: a LoRA removed and added again under the same name
    is another entry, and a request that chose the first keeps the first."""

    spec: LoRASpec
    digest: str | None  # SHA-256 of the file at registration; None for in-memory tensors
    nbytes: int
    rank: int  # the largest rank over its targets
    targets: frozenset[str]
    adapter: str | None  # the PEFT adapter built with the manager; None: an added LoRA, held in a slot
    uid: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "uid", next(_uids))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source(self) -> str:
        return self.spec.source

    def __repr__(self) -> str:
        held = f"adapter {self.adapter!r}" if self.adapter is not None else "added"
        return (f"RegisteredLoRA({self.name!r}, rank={self.rank}, {len(self.targets)} layers, "
                f"{self.nbytes / 2**20:.1f} MiB, {held})")


@dataclass(frozen=True)
class ChosenLoRAs:
    """The LoRAs one request uses and their strength in each phase (0 where not given)."""

    entries: Mapping[str, RegisteredLoRA]
    strengths: Mapping[str, Mapping[Phase, float]]
    named: bool = True  # chosen by name (``loras={...}``), not every registered LoRA (``loras=None``)

    def phase(self, phase: Phase, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
        """Every chosen LoRA's strength in ``phase``, with a request's checked ``req.enter`` overrides."""
        out = {name: s[phase] for name, s in self.strengths.items()}
        if overrides is None:
            return out
        if not isinstance(overrides, Mapping):
            raise StrengthError(f"strengths must be a mapping of LoRA name to strength, got "
                                f"{type(overrides).__name__}")
        for name, value in overrides.items():
            if name not in out:
                known = ", ".join(map(repr, out)) or "none"
                if self.named:
                    raise StrengthError(f"strength override for LoRA {shown(name)}, which this request did not "
                                        f"choose; its LoRAs: {known}")
                raise StrengthError(f"strength override for unknown LoRA {shown(name)}; managed LoRAs: {known}")
            out[name] = check_strength(value, f"override for LoRA {name!r} in {phase.value}")
        return out

    def added(self) -> list[RegisteredLoRA]:
        """The chosen LoRAs that need a LoRA slot: added ones (not the manager's own adapters), named by
        the request or, under ``loras=None``, at a non-zero strength."""
        return [e for n, e in self.entries.items()
                if e.adapter is None and (self.named or any(s != 0.0 for s in self.strengths[n].values()))]


def _phase_strengths(name: str, value: object) -> dict[Phase, float]:
    if isinstance(value, Mapping):
        out = {Phase.STAGE1: 0.0, Phase.STAGE2: 0.0}
        for key, s in value.items():
            try:
                phase = parse_enum(Phase, key, f"phase in the strengths of LoRA {name!r}")
            except ConfigError as exc:
                raise StrengthError(str(exc)) from None
            out[phase] = check_strength(s, f"LoRA {name!r} in {phase.value}")
        return out
    strength = check_strength(value, f"LoRA {name!r}")
    return {Phase.STAGE1: strength, Phase.STAGE2: strength}


class LoRARegistry:
    """The registered LoRAs: published as a whole, atomically, on every add and remove."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: Mapping[str, RegisteredLoRA] = MappingProxyType({})

    @property
    def entries(self) -> Mapping[str, RegisteredLoRA]:
        """The registered LoRAs as of now (a read-only snapshot: later adds and removes do not change it)."""
        return self._entries

    def refuse_clash(self, name: str) -> None:
        if name in self._entries:
            raise LoRANameClashError(f"a LoRA named {name!r} is already registered ({self._entries[name].source}); "
                                     f"remove it first with manager.remove_lora({name!r}), or pick another name")

    def publish(self, entry: RegisteredLoRA) -> None:
        with self._lock:
            self.refuse_clash(entry.name)
            self._entries = MappingProxyType({**self._entries, entry.name: entry})

    def known(self, name: object) -> RegisteredLoRA:
        """The entry registered as ``name``, or an :class:`UnknownLoRAError`."""
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownLoRAError(f"no LoRA named {shown(name)} is registered; registered: "
                                   f"{', '.join(map(repr, self._entries)) or 'none'}")
        return entry

    def unpublish(self, name: object) -> RegisteredLoRA:
        with self._lock:
            entry = self.known(name)
            self._entries = MappingProxyType({n: e for n, e in self._entries.items() if n != name})
            return entry

    def choose(self, loras: object) -> ChosenLoRAs:
        """A request's ``loras=``: ``None`` (every registered LoRA at its spec's strengths) or a mapping
        of LoRA name to a strength for every phase, or to ``{"stage1": s1, "stage2": s2}``. Checked
        whole before anything moves."""
        entries = self._entries
        if loras is None:
            return ChosenLoRAs(entries, {n: dict(e.spec.strengths) for n, e in entries.items()},  # type: ignore[misc]
                               named=False)
        if not isinstance(loras, Mapping):
            raise StrengthError(f"loras= must be a mapping of LoRA name to strength, e.g. {{'style': 0.8, "
                                f"'distilled': {{'stage2': 1.0}}}}, or None; got {type(loras).__name__}")
        unknown = [n for n in loras if not isinstance(n, str) or n not in entries]
        if unknown:
            raise UnknownLoRAError(f"the request names LoRAs that are not registered: "
                                   f"{', '.join(shown(n) for n in unknown)}; registered: "
                                   f"{', '.join(map(repr, entries)) or 'none'} (add one with manager.add_lora)")
        strengths = {name: _phase_strengths(name, value) for name, value in loras.items()}
        return ChosenLoRAs(MappingProxyType({n: entries[n] for n in strengths}), strengths)
