"""Who holds the DiT: the open request, and the calls that need the DiT between requests.

A request is opened by :class:`~.request.RequestScope` through :meth:`RequestGate.open_request`
(the DiT taken, a pending undo settled, the DiT refused when quarantined) and closed by
:meth:`RequestGate.close_request` (undo, verify, forget the request), which the scope runs twice
so that an interrupted close is finished. Between requests, :meth:`RequestGate.between_requests`
holds the DiT for one call (``verify_clean()``, ``synchronize()`` ...).
"""

from __future__ import annotations

from collections.abc import Callable

from .collective import Verdict
from .domain import WeightState
from .errors import ManagerClosedError, QuarantinedError, RequestStateError
from .executor import Executor
from .lockstep import Peers, Solo, digest_mismatch, replicated_digest
from .lora_cache import Admission, LoRACache
from .ownership import Holding, Ownership
from .request import Request
from .switch import PhaseSwitch


class RequestGate:
    """The DiT's one door: ownership, the open request, and whether the manager is closed."""

    def __init__(self, executor: Executor, switch: PhaseSwitch, cache: LoRACache, peers: Peers | None = None,
                 replicated: frozenset[str] = frozenset()) -> None:
        self.executor = executor
        self.peers: Peers = peers if peers is not None else Solo()
        self.replicated = replicated  # the managed weights every rank holds whole (compared across ranks)
        self.switch = switch
        self.cache = cache
        self.ownership = Ownership()
        self.request: Request | None = None
        self.closed = False

    def refuse_if_closed(self, what: str) -> None:
        if self.closed:
            raise ManagerClosedError(f"{what}: this manager was closed (it gave the model back); build a new "
                                     "ResidencyManager on the model to manage it again")

    def admit(self, admission: Admission) -> None:
        """Before the wait for the DiT: the request's added LoRAs held in the host cache, and read
        from disk meanwhile where they are not."""
        self.refuse_if_closed("request()")
        self.cache.admit(admission)

    def open_request(self, timeout: float | None, admission: Admission) -> Request:
        """The request scope's entry: its ``ExitStack`` already holds the release and the close.
        With several ranks the request opens on every rank or on none (a quarantined rank
        quarantines every rank)."""
        ex = self.executor
        req, _ = self.peers.step("open", lambda: self._open(timeout, admission),
                                 quarantined=lambda: ex.state is WeightState.QUARANTINED,
                                 digest=self.verified_digest, undo=self._refuse_opened)
        req.in_step = True
        return req

    def _open(self, timeout: float | None, admission: Admission) -> Request:
        self.refuse_if_closed("request()")
        self.ownership.acquire(timeout, "request()")
        self.refuse_if_closed("request()")  # closed while this request waited: the model was given back
        self.executor.settle()
        req = self.request = Request(self.switch, admission.chosen)
        if self.executor.state is WeightState.QUARANTINED:
            raise QuarantinedError(self.executor.quarantine_message())
        req.adapters = self.cache.bind(admission)  # the DiT is held: LoRA slots may be written
        req.lora_sources = dict(admission.sources)
        return req

    def _refuse_opened(self, req: Request | None, error: BaseException, verdicts: list[Verdict]) -> None:
        """Another rank could not open the request this rank opened: refused here too (the scope's
        exit releases the DiT); a quarantined rank, or other verified weights, quarantine this one."""
        if any(v.quarantined for v in verdicts) or digest_mismatch(verdicts):
            self.executor.quarantine_if_possible()

    def verified_digest(self) -> str:
        """The digest of the last verified fingerprint of the weights every rank holds whole."""
        ex = self.executor
        return replicated_digest(ex.verified, self.replicated) if self.peers.size > 1 else ""

    def close_request(self, interrupted: BaseException | None) -> None:
        """The request scope's exit (run twice, see ``RequestScope``): restore, verify, close.
        With several ranks, every rank's end is compared (see :meth:`Lockstep.finish`)."""
        req = self.request
        if req is None:
            return
        ex = self.executor
        try:
            if req.in_step:
                req.in_step = False  # compared once: a second close (see RequestScope) finishes here only
                self.peers.finish(lambda: self.switch.finish(req),
                                  quarantined=lambda: ex.state is WeightState.QUARANTINED,
                                  digest=self.verified_digest, quarantine=ex.quarantine_if_possible)
            else:
                self.switch.finish(req)
        except Exception as exc:
            if interrupted is None or isinstance(interrupted, Exception):
                raise
            # the body's Ctrl-C keeps propagating; the quarantine rides along as a note
            interrupted.add_note(str(exc))
        req.closed = True
        self.request = None

    def hold(self, wait: Callable[[], float | None], what: str) -> Holding:
        """The DiT for one call between requests (``with gate.hold(...)``); ``wait`` gives the
        timeout, checked once the call is known not to be refused."""
        self.refuse_if_closed(what)
        return self.ownership.held(wait(), what)

    def between_requests(self, what: str, wait: Callable[[], float | None], run: Callable[[], None]) -> None:
        """Run ``run`` holding the DiT; refused inside this thread's own request."""
        call = what.split()[0]
        self.refuse_if_closed(call)
        if self.ownership.mine and self.request is not None:
            raise RequestStateError(f"{what} between requests; call it after the `with manager.request()` block")
        with self.ownership.held(wait(), call):
            run()

    def outside_requests(self, what: str) -> None:
        if self.request is not None:
            raise RequestStateError(f"{what} takes effect between requests; call it after the `with` block")
