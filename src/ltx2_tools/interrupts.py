"""The interrupt sweep: a ``KeyboardInterrupt`` at every line the request path runs.

    python -m ltx2_tools.reliability interrupts            # every point, every scenario
    python -m ltx2_tools.reliability interrupts --every 7  # a deterministic sample

A dry run of each scenario counts the line events of the core's request path (the files in
:data:`SWEPT`: request entry and exit, ownership, the phase switches, the executor, the machine,
the guard, the modes, merge, merge ahead, the dynamic adapters, the side stream); then, for each
point ``n``, a fresh run raises ``KeyboardInterrupt`` from a ``sys.settrace`` hook at the ``n``-th
line event, which is how an interrupt lands between two lines (after a weight write and before its
bookkeeping, between a lock taken and a ``try``).
After each interrupt the outcome must be one of:

- ``CLEAN``: the manager says CLEAN and every managed weight is bit-identical to an independent
  copy taken before the request, or
- ``QUARANTINED``: the DiT refuses to run until ``repair()``, which brings it back bit for bit;

and in both cases the ownership lock is free (a new request starts within a second), no hook the
request installed is left behind, and the next request computes exactly what an untouched
manager computes. Scenarios with ``second`` interrupt once in the request's body and sweep the
second interrupt over the cleanup that follows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

import ltx2_residency
from ltx2_residency import (
    ForwardGuardError,
    LoRASpec,
    ManagerOptions,
    QuarantinedError,
    ResidencyError,
    ResidencyManager,
    WeightState,
    testing,
)

from .fixture import Fixture

_CORE = Path(ltx2_residency.__file__).parent
#: The core's files whose lines are swept (the request path and every weight write).
SWEPT = tuple(str(_CORE / f) for f in (
    "manager.py", "request.py", "gate.py", "ownership.py", "switch.py", "executor.py", "machine.py", "guard.py",
    "modes/original.py", "modes/resident.py", "modes/snapshot.py", "ops/merge.py", "ops/undo.py", "ops/exact.py",
    "ops/ahead.py", "ops/residency.py",
    "ops/dynamic.py", "ops/side_stream.py",
))

OUTCOMES = ("CLEAN", "QUARANTINED", "VIOLATION", "NOT REACHED")


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.ff = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(torch.nn.functional.gelu(self.attn(x)))


class BlockDiT(nn.Module):
    """The smallest model with a DiT's shape that the manager cares about: numbered blocks of
    Linears run in order (what merging ahead hooks), and a projection outside them. Each line
    of the request path runs as on LTX-2; a sweep point costs milliseconds instead of seconds."""

    def __init__(self, blocks: int = 2, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.transformer_blocks = nn.ModuleList(_Block(width) for _ in range(blocks))
        self.proj_out = nn.Linear(width, width)
        self.to(torch.bfloat16)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states)
        return self.proj_out(hidden_states)


def block_fixture(tmp: Path, blocks: int = 2) -> Fixture:
    """:class:`BlockDiT` with two LoRAs as files: one on every block Linear, one on the attention."""
    base = BlockDiT(blocks)
    targets = testing.linear_names(base)
    distilled = testing.save_lora(tmp / "distilled.safetensors",
                          testing.synthetic_lora(base, targets, rank=4, relative_norm=0.10, seed=1))
    user = testing.save_lora(tmp / "user.safetensors",
                     testing.synthetic_lora(base, [n for n in targets if n.endswith(".attn")], rank=2,
                                    relative_norm=0.15, seed=2))
    specs = [LoRASpec("distilled", distilled, {"stage1": 0.25, "stage2": 1.0}),
             LoRASpec("user", user, {"stage1": 1.0, "stage2": 0.5})]
    inputs = {"hidden_states": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}
    return Fixture(base, specs, inputs)


@dataclass(frozen=True)
class Scenario:
    """One request shape: the mode, the policy, per-phase strengths, whether stage 2 is merged ahead
    and whether the undo runs behind the caller (``undo_pending`` until the next user settles it)."""

    name: str
    policy: str
    ahead: bool = False
    hq: bool = False  # stage 1 applies the LoRAs too (the HQ recipe)
    second: bool = False  # the body is interrupted in stage 2; the sweep covers the cleanup
    mode: str = "original"
    behind: bool = False  # ManagerOptions(overlap_restore=True)


SCENARIOS = (
    Scenario("sglang", "sglang"),
    Scenario("dynamic", "dynamic"),
    Scenario("merge", "merge"),
    Scenario("merge, HQ", "merge", hq=True),
    Scenario("merge ahead", "merge", ahead=True),
    Scenario("merge, second interrupt in cleanup", "merge", second=True),
    Scenario("merge ahead, second interrupt in cleanup", "merge", ahead=True, second=True),
    Scenario("dynamic, second interrupt in cleanup", "dynamic", second=True),
    Scenario("merge, undo behind", "merge", behind=True),
    Scenario("merge ahead, undo behind, second interrupt in cleanup", "merge", ahead=True, second=True,
             behind=True),
    Scenario("resident", "merge", mode="resident"),
    Scenario("snapshot", "merge", mode="snapshot"),
)


class _Injected(KeyboardInterrupt):
    """The sweep's own interrupt (a KeyboardInterrupt: nothing may treat it as an error)."""


class LineInterrupt:
    """A ``sys.settrace`` hook raising ``_Injected`` at the ``at``-th line event of the swept files
    (``at=0``: counts only). Counting starts when :attr:`armed` is set."""

    def __init__(self, at: int = 0, armed: bool = True) -> None:
        self.at = at
        self.armed = armed
        self.seen = 0
        self.where: tuple[str, int, str] | None = None
        self.lines: list[tuple[str, int]] = []  # every counted event (file, line), in order

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        return self._local if frame.f_code.co_filename in SWEPT else None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and self.armed and self.where is None:
            self.seen += 1
            self.lines.append((Path(frame.f_code.co_filename).relative_to(_CORE).as_posix(), frame.f_lineno))
            if self.seen == self.at:
                code = frame.f_code
                self.where = (Path(code.co_filename).relative_to(_CORE).as_posix(), frame.f_lineno, code.co_name)
                raise _Injected(f"injected at {self.where}")
        return self._local

    @contextlib.contextmanager
    def installed(self) -> Iterator[LineInterrupt]:
        previous = sys.gettrace()
        sys.settrace(self._global)
        try:
            yield self
        finally:
            sys.settrace(previous)


@dataclass
class Point:
    scenario: str
    at: int
    where: str
    outcome: str
    detail: str


def _strengths(fx: Fixture, hq: bool) -> list[Any]:
    if hq:
        return fx.specs
    return [type(s)(s.name, s.path, {"stage1": 0.0, "stage2": s.strength("stage2")}) for s in fx.specs]


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _body(mgr: ResidencyManager, sc: Scenario, inputs: dict, tracer: LineInterrupt | None) -> torch.Tensor:
    """One request; returns stage 2's output. ``tracer`` is armed for the cleanup in ``second``."""
    with torch.no_grad(), mgr.request(timeout=1.0) as req:
        dit = req.enter("stage1")
        dit(**inputs)
        if sc.ahead:
            req.prepare("stage2", calls=1)
        dit(**inputs)
        out = req.enter("stage2")(**inputs)
        if sc.second:
            assert tracer is not None
            tracer.armed = True
            raise KeyboardInterrupt("the first interrupt, in stage 2")
    sample = out[0] if isinstance(out, tuple) else out.sample if hasattr(out, "sample") else out
    return (sample if isinstance(sample, torch.Tensor) else sample[0]).detach().clone()


class Sweep:
    """One scenario: a manager per point, checked against an untouched reference."""

    def __init__(self, fx: Fixture, sc: Scenario) -> None:
        self.fx, self.sc = fx, sc
        self.specs = _strengths(fx, sc.hq)
        ref = self._manager()
        self.clean = testing.weight_bits(ref.managed_weights)
        self.expected = _body(ref, dataclasses.replace(sc, second=False), fx.inputs, None)
        ref.close()

    def _manager(self) -> ResidencyManager:
        return ResidencyManager(copy.deepcopy(self.fx.base), mode=self.sc.mode, loras=self.specs,
                                merge_policy=self.sc.policy, options=ManagerOptions(overlap_restore=self.sc.behind))

    def count(self) -> int:
        """Line events of the swept files in one run of the scenario."""
        return len(self.lines())

    def lines(self) -> list[tuple[str, int]]:
        """The ``(file, line)`` of each point, in order (point ``n`` interrupts before ``lines()[n - 1]``)."""
        mgr = self._manager()
        tracer = LineInterrupt(0, armed=not self.sc.second)
        with tracer.installed(), contextlib.suppress(KeyboardInterrupt):
            _body(mgr, self.sc, self.fx.inputs, tracer)
        with contextlib.suppress(ResidencyError):
            mgr.close()
        return tracer.lines

    def point(self, at: int) -> Point:
        mgr = self._manager()
        hooks = _hooks(mgr.transformer)
        handler = signal.getsignal(signal.SIGINT)
        tracer = LineInterrupt(at, armed=not self.sc.second)
        raised: BaseException | None = None
        with tracer.installed():
            try:
                _body(mgr, self.sc, self.fx.inputs, tracer)
            except BaseException as exc:  # the sweep must see whatever escaped, Ctrl-C included
                raised = exc
        where = "{}:{} ({})".format(*tracer.where) if tracer.where else "-"
        if tracer.where is None:
            return Point(self.sc.name, at, where, "NOT REACHED", "the run ended before this point")
        outcome, detail = self._judge(mgr, hooks, raised)
        if signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
            outcome, detail = "VIOLATION", "the Ctrl-C handler was left replaced"
        with contextlib.suppress(Exception):
            mgr.close()
        return Point(self.sc.name, at, where, outcome, detail)

    def _judge(self, mgr: ResidencyManager, hooks: int, raised: BaseException | None) -> tuple[str, str]:
        if raised is not None and not isinstance(raised, (KeyboardInterrupt, QuarantinedError)):
            # an interrupt may surface as a typed error only when it quarantined the DiT
            return "VIOLATION", f"the interrupt became {type(raised).__name__}: {raised}"
        with contextlib.suppress(ResidencyError):
            mgr.synchronize(timeout=1.0)  # on a GPU the undo may still run on its side stream
        state = mgr.state
        if state is WeightState.QUARANTINED:
            try:
                with torch.no_grad():
                    mgr.transformer(**self.fx.inputs)
                return "VIOLATION", "quarantined, yet the DiT ran"
            except ForwardGuardError:
                pass
            try:
                mgr.repair(timeout=1.0)
            except Exception as exc:
                return "VIOLATION", f"repair failed: {exc!r}"
            outcome = "QUARANTINED"
        elif state is WeightState.CLEAN:
            outcome = "CLEAN"
        else:
            return "VIOLATION", f"left {state.value}"
        now = testing.weight_bits(mgr.managed_weights)
        drift = [n for n in self.clean if not torch.equal(self.clean[n], now[n])]
        if drift:
            return "VIOLATION", f"{outcome} but {len(drift)} weights differ, e.g. {drift[0]}"
        if _hooks(mgr.transformer) != hooks:
            return "VIOLATION", f"{_hooks(mgr.transformer) - hooks} hooks left behind"
        try:
            got = _body(mgr, dataclasses.replace(self.sc, second=False), self.fx.inputs, None)
        except BaseException as exc:
            return "VIOLATION", f"the next request failed: {exc!r}"
        if not torch.equal(got, self.expected):
            return "VIOLATION", "the next request computed something else"
        mgr.synchronize(timeout=1.0)
        if mgr.state is not WeightState.CLEAN:
            return "VIOLATION", f"the next request left {mgr.state.value}"
        return outcome, "bit-exact; next request exact"


def sweep(fx: Fixture, scenarios: tuple[Scenario, ...] = SCENARIOS, every: int = 1,
          progress: Callable[[Point], None] | None = None) -> list[Point]:
    """Every ``every``-th point of each scenario (deterministic: points ``1, 1+every, ...`` and the last)."""
    out: list[Point] = []
    for sc in scenarios:
        s = Sweep(fx, sc)
        total = s.count()
        for at in sorted({*range(1, total + 1, every), total}):
            p = s.point(at)
            out.append(p)
            if progress is not None:
                progress(p)
    return out


def render(points: list[Point]) -> str:
    lines = ["| scenario | points swept | CLEAN | QUARANTINED | violations |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in dict.fromkeys(p.scenario for p in points):
        row = [p for p in points if p.scenario == name and p.outcome != "NOT REACHED"]
        n = {o: sum(p.outcome == o for p in row) for o in OUTCOMES}
        lines.append(f"| {name} | {len(row)} | {n['CLEAN']} | {n['QUARANTINED']} | {n['VIOLATION']} |")
    bad = [p for p in points if p.outcome == "VIOLATION"]
    total = sum(p.outcome != "NOT REACHED" for p in points)
    lines += ["", f"{total} interrupts injected, {len(bad)} violations."]
    lines += [f"- {p.scenario} @ {p.where}: {p.detail}" for p in bad[:20]]
    return "\n".join(lines) + "\n"
