"""An added LoRA on its way to the device while its request waits for the DiT.

Binding a LoRA into a slot copies its factors onto the device. From the pinned host copy that is a
host-to-device copy in the request's stream, in front of its first DiT call. :class:`Staging`
starts that copy earlier, on a side stream, as soon as the request is admitted and its host copy is
there (read from disk on the loader thread, or found in the host cache), so the copy overlaps
the wait and whatever the DiT runs meanwhile; ``bind`` then writes the slot device to device
after the request's stream has waited for the copy.

One LoRA is in flight at a time: the device holds its LoRA budget plus at most one staged LoRA.
A LoRA offered while another is staged is not staged (its bind copies from the host, as without
staging). A staged copy its request never binds is dropped when the request lets go of its LoRAs.
On a CPU there is nothing to stage.
"""

from __future__ import annotations

import threading

import torch

from ..lora import LoadedLoRA, TargetLoRA


class Staging:
    """At most one added LoRA copied to the device ahead of its bind, on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._lock = threading.Lock()
        self._staged: tuple[int, int, LoadedLoRA, torch.cuda.Event] | None = None  # uid, holder, copy, done
        self.staged = 0  # LoRAs staged
        self.used = 0  # staged LoRAs a bind took
        self.bytes_staged = 0

    def offer(self, uid: int, holder: int, lora: LoadedLoRA) -> bool:
        """Start copying ``lora`` (registry entry ``uid``, for admission ``holder``) to the device,
        unless another LoRA is in flight. Returns whether it was staged."""
        if self._stream is None:
            return False
        with self._lock:
            if self._staged is not None:
                return False
            stream = self._stream  # no wait on other streams: the source is on the host, the target new
            with torch.cuda.stream(stream):
                targets = {m: TargetLoRA(m, t.lora_A.to(self.device, non_blocking=True),
                                         t.lora_B.to(self.device, non_blocking=True), t.alpha)
                           for m, t in lora.targets.items()}
                done = torch.cuda.Event()
                done.record(stream)
            self._staged = (uid, holder, LoadedLoRA(lora.spec, targets), done)
            self.staged += 1
            self.bytes_staged += lora.nbytes
            return True

    def take(self, uid: int) -> LoadedLoRA | None:
        """The staged copy of ``uid`` for the current stream to read (the stream waits for the copy;
        the staging is free again), or ``None`` when ``uid`` is not the LoRA staged."""
        with self._lock:
            staged = self._staged
            if staged is None or staged[0] != uid:
                return None
            self._staged = None
            self.used += 1
        _, _, lora, done = staged
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in lora.targets.values():  # freed once the reads in this stream are done, not before
            t.lora_A.record_stream(stream)
            t.lora_B.record_stream(stream)
        return lora

    def drop(self, holder: int | None = None) -> None:
        """Admission ``holder`` lets go of its LoRAs: its staged copy, if any, is freed (``None``:
        whatever is staged)."""
        with self._lock:
            staged = self._staged
            if staged is None or holder not in (None, staged[1]):
                return
            self._staged = None
        staged[3].synchronize()  # the side stream's copy is done before its memory can be reused
