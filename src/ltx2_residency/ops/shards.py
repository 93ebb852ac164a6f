"""Sharded weights, merged where they live: a DTensor weight's local shard and the LoRA slices it takes.

A Linear tensor-parallelized with ``parallelize_module`` (colwise: ``W`` split by rows, rowwise: by
columns) or sharded by FSDP2's ``fully_shard`` (rows) holds a DTensor weight whose local tensor is
this rank's block ``W[rows, cols]`` of the full weight. The delta ``s·B·A`` restricted to that block
is ``s·B[rows]·A[:, cols]``: each rank merges and undoes its own block with those slices, and no
rank ever gathers a full weight (:func:`local_target`). The manager's weights, fingerprints and
clean copies are the local tensors (:func:`local_weight`, same storage as the DTensor).

Dynamic LoRA on a tensor-parallel layer (:func:`install`): its base call runs the layer's own
parallel plan; the LoRA part takes this rank's slices, and a rowwise layer (input split by columns)
sums the rank-wide ``x·A[:, cols]ᵀ`` over the tensor-parallel group before ``B`` — one all-reduce
of ``tokens × rank`` values per layer. Under FSDP2 a layer's weight is whole while it runs, so PEFT's
forward serves as it is; after a merge or an undo, FSDP2 modules that keep their gathered weights
are told to let go of them (:func:`reshard`), so the next call gathers the written shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..linears import is_sharded

try:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch without DTensor: no weight is ever sharded
    DTensor = None  # type: ignore[assignment,misc]
    compute_local_shape_and_global_offset = None  # type: ignore[assignment]

_PEFT_CLASS = "_ltx2_sharded_peft_class"
_CLASSES: dict[type, type] = {}


@dataclass(frozen=True)
class Block:
    """This rank's block of a sharded weight: ``W[rows, cols]``, and the group to sum over when
    the columns (the layer's input) are split."""

    rows: slice
    cols: slice
    split_input: bool
    group: Any = None


def block_of(weight: torch.Tensor) -> Block | None:
    """Where this rank's local tensor sits in the full weight (``None``: not sharded)."""
    if not is_sharded(weight):
        return None
    assert compute_local_shape_and_global_offset is not None
    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    rows = slice(offset[0], offset[0] + shape[0])
    cols = slice(offset[1], offset[1] + shape[1])
    split = [i for i, p in enumerate(weight.placements) if p.is_shard() and p.dim in (1, -1)]
    group = weight.device_mesh.get_group(split[0]) if split else None
    return Block(rows, cols, bool(split), group)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """The tensor the manager reads and writes for ``weight``: its local shard when it is a
    DTensor (the same storage), else itself."""
    if DTensor is not None and isinstance(weight, DTensor):
        return weight.to_local().detach()
    return weight


def local_factors(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_local, A[:, cols], B[rows])``: the merge's view of one sharded layer (the factors as
    they are for an unsharded one)."""
    block = block_of(weight)
    if block is None:
        return weight, lora_A, lora_B
    return local_weight(weight), lora_A[:, block.cols].contiguous(), lora_B[block.rows]


# ---------------------------------------------------------------------------- the tensor-parallel forward
def _sharded_lora(layer: Any, x: torch.Tensor, result: Any) -> Any:
    block = block_of(layer.get_base_layer().weight)
    assert block is not None
    local_x = x.to_local() if DTensor is not None and isinstance(x, DTensor) else x
    delta: torch.Tensor | None = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name].weight[:, block.cols]
        b = layer.lora_B[name].weight[block.rows]
        h = F.linear(local_x.to(a.dtype), a)
        if block.split_input:
            dist.all_reduce(h, group=block.group)  # the rank-wide partial sums, summed over the group
        part = F.linear(h, b) * layer.scaling[name]
        delta = part if delta is None else delta + part
    if delta is None:
        return result
    if DTensor is not None and isinstance(result, DTensor):
        delta = DTensor.from_local(delta.to(result.dtype), result.device_mesh, result.placements)
    return result + delta.to(result.dtype)


def _sharded_class(peft_class: type) -> type:
    cls = _CLASSES.get(peft_class)
    if cls is None:
        def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            base = self.get_base_layer()
            if args or kwargs or not is_sharded(base.weight):  # whole while it runs (FSDP2): PEFT's forward
                return peft_class.forward(self, x, *args, **kwargs)
            result = base(x)
            if self.disable_adapters or self.merged:
                return result
            return _sharded_lora(self, x, result)
        cls = _CLASSES.setdefault(peft_class, type(peft_class.__name__, (peft_class,), {
            "forward": forward, "__module__": __name__,
            "__doc__": f"{peft_class.__doc__ or ''}\n\nOn a sharded weight (ltx2_residency.ops.shards)."}))
    return cls


def install(layer: nn.Module) -> bool:
    """Give a PEFT layer over a sharded weight the forward above (idempotent; ``False``: not sharded)."""
    if _PEFT_CLASS in vars(layer) or not is_sharded(layer.get_base_layer().weight):  # type: ignore[operator]
        return _PEFT_CLASS in vars(layer)
    object.__setattr__(layer, _PEFT_CLASS, type(layer))
    layer.__class__ = _sharded_class(type(layer))
    return True


def uninstall(layer: nn.Module) -> None:
    peft_class = vars(layer).pop(_PEFT_CLASS, None)
    if peft_class is not None:
        layer.__class__ = peft_class


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` made (their class is ``FSDP<name>``)."""
    return [m for m in model.modules()
            if type(m).__name__.startswith("FSDP") and callable(getattr(m, "reshard", None))]


def reshard(modules: Iterable[nn.Module]) -> None:
    """FSDP2 modules that keep their gathered weights between calls let go of them, so the next
    call gathers the shards as they are now (after a merge or an undo)."""
    for module in modules:
        module.reshard()  # type: ignore[operator]
