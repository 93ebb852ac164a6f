"""Which entries of a managed DiT are guarded, and which model has which manager.

The guard is a forward pre-hook on each DiT the manager runs (its top-level call) and on each of
its numbered blocks (``transformer_blocks.7``: the first numbered module on a path, the unit a DiT
runs in order). A Linear called on its own is not guarded: a hook on each of the 1344 adapted
layers would cost every DiT call more than the whole check is worth. The check itself is the
manager's (:meth:`ResidencyManager._forward_guard`): it refuses a run in a transient state, in
quarantine, after ``close()``, on a DiT that is not the active one, and (``strict``) outside a
request's phase.

One model takes one live manager: two would each refuse the other's runs, and each would take
the other's merges for drift. :func:`claim` refuses a model that shares a module with a model a
live manager holds, naming that manager.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from .domain import TRANSIENT_STATES, Residency, WeightState
from .errors import ForwardGuardError, ManagerClosedError, ModelInUseError
from .ops.ahead import block_of

if TYPE_CHECKING:
    from .faults import FaultInjector
    from .machine import WeightMachine
    from .modes import OriginalMode
    from .ops.ahead import MergeAhead
    from .ops.clean_source import HostCopy
    from .ops.dynamic import PeftAdapters
    from .ownership import Ownership
    from .request import Request

#: model -> its manager (weakly: a model and a manager nobody holds any more are freed together)
_CLAIMS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def blocks_of(root: nn.Module) -> list[nn.Module]:
    """The numbered blocks of ``root`` (``transformer_blocks.0``, ...): the blocks merging ahead
    groups layers by (:func:`~ltx2_residency.ops.ahead.block_of` of a layer inside one)."""
    return [m for name, m in root.named_modules() if name and block_of(f"{name}.x") == name]


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
                handles.append(root.register_forward_pre_hook(on_call))
                check = on_block(root)
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


class GuardedDiT:
    """The manager's side of the guard: the check each guarded call runs, and giving the model back.
    (A base of :class:`~ltx2_residency.manager.ResidencyManager`, which holds the state read here.)"""

    transformer: nn.Module
    machine: WeightMachine
    strict: bool
    faults: FaultInjector
    _closed: bool
    _grad: dict[str, bool]
    _ahead: MergeAhead | None
    _mode: OriginalMode
    _request: Request | None
    _ownership: Ownership
    _clean_source: HostCopy | None
    _adapters: PeftAdapters
    _guard: ForwardGuard

    @property
    def closed(self) -> bool:
        return self._closed

    def _refuse_if_closed(self, what: str) -> None:
        if self._closed:
            raise ManagerClosedError(f"{what}: this manager was closed (it gave the model back); build a new "
                                     "ResidencyManager on the model to manage it again")

    def _give_back(self) -> None:
        """The model as it was given: hooks off, PEFT's wrappers gone, ``requires_grad`` as it was,
        unclaimed. Idempotent (a failed constructor and ``close()`` both end here)."""
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.remove(self.transformer)  # a stage-2 copy keeps its guard: it refuses once closed
        adapters = getattr(self, "_adapters", None)
        if adapters is not None:
            adapters.remove()
        for name, p in self.transformer.named_parameters():
            if name in self._grad:
                p.requires_grad_(self._grad[name])
        unclaim(self.transformer, self)

    def _forward_guard(self, module: nn.Module, args: Any) -> None:
        """A DiT's own call: checked, then counted (and admitted by a merge ahead)."""
        self._check_run(module)
        req = self._request
        self.faults.hit("forward")
        if self._ahead is not None:
            self._ahead.admit()  # one of the calls announced with req.prepare(), or refused
        if req is not None:
            req.calls += 1

    def _block_guard(self, root: nn.Module) -> Callable[[nn.Module, Any], None]:
        """A block's call: the same check for the DiT it belongs to (inside a DiT call it passes)."""
        return lambda block, args: self._check_run(root)

    def _check_run(self, module: nn.Module) -> None:
        if self._closed:
            raise ManagerClosedError("this DiT belongs to a closed manager and refuses to run; the model the "
                                     "manager was built on was given back by close()")
        state = self.machine.state
        if state in TRANSIENT_STATES or (state is WeightState.PREMERGING and self._ahead is None):
            raise ForwardGuardError(f"the DiT cannot run while its weights are {state.value} "
                                    "(a weight operation is under way)")
        if state is WeightState.QUARANTINED:
            raise ForwardGuardError("the DiT is quarantined and refuses to run. " + self._repair_hint())
        active = self._mode.active
        if module is not active.module or active.residency is not Residency.RESIDENT:
            raise ForwardGuardError(
                f"the {'stage-2' if module is not self._mode.base.module else 'base'} DiT ran while "
                f"the active DiT is {active.name!r} ({active.residency.value}); run the module "
                "`req.enter(phase)` returned"
            )
        req = self._request
        if self.strict and (req is None or not self._ownership.mine or req.phase is None):
            raise ForwardGuardError(
                "the managed DiT ran outside a request phase; run it inside "
                "`with manager.request() as req:` on the module `req.enter(phase)` returns "
                "(or build the manager with strict=False)"
            )

    def _repair_hint(self) -> str:
        if self._clean_source is None:
            return ("No clean source is kept (clean_source=None): manager.repair() can only clear it when the "
                    "weights are still clean; otherwise reload the model.")
        return "Call manager.repair() to restore it from the clean host copy."

    def _quarantine_message(self) -> str:
        return "the DiT is quarantined after a failed restore. " + self._repair_hint()

