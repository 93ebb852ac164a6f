"""Who owns the shared DiT: one request (or between-requests call) at a time, per thread."""

from __future__ import annotations

import threading
import time

from .errors import RequestStateError, RequestTimeoutError


class Ownership:
    """A lock a thread holds for a whole request, with a timeout that names the wait, and a
    typed error (not a deadlock) when the owner asks again."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.owner: int | None = None

    @property
    def mine(self) -> bool:
        return self.owner == threading.get_ident()

    def acquire(self, timeout: float | None, what: str) -> None:
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self.owner == me:
                raise RequestStateError(
                    f"{what} called while this thread already owns the DiT (nested request?); "
                    "finish the open request first"
                )
            while self.owner is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RequestTimeoutError(
                        f"{what} waited {timeout:.3g} s for the shared DiT, which another request "
                        "still holds; raise request_timeout or add capacity"
                    )
                self._cond.wait(left)
            self.owner = me

    def release(self) -> None:
        with self._cond:
            self.owner = None
            self._cond.notify()
