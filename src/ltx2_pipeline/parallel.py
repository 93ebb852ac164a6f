"""Several processes, one video: CFG-parallel stage 1, and the process group ``torchrun`` starts.

**CFG-parallel** (as sglang runs LTX-2 on two GPUs): stage 1's classifier-free guidance runs the DiT
on a batch of two, the conditional and the unconditional latents. :class:`CFGParallel` stands in
for the DiT in diffusers' ``LTX2Pipeline``: every rank of the group runs the DiT on its share of
that batch (with two ranks, one guidance branch each) and the predictions are gathered, so every
rank continues the loop with the whole batch's prediction. Calls whose batch does not divide
among the ranks (stage 2, STG and modality passes: a batch of one) run whole on every rank. Each
rank's :class:`~ltx2_residency.ResidencyManager` joins the same group, so the weights change in
lock-step.

:func:`from_torchrun` joins the group ``torchrun`` describes in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import GenerationInputError


def check_cfg_parallel(cfg_parallel: object, process_group: object) -> None:
    """``cfg_parallel`` is a flag, and needs a group of two ranks (stage 1's guidance batch is two)."""
    if not isinstance(cfg_parallel, bool):
        raise GenerationInputError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")
    if not cfg_parallel:
        return
    if process_group is None:
        raise GenerationInputError("cfg_parallel=True splits stage 1's guidance batch across ranks: pass the "
                                   "process_group of the ranks (run under torchrun)")
    size = dist.get_world_size(process_group)
    if size != 2:
        raise GenerationInputError(f"cfg_parallel needs exactly 2 ranks (one per guidance branch), the group "
                                   f"has {size}")


class DiTStandIn(nn.Module):
    """Stands in for the DiT in diffusers' pipeline: calls reach ``dit``, as does every attribute
    the pipeline reads (``config``, ``rope``, ``cache_context`` ...)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "dit", dit)  # not a submodule: the pipeline's own DiT, not this wrapper's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "dit"), name)


class CFGParallel(DiTStandIn):
    """The DiT as diffusers' pipeline calls it, its batch split across the ranks of ``group``."""

    def __init__(self, dit: nn.Module, group: Any) -> None:
        super().__init__(dit)
        object.__setattr__(self, "group", group)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else 0
        if args or batch < self.size or batch % self.size:
            return self.dit(*args, **kwargs)
        share = batch // self.size
        lo, hi = self.rank * share, (self.rank + 1) * share
        mine = {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
                for k, v in kwargs.items()}
        out = self.dit(**mine)
        return type(out)(self._gathered(t) for t in out) if isinstance(out, tuple) else self._gathered(out)

    def _gathered(self, part: torch.Tensor) -> torch.Tensor:
        # the bytes travel: exact, and not every backend gathers every dtype (gloo: no bf16)
        raw = part.contiguous().view(-1).view(torch.uint8)
        parts = [torch.empty_like(raw) for _ in range(self.size)]
        dist.all_gather(parts, raw, group=self.group)
        return torch.cat(parts).view(part.dtype).view(part.shape[0] * self.size, *part.shape[1:])


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group ``torchrun`` started."""

    rank: int
    size: int
    group: Any

    @property
    def leader(self) -> bool:
        return self.rank == 0


def torchrun_local_rank() -> int:
    """This process's index on its host (``LOCAL_RANK``; its GPU when there is one per rank)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def torchrun_world_size() -> int:
    """The processes ``torchrun`` started (``WORLD_SIZE``; 1 when not started by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@contextmanager
def from_torchrun(device: torch.device) -> Iterator[Ranks]:
    """Join the group ``torchrun`` started (gloo on a CPU, NCCL on CUDA) for the block, and leave it."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(torchrun_local_rank())
    dist.init_process_group(backend)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    finally:
        dist.destroy_process_group()
