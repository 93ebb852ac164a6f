"""The transition trace: one record per event the machine took, bounded in memory."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TransitionRecord:
    event: str
    source: str
    dest: str
    duration_ms: float
    bytes_touched: int
    request_id: int | None
    phase: str | None
    ok: bool = True
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trace:
    """A ring buffer of :class:`TransitionRecord`; ``maxlen`` bounds a long-running server."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._records: deque[TransitionRecord] = deque(maxlen=maxlen)
        self.total = 0

    def append(self, record: TransitionRecord) -> None:
        self._records.append(record)
        self.total += 1

    def __iter__(self) -> Iterator[TransitionRecord]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> TransitionRecord:
        return self._records[i]

    def for_request(self, request_id: int) -> list[TransitionRecord]:
        return [r for r in self._records if r.request_id == request_id]
