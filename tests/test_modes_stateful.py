"""A Hypothesis state machine drives the real ResidencyManager in mode 'resident' and 'snapshot'
(with and without low VRAM) through request lifecycles, stage-2 switches at the pre-merged
strength or an override, forwards and injected failures, and compares it after every step with
a plain Python model of the weight state and of where each DiT is.

The model is written from the documented behaviour (docs/architecture.md, the ``modes``
docstring), not from ``ltx2_residency.modes``: in particular the stage-2 DiT that snapshot mode
starts prefetching after stage 1 is expected to still be in flight (not re-copied) when stage 2
activates it. Weight cleanliness is checked with ``weight_bits``, independently of the
manager's fingerprints.

Requests are driven through the context manager's ``__enter__``/``__exit__`` by hand so a
request can stay open across steps. The number of steps run, by rule, is printed at the end of
the module's run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from conftest import assert_same_bits
from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import (
    FaultInjector,
    LoRASpec,
    QuarantinedError,
    Request,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits

S = WeightState
HQ = {"stage1": 0.25, "stage2": 1.0}
MODES = [("resident", False), ("snapshot", False), ("snapshot", True)]
#: Stage-2 strength overrides: None and 1.0 hit the pre-merged copy, 0.5 runs dynamic on the
#: base, 0.0 runs the bare base.
STAGE2_OVERRIDES: list[float | None] = [None, 1.0, 0.5, 0.0]
FAULT_POINTS = ["prefetch.before", "prefetch.after", "restore.before", "merge.layer"]

#: Rule executions of this module, by rule ("examples" counts fresh managers, not steps).
STEPS: Counter[str] = Counter()

# ---------------------------------------------------------------- module-level material
# RuleBasedStateMachine cannot take pytest fixtures: the read-only material is built once here.


@dataclass(frozen=True)
class _Material:
    base: nn.Module  # never mutated: every example deep-copies it
    lora_path: str
    targets: tuple[str, ...]
    inputs: Mapping[str, Any]


_TMP: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def _material() -> _Material:
    base = tiny_transformer(seed=0)
    linears = linear_names(base)
    tmp = tempfile.TemporaryDirectory(prefix="ltx2-modes-stateful-")
    _TMP.append(tmp)  # lives (and is cleaned up) with the process
    # the conftest distilled LoRA: every block linear, rank 8, ‖ΔW‖ = 10 % of ‖W‖
    path = save_lora(Path(tmp.name) / "distilled.safetensors",
                     synthetic_lora(base, linears, rank=8, relative_norm=0.10, seed=1))
    return _Material(base, path, tuple(linears), tiny_inputs(base, seed=0))


def _manager(mode: str, policy: str, low_vram: bool, faults: FaultInjector | None = None) -> ResidencyManager:
    mat = _material()
    return ResidencyManager(copy.deepcopy(mat.base), mode=mode,
                            loras=[LoRASpec(name="distilled", path=mat.lora_path, strengths=HQ)],
                            merge_policy=policy, low_vram=low_vram if mode == "snapshot" else None,
                            request_timeout=5.0, faults=faults)


@functools.cache
def _reference(phase: str, policy: str, stage2: float | None) -> torch.Tensor:
    """The output original mode gives for the same phase: the modes must not change a bit of it
    (stage 2 at the pre-merged strength equals an in-place merge at that strength)."""
    mgr = _manager("original", policy, False)
    mat = _material()
    with torch.no_grad(), mgr.request() as req:
        out = req.enter("stage1")(**mat.inputs)[0]
        if phase == "stage2":
            overrides = None if stage2 is None else {"distilled": stage2}
            out = req.enter("stage2", strengths=overrides)(**mat.inputs)[0]
    mgr.close()
    return out


@pytest.fixture(scope="module", autouse=True)
def _report_steps(request: pytest.FixtureRequest) -> Iterator[None]:
    STEPS.clear()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not STEPS:
        return
    steps = sum(n for k, n in STEPS.items() if k != "examples")
    detail = ", ".join(f"{k}={n}" for k, n in sorted(STEPS.items()) if k != "examples")
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{__name__}: {steps} steps over {STEPS['examples']} managers ({detail})")


class BodyError(Exception):
    """What a request body raises in the tests."""


def _exit_with(cm: contextlib.AbstractContextManager[Any], exc: BaseException) -> None:
    """Leave ``cm`` the way a ``with`` statement does when its body raised ``exc``."""
    try:
        raise exc
    except BaseException as raised:
        if not cm.__exit__(type(raised), raised, raised.__traceback__):
            raise


def _injected(kind: str) -> Callable[[], BaseException]:
    if kind == "oom":
        return lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
    return lambda: RuntimeError("injected failure")


# ---------------------------------------------------------------- the state machine


class ModesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mgr: ResidencyManager | None = None
        self.cm: contextlib.AbstractContextManager[Request] | None = None
        self.req: Request | None = None

    # ------------------------------------------------------------ set-up
    @initialize(mode=st.sampled_from(MODES), policy=st.sampled_from(["merge", "dynamic"]))
    def build(self, mode: tuple[str, bool], policy: str) -> None:
        STEPS["examples"] += 1
        self.mode, self.lv = mode
        self.snapshot = self.mode == "snapshot"
        self.policy = policy
        self.faults = FaultInjector()
        self.mgr = _manager(self.mode, policy, self.lv, self.faults)
        assert self.mgr.low_vram is self.lv
        self.clean_bits = weight_bits(self.mgr.managed_weights)
        assert set(self.clean_bits) == set(_material().targets)
        stage2 = self.mgr._mode.stage2
        assert stage2 is not None
        self.stage2_weights = {n: stage2.module.get_submodule(n).weight for n in self.clean_bits}
        self.stage2_bits = weight_bits(self.stage2_weights)
        # the copy holds the LoRA: a copy equal to the base would hide a missing merge
        assert any(not torch.equal(self.stage2_bits[n], self.clean_bits[n]) for n in self.clean_bits)
        # the plain model
        self.expected: WeightState = S.CLEAN
        self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}
        self.entered: list[str] = []
        self.active: str | None = None  # the phase whose DiT may run now
        self.active_key: tuple[str, str, float | None] | None = None
        self.failed = False
        self.dit: nn.Module | None = None
        self.forwarded: set[tuple[str, str, float | None]] = set()

    # ------------------------------------------------------------ model helpers
    @property
    def quarantined(self) -> bool:
        return self.expected is S.QUARANTINED

    @property
    def can_switch(self) -> bool:
        return self.req is not None and not self.failed and not self.quarantined and len(self.entered) < 2

    def _rolled_back(self, evicted: bool) -> None:
        """Where an apply failure (a fault before any restore can fail) leaves the DiTs."""
        if evicted:
            # the base was evicted for stage 2: it streams back, the state says offloaded
            self.expected = S.OFFLOADED
            self.res = {"base": "prefetching", "stage2": "offloaded"}
        else:
            self.expected = S.CLEAN
            self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}

    def _plan_stage1(self) -> tuple[set[str], Callable[[], None]]:
        """Fault points the stage-1 switch hits, and the model's update when it succeeds."""
        hits = {"merge.layer"} if self.policy == "merge" else set()
        if self.snapshot and not self.lv:
            hits |= {"prefetch.before", "prefetch.after"}  # stage 2 starts streaming in

        def apply() -> None:
            self.expected = S.STAGE1_MERGED if self.policy == "merge" else S.STAGE1_DYNAMIC
            self.res["base"] = "resident"  # low-VRAM: load_base waits for the base
            if self.snapshot and not self.lv:
                self.res["stage2"] = "prefetching"
        return hits, apply

    def _plan_stage2(self, override: float | None) -> tuple[set[str], Callable[[], None]]:
        strength = HQ["stage2"] if override is None else override
        premerged = strength == HQ["stage2"]
        hits = {"restore.before"}  # stage 1's change is undone first
        if premerged and self.snapshot and self.res["stage2"] == "offloaded":
            hits |= {"prefetch.before", "prefetch.after"}

        def apply() -> None:
            if premerged:
                self.expected = S.STAGE2_MERGED
                self.res = {"base": "offloaded" if self.lv else "resident", "stage2": "resident"}
            else:
                self.expected = S.STAGE2_DYNAMIC if strength != 0.0 else S.CLEAN
                self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}
        return hits, apply

    def _switch(self, phase: str, override: float | None, fault: tuple[str, str] | None) -> None:
        assert self.req is not None
        hits, apply = self._plan_stage1() if phase == "stage1" else self._plan_stage2(override)
        before = dict(self.faults.hits)
        made: list[BaseException] = []
        if fault is not None:
            point, kind = fault

            def make() -> BaseException:
                made.append(_injected(kind)())
                return made[-1]
            self.faults.arm(point, make)
        overrides = None if override is None else {"distilled": override}
        firing = fault is not None and fault[0] in hits
        try:
            if not firing:
                self.dit = self.req.enter(phase, strengths=overrides)
                apply()
                self.entered.append(phase)
                self.active = phase
                if phase == "stage1":
                    self.active_key = ("stage1", self.policy, None)
                else:
                    # one reference per distinct output: None and 1.0 both pick the pre-merged copy
                    self.active_key = ("stage2", "merge" if override in (None, 1.0) else "dynamic",
                                       None if override == 1.0 else override)
                if phase == "stage2" and self.expected is S.STAGE2_MERGED:
                    assert self.dit is self.mgr._mode.stage2.module  # type: ignore[union-attr]
                    if self.snapshot and not self.lv:
                        # the copy started after stage 1 is the one stage 2 runs on: no second
                        # host-to-device copy at the switch (that overlap is snapshot mode's point)
                        assert self.faults.hits.get("prefetch.before", 0) == before.get("prefetch.before", 0), \
                            "the stage-2 prefetch started after stage 1 was dropped and redone at the switch"
                        rec = [r for r in self.mgr.trace if r.event == "activate_stage2"][-1]  # type: ignore[union-attr]
                        assert rec.bytes_touched == 0, rec
                else:
                    assert self.dit is self.mgr._mode.base.module  # type: ignore[union-attr]
                return
            point, _ = fault  # type: ignore[misc]
            restore_failure = point == "restore.before"
            expected_type = QuarantinedError if restore_failure else BaseException
            with pytest.raises(expected_type) as info:
                self.req.enter(phase, strengths=overrides)
            assert made, f"{point} was expected to fire during the {phase} switch"
            STEPS[f"fault:{point}"] += 1
            if restore_failure:
                assert info.value.__cause__ is made[0]
                assert "quarantined" in str(info.value) and "repair()" in str(info.value)
                self.expected = S.QUARANTINED  # residency: the undo failed before moving anything
            else:
                assert info.value is made[0], "an apply failure propagates as raised"
                # low-VRAM evicts the base before the stage-2 prefetch that failed
                self._rolled_back(self.lv and phase == "stage2" and point.startswith("prefetch"))
            self.failed = True
            self.active = None
            self.active_key = None
        finally:
            self.faults.disarm()

    # ------------------------------------------------------------ rules
    @precondition(lambda self: self.req is None)
    @rule()
    def open_request(self) -> None:
        assert self.mgr is not None
        cm = self.mgr.request()
        if self.quarantined:
            STEPS["open_quarantined"] += 1
            with pytest.raises(QuarantinedError, match="repair"):
                cm.__enter__()
            return
        STEPS["open"] += 1
        self.req = cm.__enter__()
        self.cm = cm
        self.entered, self.active, self.active_key, self.failed = [], None, None, False

    @precondition(lambda self: self.can_switch and not self.entered)
    @rule()
    def enter_stage1(self) -> None:
        STEPS["enter_stage1"] += 1
        self._switch("stage1", None, None)

    @precondition(lambda self: self.can_switch and self.entered == ["stage1"])
    @rule(override=st.sampled_from(STAGE2_OVERRIDES))
    def enter_stage2(self, override: float | None) -> None:
        STEPS["enter_stage2"] += 1
        self._switch("stage2", override, None)

    @precondition(lambda self: self.can_switch)
    @rule(point=st.sampled_from(FAULT_POINTS), kind=st.sampled_from(["runtime", "oom"]),
          override=st.sampled_from(STAGE2_OVERRIDES))
    def faulty_switch(self, point: str, kind: str, override: float | None) -> None:
        STEPS["faulty_switch"] += 1
        phase = "stage2" if self.entered else "stage1"
        self._switch(phase, override if phase == "stage2" else None, (point, kind))

    def _close(self, body_error: bool) -> None:
        assert self.cm is not None
        cm, self.cm, self.req = self.cm, None, None
        self.active, self.active_key, self.dit = None, None, None
        if body_error:
            exc = BodyError("client went away")
            with pytest.raises(BodyError) as info:
                _exit_with(cm, exc)
            assert info.value is exc, "the body's exception is not swallowed or replaced"
        else:
            cm.__exit__(None, None, None)
        if self.expected in (S.STAGE1_MERGED, S.STAGE1_DYNAMIC, S.STAGE2_DYNAMIC):
            self.expected = S.CLEAN
            self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}
        elif self.expected is S.STAGE2_MERGED:
            if self.lv:
                self.expected = S.OFFLOADED
                self.res = {"base": "prefetching", "stage2": "offloaded"}
            else:
                self.expected = S.CLEAN
                self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}

    @precondition(lambda self: self.req is not None)
    @rule(body_error=st.booleans())
    def close_request(self, body_error: bool) -> None:
        STEPS["close_error" if body_error else "close"] += 1
        self._close(body_error)

    @precondition(lambda self: self.req is not None and self.res["stage2"] == "prefetching")
    @rule(body_error=st.booleans())
    def close_during_prefetch(self, body_error: bool) -> None:
        STEPS["close_during_prefetch"] += 1
        self._close(body_error)
        # a quarantined DiT keeps whatever the failed undo left (repair cancels it)
        if not self.quarantined:
            assert self.mgr is not None and self.mgr.memory()["stage2_in_flight_bytes"] == 0

    # a forward of the tiny DiT costs ~0.6 s on 2 CPU cores: once per distinct output per manager
    @precondition(lambda self: self.req is not None and self.active is not None and not self.quarantined
                  and self.active_key not in self.forwarded)
    @rule()
    def forward(self) -> None:
        STEPS["forward"] += 1
        assert self.dit is not None and self.active_key is not None
        with torch.no_grad():
            out = self.dit(**_material().inputs)[0]
        assert torch.equal(out, _reference(*self.active_key)), self.active_key
        self.forwarded.add(self.active_key)

    @precondition(lambda self: self.req is None and self.quarantined)
    @rule()
    def repair(self) -> None:
        STEPS["repair"] += 1
        assert self.mgr is not None
        self.mgr.repair()
        self.expected = S.CLEAN
        self.res = {"base": "resident", "stage2": "offloaded" if self.snapshot else "resident"}
        self.mgr.verify_clean()

    # ------------------------------------------------------------ invariants
    @invariant()
    def state_and_residency_match(self) -> None:
        if self.mgr is None:
            return
        assert self.mgr.state is self.expected, (self.mgr.state, self.expected)
        res = self.mgr.residency()
        assert res == self.res, (res, self.res)
        if self.lv:
            assert not (res["base"] == "resident" and res["stage2"] == "resident"), res

    @invariant()
    def idle_dit_is_settled(self) -> None:
        if self.mgr is None or self.req is not None or self.quarantined:
            return
        res = self.mgr.residency()
        moving = {n for n, r in res.items() if r == "prefetching"}
        assert moving <= ({"base"} if self.lv else set()), res
        assert self.mgr.memory()["stage2_in_flight_bytes"] == 0
        assert_same_bits(self.clean_bits, weight_bits(self.mgr.managed_weights))

    @invariant()
    def stage2_copy_never_changes(self) -> None:
        if self.mgr is None:
            return
        stage2 = self.mgr._mode.stage2
        assert stage2 is not None
        # the same Parameter objects: a prefetch or release rebinds their data, never replaces them
        now = {n: stage2.module.get_submodule(n).weight for n in self.stage2_weights}
        assert all(now[n] is self.stage2_weights[n] for n in now)
        assert_same_bits(self.stage2_bits, weight_bits(now))

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        if self.mgr is None:
            return
        try:
            if self.cm is not None:
                self.cm.__exit__(None, None, None)
                assert self.mgr.state in (S.CLEAN, S.OFFLOADED, S.QUARANTINED)
        finally:
            self.faults.disarm()
            self.mgr.close()


# Each step switches or runs a real (tiny) DiT, ~0.5 s on 2 CPU cores, and each example builds a
# pre-merged copy: a fraction of the loaded profile's budget keeps CI under 90 s; soak scales it.
_profile = settings()
TestModesMachine = ModesMachine.TestCase
TestModesMachine.settings = settings(_profile, max_examples=max(2, _profile.max_examples // 2),
                                     stateful_step_count=_profile.stateful_step_count)
