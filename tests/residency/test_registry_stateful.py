"""LoRAs chosen per request: the registry (``add_lora``/``remove_lora``/``loras``), its host cache and
device slots, driven at random and from several threads, and compared bit for bit with a reference.

The reference is a second manager built with every LoRA file of this module as its *own* LoRAs
(PEFT adapters made at construction): a request that runs added LoRA ``style`` (file F) at some
strengths must give, bit for bit, the outputs of the reference running its adapter F at the same
strengths. The reference is given each LoRA's strengths spelled out per phase
(``{"stage1": s1, "stage2": s2}``), resolved by the plain model here, whatever spelling the request
under test used. One reference per merge policy serves the whole module; it is checked clean at the end.

* :class:`RegistryMachine` (Hypothesis state machine): a real manager against a plain model (name ->
  which file content it was registered with). Rules add (a name clash, a file that does not fit),
  remove (an unknown name; the manager's own LoRA too), register another file under a name just
  removed, rewrite a file on disk after it was registered, and run requests with a
  random mix of LoRAs and strengths through none, one or both phases, in one go, or chosen now
  (``manager.request(loras=...)``) and entered and run in later steps while the registry changes.
  After every step: the managed weights hold their clean bits, the registry holds what the model
  says, the host cache is within its budget but for the LoRAs an entered request holds, at most
  two device slots exist. The host cache has room for about two LoRAs, so they are evicted and read
  from disk again.
* :func:`test_threads_run_requests_while_loras_come_and_go`: three threads run requests while a
  fourth adds and removes LoRAs; no deadlock, exact outputs, no drift.
* :func:`test_lora_removed_after_its_request_was_chosen_is_still_applied`, and
  :func:`test_a_file_changed_after_registration_is_refused_when_read_again`.
* Regressions found while writing these (they fail until fixed, see their docstrings).

The managers under test use ``lora_slot_rank=8`` (the largest rank of these LoRAs): with the default
slot rank of 128 a dynamic phase runs some layers in another form than the reference, and the outputs
differ in their last bits (a bug: see
:func:`test_added_lora_runs_dynamic_as_its_own_adapter_at_the_default_slot_rank`).
"""

from __future__ import annotations

import copy
import functools
import random
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ltx2_residency import (
    LoRACacheError,
    LoRAChangedError,
    LoRAFitError,
    LoRANameClashError,
    LoRASpec,
    ManagerOptions,
    Phase,
    RegisteredLoRA,
    Request,
    RequestScope,
    ResidencyError,
    ResidencyManager,
    UnknownLoRAError,
)
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits
from machines import material, step_report
from strategies import lora_request_strengths, lora_spec_strengths, phase_counts
from untouched import assert_same_bits

#: Seconds a request may wait for the DiT, and threads are given to finish: a bound, never a pace.
DEADLINE = 300.0
#: The host LoRA cache's budget: about two of the LoRAs below (asserted in ``kit()``).
HOST_BUDGET = 64 * 1024
#: The LoRA slots' rank: the largest rank of the valid LoRAs below.
SLOT_RANK = 8
PHASES = (Phase.STAGE1, Phase.STAGE2)
POLICIES = ("merge", "dynamic")

STEPS: Counter[str] = Counter()
_report_steps = step_report(STEPS, __name__)


# ---------------------------------------------------------------- LoRA files


@dataclass(frozen=True)
class Recipe:
    """A synthetic LoRA: the block linears matching ``pattern`` (plus ``extra`` layers), its rank,
    alpha and seed."""

    pattern: str
    rank: int
    alpha: float | None
    seed: int
    extra: tuple[str, ...] = ()


#: LoRAs a manager built with the distilled LoRA takes: ranks 2..8, different layer subsets.
VALID: dict[str, Recipe] = {
    "attn_r4": Recipe(r"\.attn[12]\.", 4, 8.0, 21),
    "attn_r2": Recipe(r"\.attn[12]\.", 2, None, 22),
    "ff_r6": Recipe(r"\.(audio_)?ff\.", 6, 3.0, 23),
    "audio_r8": Recipe(r"\.audio_attn[12]\.", 8, 16.0, 24),
    "cross_r3": Recipe(r"\.(audio_to_video|video_to_audio)_attn\.", 3, None, 25),
    "wide_r2": Recipe(r"", 2, 4.0, 26),
}
#: LoRAs ``add_lora`` refuses with ``LoRAFitError``.
UNFIT: dict[str, Recipe] = {
    "too_big": Recipe(r"", 8, None, 31),  # larger than the host cache
    "rank_high": Recipe(r"\.audio_attn1\.", 12, None, 32),  # above the slots' rank
    "outside": Recipe(r"\.0\.attn1\.to_q$", 4, None, 33, extra=("proj_out",)),  # a layer not managed
}


@dataclass(frozen=True)
class Kit:
    base: torch.nn.Module  # never mutated
    inputs: Mapping[str, Any]
    distilled: str
    files: Mapping[str, str]  # content key -> its file (VALID and UNFIT)
    targets: Mapping[str, frozenset[str]]
    ranks: Mapping[str, int]
    nbytes: Mapping[str, int]


_TMP: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def kit() -> Kit:
    mat = material()
    base = mat.base
    linears = linear_names(base)
    tmp = tempfile.TemporaryDirectory(prefix="ltx2-registry-")
    _TMP.append(tmp)
    root = Path(tmp.name)
    files, targets, ranks, nbytes = {}, {}, {}, {}
    for key, r in {**VALID, **UNFIT}.items():
        names = [n for n in linears if re.search(r.pattern, n)] + list(r.extra)
        tensors = synthetic_lora(base, names, rank=r.rank, relative_norm=0.15, seed=r.seed, alpha=r.alpha)
        files[key] = save_lora(root / f"{key}.safetensors", tensors)
        targets[key] = frozenset(names)
        ranks[key] = r.rank
        nbytes[key] = sum(t.numel() * t.element_size() for k, t in tensors.items() if "lora_" in k)
    sizes = sorted(nbytes[k] for k in VALID)
    assert sizes[-1] <= HOST_BUDGET < sizes[-1] + sizes[-2], "the host cache must hold about two LoRAs"
    assert nbytes["too_big"] > HOST_BUDGET and nbytes["rank_high"] <= HOST_BUDGET
    assert max(ranks[k] for k in VALID) == SLOT_RANK < ranks["rank_high"]
    return Kit(base, mat.inputs, mat.lora_paths["distilled"], files, targets, ranks, nbytes)


# ---------------------------------------------------------------- the reference

_REFS: dict[str, tuple[ResidencyManager, dict[str, torch.Tensor]]] = {}


def reference(policy: str) -> ResidencyManager:
    """A manager with the distilled LoRA and every valid LoRA file as its own, named by content key."""
    if policy not in _REFS:
        k = kit()
        specs = [LoRASpec("distilled", path=k.distilled)] + [LoRASpec(c, path=k.files[c]) for c in VALID]
        ref = ResidencyManager(copy.deepcopy(k.base), "original", specs, policy,
                               options=ManagerOptions(request_timeout=DEADLINE))
        _REFS[policy] = (ref, weight_bits(ref.managed_weights))
    return _REFS[policy][0]


@pytest.fixture(scope="module", autouse=True)
def _close_references() -> Iterator[None]:
    yield
    while _REFS:
        _, (ref, clean) = _REFS.popitem()
        assert_same_bits(clean, weight_bits(ref.managed_weights))
        ref.close()


def run(scope: RequestScope, phases: int) -> list[torch.Tensor]:
    """Enter the scope and ``phases`` phases, one DiT call each; the outputs."""
    with torch.no_grad(), scope as req:
        return run_phases(req, phases)


def run_phases(req: Request, phases: int) -> list[torch.Tensor]:
    inputs = kit().inputs
    with torch.no_grad():
        return [req.enter(phase)(**inputs)[0] for phase in PHASES[:phases]]


def expected(policy: str, ref_loras: Mapping[str, Mapping[str, float]], phases: int) -> list[torch.Tensor]:
    return run(reference(policy).request(loras=ref_loras), phases)


def assert_exact(got: list[torch.Tensor], want: list[torch.Tensor], what: object) -> None:
    assert len(got) == len(want)
    for phase, g, w in zip(PHASES, got, want, strict=False):
        assert torch.equal(g, w), (f"{phase.value} output of {what} differs from the reference by up to "
                                   f"{(g.float() - w.float()).abs().max().item():.3g}")


def per_phase(value: object) -> dict[str, float]:
    """A request's strength for one LoRA, every phase spelled out (the documented rules, not the code's)."""
    out = {"stage1": 0.0, "stage2": 0.0}
    if isinstance(value, Mapping):
        for phase, s in value.items():
            out[Phase(phase).value] = float(s)
    else:
        out = dict.fromkeys(out, float(value))  # type: ignore[arg-type]
    return out


def clean_manager(model: torch.nn.Module, policy: str) -> ResidencyManager:
    """The manager under test: the distilled LoRA its own, added LoRAs in two slots of rank 8."""
    options = ManagerOptions(lora_slot_rank=SLOT_RANK, host_lora_cache_bytes=HOST_BUDGET, request_timeout=DEADLINE)
    return ResidencyManager(model, "original", [LoRASpec("distilled", path=kit().distilled)], policy, options=options)


# ---------------------------------------------------------------- the state machine

#: Names the machine registers under ("distilled" is the manager's own LoRA at the start).
NAMES = ("distilled", "style", "detail", "motion", "grain")
#: Files the machine's LoRAs are read from: each holds one VALID content, rewritten by ``tamper``.
PATHS = ("p0", "p1", "p2", "p3")


@dataclass
class Registered:
    """The model's view of one registered name."""

    content: str  # the content key it was registered with (the reference's adapter)
    path: str | None  # the machine's file it was read from (None: the manager's own LoRA)
    strengths: dict[str, float]  # its spec's strengths, per phase
    entry: RegisteredLoRA

    @property
    def own(self) -> bool:
        return self.path is None


@dataclass
class Pending:
    """A request chosen with ``manager.request(loras=...)``, maybe entered, not run yet."""

    scope: RequestScope
    chosen: list[Registered]  # the added LoRAs it chose
    ref_loras: dict[str, dict[str, float]] | None  # None: not comparable
    phases: int
    req: Request | None = None


@dataclass
class Mix:
    loras: dict[str, object] | None  # what the request under test is given
    error: type[ResidencyError] | None  # what ``manager.request()`` must raise
    chosen: list[Registered] = field(default_factory=list)  # its added LoRAs (loaded into slots)
    ref_loras: dict[str, dict[str, float]] | None = None  # None: not comparable (one file twice)


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: ResidencyManager | None = None
        self.pending: Pending | None = None

    @initialize(policy=st.sampled_from(POLICIES),
                contents=st.lists(st.sampled_from(sorted(VALID)), min_size=len(PATHS), max_size=len(PATHS)))
    def build(self, policy: str, contents: list[str]) -> None:
        STEPS["examples"] += 1
        k = kit()
        self.tmp = tempfile.TemporaryDirectory(prefix="ltx2-registry-machine-")
        self.paths = {p: str(Path(self.tmp.name) / f"{p}.safetensors") for p in PATHS}
        self.disk: dict[str, str] = {}  # path key -> the content its file holds now
        for p, content in zip(PATHS, contents, strict=True):
            self._write(p, content)
        self.policy = policy
        self.model = copy.deepcopy(k.base)
        self.model_bits = weight_bits(dict(self.model.named_parameters()))
        self.mgr = clean_manager(self.model, policy)
        self.clean = weight_bits(self.mgr.managed_weights)
        own = self.mgr.loras["distilled"]
        self.reg: dict[str, Registered] = {
            "distilled": Registered("distilled", None, {"stage1": 0.0, "stage2": 1.0}, own)}
        self.seen: set[tuple[str, frozenset[str]]] = set()

    def _write(self, path: str, content: str) -> None:
        shutil.copyfile(kit().files[content], self.paths[path])
        self.disk[path] = content

    # ------------------------------------------------------------ the registry
    def _fresh(self, check: str) -> bool:
        """Refusals change nothing: each is tried once per registry state, the steps go to changes."""
        return (check, frozenset(self.reg)) not in self.seen

    def _done(self, check: str) -> None:
        self.seen.add((check, frozenset(self.reg)))

    def _unregistered(self) -> list[str]:
        return [n for n in NAMES if n not in self.reg]

    @precondition(lambda self: self._unregistered())
    @rule(data=st.data(), source=st.sampled_from(PATHS), strengths=lora_spec_strengths)
    def add(self, data: st.DataObject, source: str, strengths: dict[str, float] | None) -> None:
        assert self.mgr is not None
        k = kit()
        name = data.draw(st.sampled_from(self._unregistered()), label="name")
        content = self.disk[source]
        STEPS["add"] += 1
        before = self.mgr.loras
        path = self.paths[source] if data.draw(st.booleans(), label="str path") else Path(self.paths[source])
        spec = (LoRASpec(name, path=path) if strengths is None
                else LoRASpec(name, path=path, strengths=strengths))
        entry = self.mgr.add_lora(spec)
        assert isinstance(entry, RegisteredLoRA)
        assert (entry.name, entry.adapter, entry.rank) == (name, None, k.ranks[content])
        assert entry.targets == k.targets[content]
        assert name not in before, "mgr.loras is a snapshot: an add must not change an earlier one"
        self.reg[name] = Registered(content, source, per_phase(strengths or {"stage2": 1.0}), entry)

    @precondition(lambda self: self._fresh("add_refused"))
    @rule(data=st.data())
    def add_refused(self, data: st.DataObject) -> None:
        """A name already registered, or a file the manager cannot hold: refused, nothing changes."""
        assert self.mgr is not None
        self._done("add_refused")
        clash = not self._unregistered() or (self.reg and data.draw(st.booleans(), label="clash"))
        if clash:
            name = data.draw(st.sampled_from(sorted(self.reg)), label="name")
            source = data.draw(st.sampled_from(PATHS + tuple(UNFIT)), label="source")
        else:
            name = data.draw(st.sampled_from(self._unregistered()), label="name")
            source = data.draw(st.sampled_from(sorted(UNFIT)), label="source")
        path = self.paths.get(source, kit().files.get(source))
        before = self.mgr.loras
        host_before = self.mgr.lora_cache_stats()["host"]
        STEPS["add_clash" if clash else f"add_unfit:{source}"] += 1
        with pytest.raises(LoRANameClashError if clash else LoRAFitError):
            self.mgr.add_lora(LoRASpec(name, path=path))
        assert dict(self.mgr.loras) == dict(before)
        assert self.mgr.lora_cache_stats()["host"]["bytes"] == host_before["bytes"], "a refused LoRA was cached"

    @precondition(lambda self: self.reg)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        assert self.mgr is not None
        name = data.draw(st.sampled_from(sorted(self.reg)), label="name")
        before = self.mgr.loras
        STEPS["remove_own" if self.reg[name].own else "remove"] += 1
        self.mgr.remove_lora(name)
        del self.reg[name]
        assert name in before, "mgr.loras is a snapshot: a remove must not change an earlier one"

    @precondition(lambda self: any(not r.own for r in self.reg.values()))
    @rule(data=st.data())
    def replace(self, data: st.DataObject) -> None:
        """Remove an added LoRA and register another file under its name: the name means the new one."""
        assert self.mgr is not None
        name = data.draw(st.sampled_from(sorted(n for n, r in self.reg.items() if not r.own)), label="name")
        old = self.reg[name].content
        source = data.draw(st.sampled_from([p for p in PATHS if self.disk[p] != old] or list(PATHS)), label="source")
        STEPS["replace"] += 1
        self.mgr.remove_lora(name)
        entry = self.mgr.add_lora(LoRASpec(name, path=self.paths[source]))
        assert entry is not self.reg[name].entry and entry.rank == kit().ranks[self.disk[source]]
        self.reg[name] = Registered(self.disk[source], source, per_phase({"stage2": 1.0}), entry)

    @precondition(lambda self: self._fresh("remove_unknown"))
    @rule(data=st.data())
    def remove_unknown(self, data: st.DataObject) -> None:
        assert self.mgr is not None
        self._done("remove_unknown")
        name = data.draw(st.sampled_from([*self._unregistered(), "ghost", "", 7]), label="name")
        before = self.mgr.loras
        STEPS["remove_unknown"] += 1
        with pytest.raises(UnknownLoRAError):
            self.mgr.remove_lora(name)  # type: ignore[arg-type]
        assert dict(self.mgr.loras) == dict(before)

    @precondition(lambda self: any(not r.own for r in self.reg.values()))
    @rule(data=st.data())
    def tamper(self, data: st.DataObject) -> None:
        """Rewrite a registered LoRA's file with another LoRA: the registered one must never run the
        new content (it runs from a cache, or is refused with LoRAChangedError when read again)."""
        path = data.draw(st.sampled_from(sorted({r.path for r in self.reg.values() if r.path})), label="path")
        content = data.draw(st.sampled_from(sorted(set(VALID) - {self.disk[path]})), label="new content")
        STEPS["tamper"] += 1
        self._write(path, content)

    # ------------------------------------------------------------ requests
    def _draw_mix(self, data: st.DataObject) -> Mix:
        added = sorted(n for n, r in self.reg.items() if not r.own)
        count = data.draw(st.sampled_from([c for c in (1, 2, 0, 3) if c <= len(added)]), label="added LoRAs")
        names = data.draw(st.permutations(added), label="added order")[:count]
        for name in sorted(n for n, r in self.reg.items() if r.own):
            if data.draw(st.booleans(), label=f"with {name}"):
                names.insert(data.draw(st.integers(0, len(names)), label="at"), name)
        if data.draw(st.sampled_from([False] * 5 + [True]), label="unknown name"):
            ghost = data.draw(st.sampled_from([n for n in (*NAMES, "ghost") if n not in self.reg]), label="unknown")
            names.insert(data.draw(st.integers(0, len(names)), label="at"), ghost)
        loras = {n: data.draw(lora_request_strengths, label=f"strength {n}") for n in names}
        if any(n not in self.reg for n in loras):
            return Mix(loras, UnknownLoRAError)
        chosen = [self.reg[n] for n in loras if not self.reg[n].own]
        if len(chosen) > 2:
            return Mix(loras, LoRACacheError)
        ref = {self.reg[n].content: per_phase(v) for n, v in loras.items()}
        return Mix(loras, None, chosen, ref if len(ref) == len(loras) else None)

    def _all_mix(self) -> Mix:
        """``loras=None``: every registered LoRA at its spec's strengths; the added ones at 0 are not loaded."""
        live = {n: r for n, r in self.reg.items() if r.own or any(r.strengths.values())}
        chosen = [r for r in live.values() if not r.own]
        if len(chosen) > 2:
            return Mix(None, LoRACacheError)
        ref = {r.content: dict(r.strengths) for r in live.values()}
        return Mix(None, None, chosen, ref if len(ref) == len(live) else None)

    def _stale(self, chosen: list[Registered]) -> bool:
        """A chosen LoRA's file no longer holds what was registered: a read from disk must refuse it."""
        return any(self.disk[r.path] != r.content for r in chosen)  # type: ignore[index]

    def _enter(self, pending: Pending) -> bool:
        """Enter a chosen request; False when it was refused because a file changed (then it is over)."""
        stale = self._stale(pending.chosen)
        try:
            pending.req = pending.scope.__enter__()
        except LoRAChangedError:
            assert stale, "LoRAChangedError, but every chosen LoRA's file is as registered"
            STEPS["changed_refused"] += 1
            return False
        if stale:
            STEPS["changed_but_cached"] += 1  # still held in the host cache or a slot: the registered content
        return True

    def _finish(self, pending: Pending) -> None:
        """Run the entered request's phases, leave it, compare with the reference."""
        assert pending.req is not None
        try:
            got = run_phases(pending.req, pending.phases)
        finally:
            pending.scope.__exit__(None, None, None)
        if pending.ref_loras is None:
            STEPS["not_compared"] += 1
            return
        STEPS[f"compared_{pending.phases}_phases"] += 1
        assert_exact(got, expected(self.policy, pending.ref_loras, pending.phases), pending.ref_loras)

    def _choose(self, mix: Mix, phases: int) -> Pending | None:
        assert self.mgr is not None
        if mix.error is not None:
            STEPS[f"refused:{mix.error.__name__}"] += 1
            with pytest.raises(mix.error):
                self.mgr.request(loras=mix.loras)
            return None
        STEPS["chosen_added"] += len(mix.chosen)
        return Pending(self.mgr.request(loras=mix.loras), mix.chosen, mix.ref_loras, phases)

    @precondition(lambda self: self.pending is None)
    @rule(data=st.data(), phases=phase_counts)
    def request(self, data: st.DataObject, phases: int) -> None:
        STEPS["request"] += 1
        pending = self._choose(self._draw_mix(data), phases)
        if pending is not None and self._enter(pending):
            self._finish(pending)

    @precondition(lambda self: self.pending is None)
    @rule(phases=phase_counts)
    def request_every_lora(self, phases: int) -> None:
        STEPS["request_every_lora"] += 1
        pending = self._choose(self._all_mix(), phases)
        if pending is not None and self._enter(pending):
            self._finish(pending)

    @precondition(lambda self: self.pending is None)
    @rule(data=st.data(), phases=phase_counts)
    def choose(self, data: st.DataObject, phases: int) -> None:
        """``manager.request(loras=...)`` now; entered and run in later steps, the registry changing meanwhile."""
        STEPS["choose"] += 1
        self.pending = self._choose(self._draw_mix(data), phases)

    @precondition(lambda self: self.pending is not None and self.pending.req is None)
    @rule()
    def enter_chosen(self) -> None:
        assert self.pending is not None
        STEPS["enter_chosen"] += 1
        if not self._enter(self.pending):
            self.pending = None

    @precondition(lambda self: self.pending is not None)
    @rule()
    def run_chosen(self) -> None:
        pending, self.pending = self.pending, None
        assert pending is not None
        STEPS["run_chosen"] += 1
        if pending.req is None and not self._enter(pending):
            return
        self._finish(pending)

    # ------------------------------------------------------------ invariants
    @invariant()
    def weights_are_clean(self) -> None:
        if self.mgr is not None:
            assert_same_bits(self.clean, weight_bits(self.mgr.managed_weights))

    @invariant()
    def registry_is_the_models(self) -> None:
        if self.mgr is None:
            return
        loras = self.mgr.loras
        assert set(loras) == set(self.reg)
        for name, r in self.reg.items():
            assert loras[name] is r.entry
            assert (loras[name].adapter is not None) == r.own

    @invariant()
    def caches_within_budget(self) -> None:
        if self.mgr is None:
            return
        stats = self.mgr.lora_cache_stats()
        held = self.pending.chosen if self.pending is not None and self.pending.req is not None else []
        in_use = sum({r.entry.uid: r.entry.nbytes for r in held}.values())
        assert stats["host"]["bytes"] <= max(HOST_BUDGET, in_use), stats["host"]
        assert stats["device"]["slots"] == 2 and 0 <= stats["device"]["slots_used"] <= 2, stats["device"]

    def teardown(self) -> None:
        if self.mgr is None:
            return
        try:
            if self.pending is not None and self.pending.req is not None:
                self.pending.scope.__exit__(None, None, None)
            assert_same_bits(self.clean, weight_bits(self.mgr.managed_weights))
        finally:
            self.mgr.close()
            self.tmp.cleanup()
        assert_same_bits(self.model_bits, weight_bits(dict(self.model.named_parameters())))


TestRegistryMachine = RegistryMachine.TestCase
# a step runs up to four DiT calls (on two managers): half the profile's examples, each as long
TestRegistryMachine.settings = settings(max_examples=max(10, settings.default.max_examples // 2))


# ---------------------------------------------------------------- many threads

#: The concurrency test's LoRA names and the contents they are always registered with.
THREAD_LORAS = {"a": "attn_r4", "b": "ff_r6", "c": "audio_r8"}
THREAD_MIXES: list[dict[str, object]] = [
    {},
    {"distilled": {"stage2": 1.0}},
    {"a": 1.0},
    {"b": {"stage2": 0.5}, "distilled": 0.25},
    {"a": 0.5, "c": 1.0, "distilled": {"stage2": 1.0}},
    {"c": 0.75},
    {"b": 1.0, "a": {"stage1": 0.25}},
    {"c": {"stage1": 1.0, "stage2": 0.5}, "b": 0.75},
]
REQUEST_THREADS, REQUESTS_PER_THREAD, ADMIN_OPS = 3, 20, 40


def _thread_ref(mix: Mapping[str, object]) -> dict[str, dict[str, float]]:
    return {THREAD_LORAS.get(n, n): per_phase(v) for n, v in mix.items()}


@pytest.mark.parametrize("policy", POLICIES)
def test_threads_run_requests_while_loras_come_and_go(policy: str) -> None:
    k = kit()
    want = [expected(policy, _thread_ref(mix), 2) for mix in THREAD_MIXES]
    model = copy.deepcopy(k.base)
    model_bits = weight_bits(dict(model.named_parameters()))
    mgr = clean_manager(model, policy)
    clean = weight_bits(mgr.managed_weights)
    for name in ("a", "b"):
        mgr.add_lora(LoRASpec(name, path=k.files[THREAD_LORAS[name]]))
    errors: list[str] = []
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    chosen = threading.Semaphore(0)  # one release per request chosen: paces the admin thread without a clock

    def requests(index: int) -> None:
        rng = random.Random(index)
        try:
            for _ in range(REQUESTS_PER_THREAD):
                live = set(mgr.loras)
                i = rng.choice([i for i, mix in enumerate(THREAD_MIXES) if set(mix) <= live])
                phases = rng.choice([0, 1, 2, 2])
                try:
                    scope = mgr.request(loras=THREAD_MIXES[i])
                except UnknownLoRAError:  # removed between the look at mgr.loras and the request: legal
                    with lock:
                        outcomes["unknown"] += 1
                    continue
                finally:
                    chosen.release()
                got = run(scope, phases)
                assert_exact(got, want[i][:phases], THREAD_MIXES[i])
                with lock:
                    outcomes[f"ran_{len(set(THREAD_MIXES[i]) & set(THREAD_LORAS))}_added"] += 1
        except BaseException:
            errors.append(f"request thread {index}:\n{traceback.format_exc()}")
            chosen.release(ADMIN_OPS)  # the admin thread is not left waiting for requests that will not come

    registered = {"a", "b"}

    def admin() -> None:
        rng = random.Random(99)
        try:
            for _ in range(ADMIN_OPS):
                assert chosen.acquire(timeout=DEADLINE), "no request was chosen for too long"
                name = rng.choice(sorted(THREAD_LORAS))
                if name in registered:  # only this thread adds and removes
                    mgr.remove_lora(name)
                    registered.remove(name)
                    outcomes["removed"] += 1
                else:
                    mgr.add_lora(LoRASpec(name, path=k.files[THREAD_LORAS[name]]))
                    registered.add(name)
                    outcomes["added"] += 1
        except BaseException:
            errors.append(f"admin thread:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=requests, args=(i,), name=f"requests{i}") for i in range(REQUEST_THREADS)]
    threads.append(threading.Thread(target=admin, name="admin"))
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + DEADLINE
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"threads still running (deadlock?): {alive}"
        assert not errors, "\n".join(errors)
        ran = sum(n for key, n in outcomes.items() if key.startswith("ran_"))
        assert ran + outcomes["unknown"] == REQUEST_THREADS * REQUESTS_PER_THREAD, outcomes
        assert outcomes["added"] + outcomes["removed"] == ADMIN_OPS
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
        stats = mgr.lora_cache_stats()
        assert stats["host"]["bytes"] <= HOST_BUDGET, stats["host"]
        assert stats["device"]["slots_used"] <= stats["device"]["slots"] == 2, stats["device"]
        assert set(mgr.loras) == {"distilled", *registered}
    finally:
        if not any(t.is_alive() for t in threads):
            mgr.close()
    assert_same_bits(model_bits, weight_bits(dict(model.named_parameters())))


# ---------------------------------------------------------------- removal after the request was chosen


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("then", ["removed", "replaced", "removed_inside"])
def test_lora_removed_after_its_request_was_chosen_is_still_applied(policy: str, then: str) -> None:
    """``request(loras=...)`` chose the LoRA: removing it (and registering another file under its name)
    before the ``with`` block, or inside it, changes nothing for that request."""
    k = kit()
    model = copy.deepcopy(k.base)
    model_bits = weight_bits(dict(model.named_parameters()))
    mgr = clean_manager(model, policy)
    clean = weight_bits(mgr.managed_weights)
    mgr.add_lora(LoRASpec("style", path=k.files["attn_r4"]))
    loras = {"style": 1.0, "distilled": {"stage2": 1.0}}
    ref_loras = {"attn_r4": per_phase(1.0), "distilled": per_phase({"stage2": 1.0})}
    want = expected(policy, ref_loras, 2)
    without = expected(policy, {"distilled": per_phase({"stage2": 1.0})}, 2)
    assert not torch.equal(want[1], without[1]), "the LoRA must change the output for this test to mean anything"
    try:
        scope = mgr.request(loras=loras)
        if then != "removed_inside":
            mgr.remove_lora("style")
            assert "style" not in mgr.loras
            with pytest.raises(UnknownLoRAError):
                mgr.request(loras={"style": 1.0})
            if then == "replaced":
                mgr.add_lora(LoRASpec("style", path=k.files["ff_r6"]))
        with torch.no_grad(), scope as req:
            if then == "removed_inside":
                mgr.remove_lora("style")
            got = run_phases(req, 2)
        assert_exact(got, want, f"the removed LoRA ({then})")
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
        if then == "replaced":  # the name now means the new file
            assert_exact(run(mgr.request(loras=loras), 2),
                         expected(policy, {"ff_r6": per_phase(1.0), "distilled": per_phase({"stage2": 1.0})}, 2),
                         "the LoRA registered again under the name")
        else:
            assert set(mgr.loras) == {"distilled"}
    finally:
        mgr.close()
    assert_same_bits(model_bits, weight_bits(dict(model.named_parameters())))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_file_changed_after_registration_is_refused_when_read_again(policy: str, tmp_path: Path) -> None:
    """A LoRA's file is hashed at ``add_lora``: while a cache holds the LoRA it runs what was registered;
    read from disk again after the file changed, it is refused (``LoRAChangedError``) and nothing moves."""
    k = kit()
    path = tmp_path / "style.safetensors"
    shutil.copyfile(k.files["attn_r4"], path)
    model = copy.deepcopy(k.base)
    model_bits = weight_bits(dict(model.named_parameters()))
    mgr = clean_manager(model, policy)
    clean = weight_bits(mgr.managed_weights)
    try:
        mgr.add_lora(LoRASpec("style", path=path))
        shutil.copyfile(k.files["attn_r2"], path)  # the same layers, another LoRA
        assert_exact(run(mgr.request(loras={"style": 1.0}), 2),
                     expected(policy, {"attn_r4": per_phase(1.0)}, 2), "a cached LoRA whose file changed")
        # two larger LoRAs push it out of the host cache (room for two) and out of both slots
        assert k.nbytes["attn_r4"] + k.nbytes["ff_r6"] > HOST_BUDGET
        mgr.add_lora(LoRASpec("big1", path=k.files["ff_r6"]))
        mgr.add_lora(LoRASpec("big2", path=k.files["wide_r2"]))
        run(mgr.request(loras={"big1": 1.0, "big2": 1.0}), 1)
        with pytest.raises(LoRAChangedError):
            run(mgr.request(loras={"style": 1.0, "big1": 0.5}), 2)
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
        assert set(mgr.loras) == {"distilled", "style", "big1", "big2"}  # a refusal unregisters nothing
        assert_exact(run(mgr.request(loras={"big1": 0.5, "distilled": 1.0}), 2),
                     expected(policy, {"ff_r6": per_phase(0.5), "distilled": per_phase(1.0)}, 2), "after the refusal")
        mgr.remove_lora("style")  # registered again: the file's new content
        assert mgr.add_lora(LoRASpec("style", path=path)).rank == k.ranks["attn_r2"]
        assert_exact(run(mgr.request(loras={"style": 1.0}), 2),
                     expected(policy, {"attn_r2": per_phase(1.0)}, 2), "the LoRA registered again")
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
    finally:
        mgr.close()
    assert_same_bits(model_bits, weight_bits(dict(model.named_parameters())))


# ---------------------------------------------------------------- regressions (bugs found here)


def test_added_lora_runs_dynamic_as_its_own_adapter_at_the_default_slot_rank() -> None:
    """An added LoRA, held in a LoRA slot of the default rank (128, zero-padded), must run a dynamic
    phase bit for bit as the same LoRA built into a manager as its own adapter.

    Fails: ``FusedForward.make`` (ops/forward.py) builds ``FusedLoRALinear`` from the slot's tensors,
    and ``FusedLoRALinear.__init__`` chooses between the factored form and the transient merge with
    ``merge_above_tokens(..., [d.rank for d in deltas])``: the slot's rank (128), not the rank of the
    LoRA it holds (4). Where a call's token count falls between the two crossovers (32 video tokens
    into the 32 -> 128 ``audio_to_video_attn.to_out.0`` of the tiny DiT: about 30 at rank 4, 49 at
    rank 128) the slot runs the factored form and the own adapter the transient merge; the roundings
    differ. (The merge policy is exact: the merge reads the zero padding exactly.)"""
    k = kit()
    layer = "transformer_blocks.0.audio_to_video_attn.to_out.0"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_lora(Path(tmp) / "one.safetensors",
                         synthetic_lora(k.base, [layer], rank=4, relative_norm=0.15, seed=5, alpha=8.0))
        distilled = LoRASpec("distilled", path=k.distilled)
        mgr = ResidencyManager(copy.deepcopy(k.base), "original", [distilled], "dynamic")
        ref = ResidencyManager(copy.deepcopy(k.base), "original", [distilled, LoRASpec("style", path=path)],
                               "dynamic")
        try:
            mgr.add_lora(LoRASpec("style", path=path))
            got = run(mgr.request(loras={"style": 1.0}), 1)
            want = run(ref.request(loras={"style": 1.0}), 1)
        finally:
            mgr.close()
            ref.close()
    assert_exact(got, want, "an added LoRA in a rank-128 slot")


def test_lora_removed_before_its_request_entered_is_freed_when_the_request_ends() -> None:
    """A LoRA removed between ``request(loras=...)`` and the ``with`` block is read from disk for that
    request, and must be dropped from the host cache when the request ends ("removed from the
    registry: freed once unused", lora_cache.HostCache).

    Fails: ``remove_lora`` -> ``HostCache.forget`` drops the (unused) copy at once and ``_drop`` clears
    its ``_gone`` mark; the request's admission then reads the file again and ``put`` caches it as a
    live LoRA. Released, it stays in the host cache: bytes nobody can use, counted against the budget
    until evicted; a LoRA given as ``tensors=`` is never evicted, so each one leaks for good."""
    k = kit()
    mgr = clean_manager(copy.deepcopy(k.base), "merge")
    try:
        mgr.add_lora(LoRASpec("style", path=k.files["attn_r4"]))
        scope = mgr.request(loras={"style": 1.0})
        mgr.remove_lora("style")
        run(scope, 1)
        host = mgr.lora_cache_stats()["host"]
    finally:
        mgr.close()
    assert (host["loras"], host["bytes"]) == (0, 0), f"a removed LoRA is still held after its last request: {host}"
