"""Managers on several ranks in lock-step: every step commits on every rank or on none.

A step is local work followed by one exchange of :class:`~.collective.Verdict` (see
:mod:`.collective`). What each kind of step does when the ranks disagree:

============  ===============================================================================
step          when another rank failed (or is out of step)
============  ===============================================================================
build         every rank refuses; the ranks that built give their model back
request       every rank refuses the request's LoRA choice (nothing moved anywhere)
open          every rank refuses the request; a quarantined rank quarantines every rank
propose       every rank refuses the phase (nothing moved); rank 0's decision is taken
enter         the ranks that switched roll back (undo, or quarantine when the undo fails)
finish        any rank failed, quarantined or verified other weights: every rank quarantines
between       (verify_clean, repair, add_lora ...) the rank's own undo of the call, if any
============  ===============================================================================

A rank whose request ended early (its ``with`` block raised) is at ``finish`` while the others
are at a later ``propose`` or ``enter``: they fail that step and come to ``finish`` too, where
the exchange repeats until every rank is there. Fingerprints of the weights that every rank
holds whole (not shards) are compared at ``build``, ``open`` and ``finish``.

:class:`Solo` is the same interface without a group: the work runs, nothing is exchanged, and
behaviour is exactly a single manager's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

from .collective import Collective, Verdict, peer_error
from .errors import CollectiveError, RankMismatchError
from .ops.fingerprint import Fingerprint

T = TypeVar("T")
Undo = Callable[[Any, BaseException, list[Verdict]], None]

#: exchanges a rank at ``finish`` waits for its peers to arrive there before giving up
_FINISH_ROUNDS = 4


class Peers(Protocol):
    """What the manager's layers need of the other ranks (:class:`Lockstep`, or :class:`Solo`)."""

    rank: int
    size: int

    def step(self, name: str, work: Callable[[], T], *, choice: Callable[[T], str] | None = None,
             undo: Undo | None = None, quarantined: Callable[[], bool] | None = None,
             digest: Callable[[], str] | None = None) -> tuple[T, list[Verdict]]: ...

    def finish(self, work: Callable[[], None], quarantined: Callable[[], bool], digest: Callable[[], str],
               quarantine: Callable[[], None]) -> None: ...


class Solo:
    """No process group: each step is its work, and nothing else."""

    rank = 0
    size = 1

    def step(self, name: str, work: Callable[[], T], *, choice: Callable[[T], str] | None = None,
             undo: Undo | None = None, quarantined: Callable[[], bool] | None = None,
             digest: Callable[[], str] | None = None) -> tuple[T, list[Verdict]]:
        return work(), []

    def finish(self, work: Callable[[], None], quarantined: Callable[[], bool], digest: Callable[[], str],
               quarantine: Callable[[], None]) -> None:
        work()


class Lockstep:
    """The manager's steps over a :class:`~.collective.Collective`."""

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self.rank = collective.rank
        self.size = collective.size

    def step(self, name: str, work: Callable[[], T], *, choice: Callable[[T], str] | None = None,
             undo: Undo | None = None, quarantined: Callable[[], bool] | None = None,
             digest: Callable[[], str] | None = None) -> tuple[T, list[Verdict]]:
        """Run ``work`` here, then tell every rank how it went. Returns its result and every rank's
        verdict; raises on every rank when any failed: this rank's own error where it failed, else
        a :class:`~.errors.PeerFailedError` naming the ranks that did, after ``undo`` of this rank's
        result (``undo(result, error, verdicts)``)."""
        result: Any = None
        failure: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:
            failure = exc
        fields = {"quarantined": quarantined() if quarantined is not None else False,
                  "digest": digest() if digest is not None and failure is None else "",
                  "choice": choice(result) if choice is not None and failure is None else ""}
        try:
            verdicts = self.collective.exchange(Verdict.of(self.rank, name, failure, **fields))
        except CollectiveError as exc:
            if failure is not None:
                exc.add_note(f"this rank had failed the step itself: {failure!r}")
                raise failure from exc
            if undo is not None:
                undo(result, exc, [])
            raise
        others = [v for v in verdicts if v.rank != self.rank]
        if failure is not None:
            failed = [v for v in others if not v.ok]
            if failed:
                failure.add_note("other ranks failed this step too: " + ", ".join(
                    f"rank {v.rank} ({v.kind})" for v in failed))
            raise failure
        error = self._disagreement(name, others)
        if error is not None:
            if undo is not None:
                undo(result, error, verdicts)
            raise error
        return result, verdicts

    def _disagreement(self, name: str, others: list[Verdict]) -> CollectiveError | None:
        astray = [v for v in others if v.step != name]
        if astray:
            ended = [v for v in astray if v.step == "finish"]
            if ended:
                return peer_error([Verdict(v.rank, v.step, False, "RequestEnded",
                                           "its request ended before this step") for v in ended], name, self.rank)
            return RankMismatchError(f"step {name!r}: ranks out of step ("
                                     + ", ".join(f"rank {v.rank} is at {v.step!r}" for v in astray)
                                     + "); every rank must make the same manager calls in the same order")
        failed = [v for v in others if not v.ok]
        if failed:
            return peer_error(failed, name, self.rank)
        return None

    def finish(self, work: Callable[[], None], quarantined: Callable[[], bool], digest: Callable[[], str],
               quarantine: Callable[[], None]) -> None:
        """A request's end on every rank: each undoes and verifies its own DiT, then all compare.
        A rank that failed, is quarantined or verified other weights than the rest quarantines
        every rank."""
        failure: BaseException | None = None
        try:
            work()
        except BaseException as exc:
            failure = exc
        verdicts: list[Verdict] = []
        for _ in range(_FINISH_ROUNDS):
            mine = Verdict.of(self.rank, "finish", failure, quarantined=quarantined(),
                              digest="" if failure is not None else digest())
            try:
                verdicts = self.collective.exchange(mine)
            except CollectiveError as exc:
                if failure is not None:
                    raise failure from exc
                raise
            if all(v.step == "finish" for v in verdicts):
                break
        else:
            quarantine()
            error: BaseException = RankMismatchError(
                "finish: other ranks did not end their request ("
                + ", ".join(f"rank {v.rank} is at {v.step!r}" for v in verdicts if v.step != "finish")
                + "); this rank's DiT is quarantined")
            raise error from failure
        others = [v for v in verdicts if v.rank != self.rank]
        bad = [v for v in others if not v.ok or v.quarantined]
        mismatch = digest_mismatch(verdicts)
        if failure is not None:
            if bad or mismatch:
                quarantine()
            raise failure
        if bad:
            quarantine()
            raise peer_error([v if not v.ok else Verdict(v.rank, v.step, False, "QuarantinedError",
                                                         "its DiT is quarantined") for v in bad],
                             "finish (every rank is quarantined now; repair() on every rank)", self.rank)
        if mismatch:
            quarantine()
            raise RankMismatchError(f"finish: {mismatch}; every rank is quarantined (repair() on every rank)")


def digest_mismatch(verdicts: list[Verdict]) -> str:
    """Why the ranks' verified fingerprints disagree ("" when they agree or none was verified)."""
    seen = {v.rank: v.digest for v in verdicts if v.digest}
    if len(set(seen.values())) <= 1:
        return ""
    groups: dict[str, list[int]] = {}
    for rank, d in seen.items():
        groups.setdefault(d, []).append(rank)
    return ("the weights every rank holds whole differ between ranks (" + "; ".join(
        f"ranks {', '.join(map(str, ranks))}: {d[:12]}" for d, ranks in groups.items()) + ")")


def replicated_digest(fingerprint: Fingerprint | None, names: Collection[str]) -> str:
    """One short digest of ``fingerprint`` over ``names`` (the weights every rank holds whole)."""
    if fingerprint is None or not names:
        return ""
    digests = fingerprint.digests
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}={digests.get(name)};".encode())
    return h.hexdigest()


def peers(process_group: object, timeout: float | None) -> Peers:
    """:class:`Lockstep` over ``process_group``, or :class:`Solo` without one."""
    if process_group is None:
        return Solo()
    return Lockstep(Collective(process_group, timeout))
