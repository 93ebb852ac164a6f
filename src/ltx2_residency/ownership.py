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
import threading

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

    def held(self, timeout: float | None, what: str) -> contextlib.ExitStack:
        """``with ownership.held(timeout, what):`` owns the DiT for the block; the release
        survives an interrupt at any line (see the module docstring)."""
        self.refuse_nested(what)
        stack = contextlib.ExitStack()
        try:
            stack.callback(self.release_mine)
            stack.callback(self.release_mine)
            self.acquire(timeout, what)
            return stack
        except BaseException:
            stack.close()
            raise
