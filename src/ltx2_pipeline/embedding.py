"""The manager behind a stage-based serving engine's component-residency hooks.

A stage-based engine calls a residency strategy around every use of a component:
``prepare_for_use`` (a stage is about to use it: start moving or switching), ``wait_for_use``
(it is about to run: block until ready), ``finish_use`` (the stage is done with it) and
``prepare_after_request`` (the request is over: get ready for the next one), the shape of
sglang's hooks before 0.5.17 (for sglang itself see :mod:`ltx2_residency.integrations.sglang`).
:class:`PhaseHooks` maps those four calls onto one :class:`~ltx2_residency.ResidencyManager` request:

================================  ===================================================
engine hook                       manager
================================  ===================================================
first ``prepare_for_use``         ``manager.request()`` is opened (waits for the DiT)
``prepare_for_use(phase)``        ``req.enter(phase)``: restore the previous phase,
                                  apply this one (merge, attach, activate the
                                  pre-merged copy, start or await a prefetch)
``wait_for_use(phase)``           the module to run: ``enter`` has already waited
                                  (on the prefetch event, in snapshot mode)
``finish_use(phase)``             nothing: the weights stay as the phase left them
                                  until the next phase or the end of the request
``prepare_after_request(error)``  the request is closed: the shared DiT restored to
                                  clean (or quarantined if the undo fails), the
                                  low-VRAM base streaming back for the next request
================================  ===================================================

The engine must run the module ``wait_for_use`` returns (in snapshot and resident mode
stage 2 runs a second DiT), and must call ``prepare_after_request`` on every path out of a
request, passing the exception that ended it, so the DiT is never left mutated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from torch import nn

from ltx2_residency import Phase, Request, RequestStateError, ResidencyManager


class PhaseHooks:
    """A stage-based engine's residency hooks for the LTX-2 DiT, one manager request per engine request."""

    def __init__(self, manager: ResidencyManager) -> None:
        self.manager = manager
        self._stack: contextlib.ExitStack | None = None
        self._req: Request | None = None
        self._module: nn.Module | None = None
        self._phase: Phase | None = None

    @property
    def in_request(self) -> bool:
        return self._req is not None

    def prepare_for_use(self, phase: Phase | str, strengths: Mapping[str, float] | None = None, *,
                        loras: Mapping[str, float | Mapping[str, float]] | None = None) -> None:
        """Apply ``phase`` (``strengths``: this phase's overrides). ``loras`` chooses the request's
        LoRAs as ``manager.request(loras=...)`` does: at the request's first ``prepare_for_use``."""
        if self._req is None:
            stack = contextlib.ExitStack()
            self._req = stack.enter_context(self.manager.request(loras=loras))
            self._stack = stack
        elif loras is not None:
            raise RequestStateError("prepare_for_use(loras=...) chooses a request's LoRAs at its first "
                                    "prepare_for_use; this request is already open with its own")
        self._module = self._req.enter(phase, strengths=strengths)
        self._phase = self._req.phase

    def wait_for_use(self, phase: Phase | str) -> nn.Module:
        wanted = Phase(phase) if isinstance(phase, str) else phase
        if self._module is None or self._phase is not wanted:
            raise RequestStateError(f"wait_for_use({wanted.value!r}) without prepare_for_use({wanted.value!r}) "
                                    f"in this request (prepared: {self._phase and self._phase.value!r})")
        return self._module

    def finish_use(self, phase: Phase | str) -> None:
        """The weights stay as they are: restoring now and re-applying for the next use of the
        same phase would double the switch cost; the next phase or the request end undoes it."""

    def prepare_after_request(self, error: BaseException | None = None) -> None:
        """Close the request; ``error`` is what ended it (re-raised by the caller, not here)."""
        stack, self._stack, self._req, self._module, self._phase = self._stack, None, None, None, None
        if stack is None:
            return
        if error is None:
            stack.close()
        else:
            # the manager sees the failure exactly as a `with` block would show it
            stack.__exit__(type(error), error, error.__traceback__)
