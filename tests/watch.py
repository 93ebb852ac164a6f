"""A progress display for tests that need to know which pipeline stage is running."""

from __future__ import annotations


class StageWatch:
    """A progress display that remembers which stage runs."""

    def __init__(self) -> None:
        self.stage = ""

    def stage_started(self, stage: str, steps: int) -> None:
        self.stage = stage

    def step(self, stage: str) -> None: ...
    def stage_finished(self, stage: str, ms: float) -> None: ...
