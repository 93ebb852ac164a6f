"""Named fault points inside weight operations, for tests and chaos drills.

Operations call ``faults.hit(point)`` at the places where a real failure could strike
(between two layer writes, before committing a merge, mid-restore ...). A manager built
without an injector pays one attribute lookup per call. Tests arm a point to raise on its
n-th hit and check that the manager still ends CLEAN or QUARANTINED.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

#: Every point an operation may hit, so tests can enumerate them.
POINTS: tuple[str, ...] = (
    "merge.before",
    "merge.layer",  # before each layer's merged weight is written
    "merge.layer.written",  # after it was written (its undo record was taken before)
    "merge.after",
    "attach.before",
    "attach.layer",
    "attach.after",
    "detach.before",
    "detach.layer",
    "restore.before",
    "restore.layer",  # before each layer's restored weight is written
    "restore.layer.written",  # after it was written, before the stack lets go of its record
    "restore.after",
    "repair.layer",
    "prefetch.before",  # snapshot mode: before a host-to-device copy starts
    "prefetch.after",  # after it was queued on the side stream
    "forward",
)


@dataclass
class _Arm:
    make: Callable[[], BaseException]
    on_hit: int
    times: int
    seen: int = 0


class FaultInjector:
    """Raise chosen exceptions at chosen points; thread-safe, counts every hit."""

    def __init__(self) -> None:
        self._arms: dict[str, _Arm] = {}
        self._lock = threading.Lock()
        self.hits: dict[str, int] = {}
        self.fired: list[str] = []  # points that raised, in order

    def arm(self, point: str, make: Callable[[], BaseException], *, on_hit: int = 1,
            times: int = 1) -> None:
        """Raise ``make()`` at the ``on_hit``-th hit of ``point`` counted from now, and at the
        hits after it until it has raised ``times`` times."""
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
        with self._lock:
            self._arms[point] = _Arm(make, on_hit, times)

    def disarm(self) -> None:
        """Drop every armed fault and forget which fired (hit counts stay)."""
        with self._lock:
            self._arms.clear()
            self.fired.clear()

    def hit_many(self, point: str, n: int) -> bool:
        """Count ``n`` hits of ``point`` at once when nothing is armed there (``True``); when
        something is, count none and return ``False``: the caller hits one by one."""
        with self._lock:
            arm = self._arms.get(point)
            if arm is not None and arm.times > 0:
                return False
            self.hits[point] = self.hits.get(point, 0) + n
            return True

    def hit(self, point: str) -> None:
        with self._lock:
            self.hits[point] = self.hits.get(point, 0) + 1
            arm = self._arms.get(point)
            if arm is None:
                return
            arm.seen += 1
            if arm.seen < arm.on_hit or arm.times <= 0:
                return
            arm.times -= 1
            self.fired.append(point)
            exc = arm.make()
        raise exc


class _NoFaults(FaultInjector):
    def hit(self, point: str) -> None:  # the production path: nothing to count
        return None

    def hit_many(self, point: str, n: int) -> bool:
        return True


NO_FAULTS: FaultInjector = _NoFaults()
