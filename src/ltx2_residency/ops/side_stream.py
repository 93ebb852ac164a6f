"""The overlapped undo: the exact restore of merged LoRAs runs on a side stream while the
request's caller goes on (to the VAE decode, say); the next user of the weights waits for it on
the device, so it never sees them dirty, and no host thread blocks on it.

On the CPU there are no streams: the undo runs inline, and only the bookkeeping (the DiT stays
``undo_pending`` until its next user settles it) is the same, which is what the CPU tests
exercise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .fingerprint import Fingerprint


@dataclass
class PendingUndo:
    """An undo launched but not yet known to be done."""

    event: torch.cuda.Event | None  # recorded on the undo stream after the undo's kernels
    settles_to: str  # the machine event that ends it: "restored" or "offloaded"
    request_id: int | None = None  # whose undo it is: the trace credits the settle to that request
    fingerprint: Fingerprint | None = None  # the deferred verify, launched after the undo (sums in flight)


class SideStream:
    """Where overlapped undos run: one CUDA side stream per manager (inline on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._urgent: torch.cuda.Stream | None = None

    def urgent(self) -> torch.cuda.Stream | None:
        """A high-priority stream for the work the side stream's must not delay (None on the CPU).
        The side stream has the default priority, the lowest: a big kernel on it would otherwise
        hold every SM until its last tile is dispatched, and each of a host-bound DiT call's small
        kernels would wait behind it; from a higher-priority stream they are dispatched first, and
        the side stream's tiles fill the gaps (measured in docs/results/measured_constants.md#urgent-stream)."""
        if self.stream is None:
            return None
        if self._urgent is None:
            self._urgent = torch.cuda.Stream(self.device, priority=-1)  # above the default, 0
        return self._urgent

    def behind(self) -> torch.cuda.Stream | None:
        """The caller's stream when :meth:`hurry` should move its work ahead (None: on the CPU, or
        when the caller's stream is ahead of the side stream already, e.g. a serving engine's own)."""
        urgent = self.urgent()
        if urgent is None:
            return None
        caller = torch.cuda.current_stream(self.device)
        return None if caller.priority <= urgent.priority else caller

    def hurry(self, caller: torch.cuda.Stream) -> None:
        """Make the urgent stream current, after what ``caller`` (from :meth:`behind`) has queued;
        :meth:`hand_back` returns to it."""
        urgent = self.urgent()
        assert urgent is not None
        urgent.wait_stream(caller)
        torch.cuda.set_stream(urgent)

    def hand_back(self, caller: torch.cuda.Stream, made: Iterable[torch.Tensor] = ()) -> None:
        """Back on ``caller`` (from :meth:`hurry`), ordered after the urgent stream's work; ``made``:
        tensors made on the urgent stream that the caller goes on using."""
        caller.wait_stream(torch.cuda.current_stream(self.device))
        torch.cuda.set_stream(caller)
        keep_for_stream(made)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Work queued in the block runs on the side stream, after everything already queued on
        the caller's stream (the last stage-2 forward, in a request)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def mark(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def join(self, event: torch.cuda.Event | None = None, host: bool = False) -> None:
        """Order the caller's stream after ``event`` (after all the side stream's work when None);
        ``host``: also block this thread until it is done."""
        if self.stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        if event is None:
            current.wait_stream(self.stream)
            if host:
                self.stream.synchronize()
            return
        current.wait_event(event)
        if host:
            event.synchronize()


def keep_for_stream(tensors: Iterable[torch.Tensor]) -> None:
    """Tell the caching allocator that the current (side) stream uses these tensors, so memory
    freed on the stream that made them is not handed out again before this stream is done."""
    streams: dict[torch.device, torch.cuda.Stream] = {}  # one lookup per device (~15 us each)
    for t in tensors:
        if t.is_cuda:
            stream = streams.get(t.device)
            if stream is None:
                stream = streams[t.device] = torch.cuda.current_stream(t.device)
            t.record_stream(stream)
