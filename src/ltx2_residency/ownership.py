"""Who owns the shared DiT: one request (or between-requests call) at a time, per thread.

An interrupt (Ctrl-C is a ``KeyboardInterrupt`` raised between any two lines of Python) must
never leave the DiT owned by nobody's request. So ownership is a lock whose taking and whose
owner are one C-level step (an ``RLock`` knows its owning thread: no "taken, but the owner not
written yet" moment), and every hold is released through :class:`contextlib.ExitStack`, whose
exit runs each registered release even when an earlier one was interrupted; each release is
registered twice and is a no-op once done, so an interrupt inside the first is finished by the
second.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from types import FrameType
from typing import Any

from .errors import RequestStateError, RequestTimeoutError


def wait_seconds(timeout: float | None) -> float:
    """``Lock.acquire``'s timeout: ``-1`` (forever) for ``None``, ``inf`` or beyond what the
    platform can wait for."""
    if timeout is None or math.isinf(timeout) or timeout > threading.TIMEOUT_MAX:
        return -1
    return max(0.0, timeout)


class Ownership:
    """A lock a thread holds for a whole request, with a timeout that names the wait, and a
    typed error (not a deadlock) when the owner asks again."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entry is refused below; the RLock is for its owner record

    @property
    def mine(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def refuse_nested(self, what: str) -> None:
        if self.mine:
            raise RequestStateError(
                f"{what} called while this thread already owns the DiT (nested request?); "
                "finish the open request first"
            )

    def acquire(self, timeout: float | None, what: str) -> None:
        """Take the DiT, waiting at most ``timeout`` seconds (``None``: forever). Release it with
        :meth:`release_mine`, registered (twice) on an ``ExitStack`` before calling this."""
        self.refuse_nested(what)
        if not self._lock.acquire(timeout=wait_seconds(timeout)):
            raise RequestTimeoutError(
                f"{what} waited {timeout:.3g} s for the shared DiT, which another request "
                "still holds; raise request_timeout or add capacity"
            )

    def release_mine(self) -> None:
        """Release the DiT if this thread holds it (idempotent: safe to register twice)."""
        if self.mine:
            self._lock.release()

    def held(self, timeout: float | None, what: str) -> Holding:
        """``with ownership.held(timeout, what):`` owns the DiT for the block; the release
        survives an interrupt at any line (see the module docstring)."""
        return Holding(self, timeout, what)


class Holding(contextlib.ExitStack):
    """The DiT owned for a ``with`` block: taken in ``__enter__`` after its releases are registered
    (so nothing between the take and the block can leave it held), released by ``ExitStack``'s exit."""

    def __init__(self, ownership: Ownership, timeout: float | None, what: str) -> None:
        super().__init__()
        self._ownership, self._timeout, self._what = ownership, timeout, what

    def __enter__(self) -> Holding:
        self._ownership.refuse_nested(self._what)
        try:
            self.callback(self._ownership.release_mine)
            self.callback(self._ownership.release_mine)
            self._ownership.acquire(self._timeout, self._what)
            return self
        except BaseException:
            super().__exit__(*sys.exc_info())
            raise


class HeldInterrupts:
    """Ctrl-C held while cleanup steps run (main thread only: the only one signals reach), then
    delivered to the handler that was there. A signal may land between any two bytecodes, also in
    ``ExitStack``'s own loop between two steps, where it would skip the steps after it."""

    def __init__(self) -> None:
        self._previous: Any = None
        self._holding = False
        self._arrived: tuple[int, FrameType | None] | None = None

    def hold(self) -> None:
        if self._holding or threading.current_thread() is not threading.main_thread():
            return
        self._arrived = None
        self._previous = signal.getsignal(signal.SIGINT)
        self._holding = True  # before the swap: an interrupt between the two still gets it undone
        signal.signal(signal.SIGINT, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._arrived = (signum, frame)

    def deliver(self) -> None:
        """Put the previous handler back and give it a Ctrl-C that arrived meanwhile (idempotent)."""
        if not self._holding:
            return
        signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
        self._holding = False
        arrived, self._arrived = self._arrived, None
        if arrived is not None:
            if callable(self._previous):
                self._previous(*arrived)  # Python's default handler raises KeyboardInterrupt
            elif self._previous != signal.SIG_IGN:
                raise KeyboardInterrupt
