"""Which entries of a managed DiT are guarded, and which model has which manager.

The guard is a forward pre-hook on each DiT the manager runs (its top-level call) and on each of
its numbered blocks (``transformer_blocks.7``: the first numbered module on a path, the unit a DiT
runs in order). A Linear called on its own is not guarded: a hook on each of the 1344 adapted
layers would cost every DiT call more than the whole check is worth. The check itself
(:class:`DiTGuard`) refuses a run in a transient state, in
quarantine, after ``close()``, on a DiT that is not the active one, and (``strict``) outside a
request's phase.

One model takes one live manager: two would each refuse the other's runs, and each would take
the other's merges for drift. :func:`claim` refuses a model that shares a module with a model a
live manager holds, naming that manager.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .domain import Residency, WeightState
from .errors import ForwardGuardError, ManagerClosedError, ModelInUseError
from .executor import Executor
from .gate import RequestGate
from .modes import TRANSIENT_STATES
from .ops.ahead import blocks_of
from .ops.graph_hooks import eager_only, outside_graphs

#: model -> its manager (weakly: a model and a manager nobody holds any more are freed together)
_CLAIMS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def claim(model: nn.Module, manager: object) -> None:
    """Record that ``manager`` holds ``model``; refuse if a live manager holds any of its modules."""
    mine = {id(m) for m in model.modules()}
    for other, ref in list(_CLAIMS.items()):
        holder = ref()
        if holder is None or holder is manager:
            continue
        if mine & {id(m) for m in other.modules()}:
            raise ModelInUseError(
                f"this model already has a live manager, {holder!r}: one model takes one manager (two "
                "would each refuse the other's runs and take its merges for drift). Call close() on "
                "that manager first, or build this one on another copy of the model")
    _CLAIMS[model] = weakref.ref(manager)


def unclaim(model: nn.Module, manager: object) -> None:
    ref = _CLAIMS.get(model)
    if ref is not None and ref() is manager:
        del _CLAIMS[model]


class ForwardGuard:
    """The guard's hooks on some DiTs; :meth:`remove` takes them off one DiT or all."""

    def __init__(self, roots: Iterable[nn.Module], on_call: Callable[[nn.Module, Any], None],
                 on_block: Callable[[nn.Module], Callable[[nn.Module, Any], None]]) -> None:
        self._handles: dict[int, list[Any]] = {}
        try:
            for root in roots:
                handles = self._handles.setdefault(id(root), [])
                handles.append(root.register_forward_pre_hook(outside_graphs(on_call)))
                check = eager_only(on_block(root))
                handles += [block.register_forward_pre_hook(check) for block in blocks_of(root)]
        except BaseException:
            self.remove()
            raise

    def remove(self, root: nn.Module | None = None) -> None:
        """Take the hooks off ``root`` (every DiT when ``None``). Idempotent, safe to interrupt."""
        for key in [id(root)] if root is not None else list(self._handles):
            handles = self._handles.get(key, [])
            while handles:
                handles[-1].remove()
                handles.pop()
            self._handles.pop(key, None)


class DiTGuard:
    """The check each guarded call runs, and the hooks that run it on every DiT of a mode."""

    def __init__(self, executor: Executor, gate: RequestGate, strict: bool) -> None:
        self.executor = executor
        self.gate = gate
        self.strict = strict
        self.hooks = ForwardGuard([d.module for d in executor.mode.dits], self.on_call, self.on_block)

    def on_call(self, module: nn.Module, args: Any) -> None:
        """A DiT's own call: checked, then counted (and admitted by a merge ahead)."""
        self.check_run(module)
        req = self.gate.request
        self.executor.faults.hit("forward")
        if self.executor.ahead is not None:
            self.executor.ahead.admit()  # one of the calls announced with req.prepare(), or refused
        if req is not None:
            req.calls += 1

    def on_block(self, root: nn.Module) -> Callable[[nn.Module, Any], None]:
        """A block's call: the same check for the DiT it belongs to (inside a DiT call it passes)."""
        return lambda block, args: self.check_run(root)

    def check_run(self, module: nn.Module) -> None:
        if self.gate.closed:
            raise ManagerClosedError("this DiT belongs to a closed manager and refuses to run; the model the "
                                     "manager was built on was given back by close()")
        ex = self.executor
        state = ex.state
        if state in TRANSIENT_STATES or (state is WeightState.MERGING_AHEAD and ex.ahead is None):
            raise ForwardGuardError(f"the DiT cannot run while its weights are {state.value} "
                                    "(a weight operation is under way)")
        if state is WeightState.QUARANTINED:
            raise ForwardGuardError("the DiT is quarantined and refuses to run. " + ex.repair_hint())
        active = ex.mode.active
        if module is not active.module or active.residency is not Residency.RESIDENT:
            raise ForwardGuardError(
                f"the {'stage-2' if module is not ex.mode.base.module else 'base'} DiT ran while "
                f"the active DiT is {active.name!r} ({active.residency.value}); run the module "
                "`req.enter(phase)` returned"
            )
        req = self.gate.request
        if self.strict and (req is None or not self.gate.ownership.mine or req.phase is None):
            raise ForwardGuardError(
                "the managed DiT ran outside a request phase; run it inside "
                "`with manager.request() as req:` on the module `req.enter(phase)` returns "
                "(or build the manager with ManagerOptions(strict=False))"
            )
