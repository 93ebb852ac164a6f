"""The ranks of a process group in lock-step: what each rank tells the others at every step.

A manager that joins a process group (``ResidencyManager(..., process_group=pg)``) exchanges one
:class:`Verdict` per rank at each step of the protocol in :mod:`.lockstep`: the step it is at,
whether it succeeded (and if not, the error's kind and message), whether its DiT is quarantined,
the digest of its last verified fingerprint and the choice it proposes (rank 0's is taken).
Every exchange is one ``all_gather`` of a fixed-size byte tensor, waited for with a timeout: a rank
that never arrives gives a :class:`~.errors.CollectiveTimeoutError`, not a hang. The group is the
host engine's (gloo on CPUs, NCCL on GPUs); the manager never creates or destroys one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import errors
from .errors import CollectiveError, CollectiveTimeoutError, ConfigError, PeerFailedError, ResidencyError

#: bytes one rank's verdict may take on the wire (a longer message is cut)
VERDICT_BYTES = 4096
_MESSAGE_CHARS = 1500


@dataclass(frozen=True)
class Verdict:
    """One rank's word at one step of the protocol."""

    rank: int
    step: str
    ok: bool = True
    kind: str = ""  # the failing error's class name
    message: str = ""
    quarantined: bool = False
    digest: str = ""  # the last verified fingerprint of the replicated weights ("": none)
    choice: str = ""  # what this rank proposes (a decision: rank 0's is taken)

    @classmethod
    def of(cls, rank: int, step: str, failure: BaseException | None, **fields: Any) -> Verdict:
        if failure is None:
            return cls(rank, step, **fields)
        return cls(rank, step, ok=False, kind=type(failure).__name__,
                   message=str(failure)[:_MESSAGE_CHARS] or repr(failure)[:_MESSAGE_CHARS], **fields)

    def encode(self) -> bytes:
        data = json.dumps(dataclasses.asdict(self)).encode()
        if len(data) > VERDICT_BYTES - 4:  # the step and choice are short: only the message can be long
            cut = dataclasses.replace(self, message=self.message[:200] + " [cut]")
            data = json.dumps(dataclasses.asdict(cut)).encode()
        return len(data).to_bytes(4, "little") + data

    @classmethod
    def decode(cls, raw: bytes) -> Verdict:
        size = int.from_bytes(raw[:4], "little")
        return cls(**json.loads(raw[4:4 + size].decode()))


def peer_error(failed: Sequence[Verdict], what: str, me: int) -> PeerFailedError:
    """The error a rank raises when other ranks failed ``what``: a :class:`PeerFailedError` naming
    them, which is also an instance of the first one's error class when that is one of ours
    (``except LoRAValidationError`` catches a peer's refusal on every rank)."""
    first = failed[0]
    others = "; ".join(f"rank {v.rank}: {v.kind}: {v.message}" for v in failed)
    message = (f"{what}: rank {first.rank} of the process group failed ({others}); rank {me} did the same "
               "so that every rank stays in step")
    return _peer_class(first.kind)(message, [v.rank for v in failed], first.kind, first.message)


_PEER_CLASSES: dict[str, type[PeerFailedError]] = {}


def _peer_class(kind: str) -> type[PeerFailedError]:
    cls = _PEER_CLASSES.get(kind)
    if cls is None:
        own = getattr(errors, kind, None)
        if (isinstance(own, type) and issubclass(own, ResidencyError) and not issubclass(own, PeerFailedError)
                and not any("__init__" in vars(c) for c in own.__mro__ if c.__module__ == errors.__name__)):
            cls = type(f"Peer{kind}", (PeerFailedError, own), {"__module__": errors.__name__})
        else:
            cls = PeerFailedError
        _PEER_CLASSES[kind] = cls
    return cls


class Collective:
    """One process group as the manager uses it: ``exchange`` (every rank's verdict to every rank)."""

    def __init__(self, group: object, timeout: float | None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("process_group= needs torch.distributed initialised (torch.distributed."
                              "init_process_group) before the manager is built")
        if not isinstance(group, dist.ProcessGroup):
            raise ConfigError(f"process_group must be a torch.distributed.ProcessGroup (dist.group.WORLD or one "
                              f"from dist.new_group), got {type(group).__name__}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ConfigError("process_group does not include this process; pass a group this rank belongs to")
        self.timeout = timeout
        backend = str(dist.get_backend(group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                       else torch.device("cpu"))

    def exchange(self, mine: Verdict) -> list[Verdict]:
        """Every rank's verdict, in rank order (``mine`` among them)."""
        raw = mine.encode()
        buffer = torch.zeros(VERDICT_BYTES, dtype=torch.uint8)
        buffer[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        buffer = buffer.to(self.device)
        gathered = [torch.empty_like(buffer) for _ in range(self.size)]
        try:
            work = dist.all_gather(gathered, buffer, group=self.group, async_op=True)
            assert work is not None
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
            verdicts = [Verdict.decode(t.cpu().numpy().tobytes()) for t in gathered]
        except ResidencyError:
            raise
        except Exception as exc:
            if "timed out" in str(exc).lower() or "timeout" in str(exc).lower():
                raise CollectiveTimeoutError(
                    f"step {mine.step!r}: the other ranks of the process group did not answer within "
                    f"{self.timeout} s (ManagerOptions.collective_timeout); a rank is gone or stuck. This rank "
                    f"({self.rank}) stopped waiting; the group cannot be trusted to be in step any more") from exc
            raise CollectiveError(f"step {mine.step!r}: the process group failed ({exc!r}); this rank "
                                  f"({self.rank}) cannot act in step with the others") from exc
        return verdicts
