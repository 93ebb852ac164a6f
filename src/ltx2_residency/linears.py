"""Which modules take a LoRA: plain ``nn.Linear``, and the linear layers an engine adapter
registers (sglang's ``LinearBase``: ``integrations.sglang``), each with the PEFT LoRA layer class
that wraps it.

A registered type is a module with a 2-D ``weight`` of shape (out, in) whose forward computes
``x @ weight.T`` (plus a bias): the merge writes ``weight`` in place as for ``nn.Linear``, and its
PEFT layer adds the dynamic adapters in its forward. A subclass of ``nn.Linear`` is not taken
(its owner may use the weight without calling the forward, as ``MultiheadAttention`` does).
"""

from __future__ import annotations

from torch import nn

#: Linear-like module types besides ``nn.Linear`` -> the PEFT LoRA layer class for them.
LINEAR_TYPES: dict[type[nn.Module], type[nn.Module]] = {}


def register_linear_type(base: type[nn.Module], lora_layer: type[nn.Module]) -> None:
    """``base`` (and its subclasses) take LoRAs, wrapped by PEFT in ``lora_layer``."""
    LINEAR_TYPES[base] = lora_layer


def is_linear(module: nn.Module) -> bool:
    """A module that takes a LoRA: exactly ``nn.Linear``, or an instance of a registered type."""
    return type(module) is nn.Linear or isinstance(module, tuple(LINEAR_TYPES))


def tensor_parallel_size(module: nn.Module) -> int:
    """The tensor-parallel degree a registered layer was sharded with (1: the whole weight here)."""
    return int(getattr(module, "tp_size", 1) or 1)


def is_sharded(weight: object) -> bool:
    """Whether ``weight`` is a DTensor split across ranks (a tensor-parallel or FSDP2 shard)."""
    placements = getattr(weight, "placements", None)
    return placements is not None and any(not p.is_replicate() for p in placements)
