"""The pre-merged stage-2 DiT of snapshot and resident mode: built once, never unmerged.

It is a copy of the base DiT (same module tree, its own tensors) whose adapted weights hold
``bf16(W + s·scale·B·A)`` for each LoRA at its configured stage-2 strength, in the same
arithmetic as the in-place merge (one float32 delta, one rounding per LoRA, in list order),
so stage 2 on the copy gives the same bits as stage 2 merged in place in original mode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..lora import LoadedLoRA
from .undo import LayerTarget


def build_stage2_copy(base: nn.Module, loras: list[LoadedLoRA], strengths: Mapping[str, float],
                    place: torch.device) -> nn.Module:
    """A copy of ``base`` with its tensors on ``place`` (pinned when that is the host of a CUDA
    DiT) and the LoRAs merged in at ``strengths``. Call before anything hooks or wraps ``base``."""
    params = [*base.parameters(), *base.buffers()]
    compute = params[0].device if params else torch.device("cpu")
    pin = place.type == "cpu" and compute.type == "cuda"
    memo: dict[int, object] = {id(group): group for group in _process_groups(base)}  # shared, not copied
    with torch.no_grad():
        for t in params:
            if id(t) in memo:
                continue
            new = torch.empty(t.shape, dtype=t.dtype, device=place, pin_memory=pin)
            new.copy_(t.detach())
            memo[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
        stage2 = copy.deepcopy(base, memo)
        for name in sorted({m for lo in loras for m in lo.targets}):
            stage2.get_submodule(name).weight.detach().copy_(
                merged_weight(base.get_submodule(name).weight.detach(), name, loras, strengths))
    for p in stage2.parameters():
        p.requires_grad_(False)
    return stage2.eval()


def _process_groups(model: nn.Module) -> list[object]:
    """What the DiT's modules hold of torch.distributed's process groups (a ``ProcessGroup``, or an
    engine's coordinator of them, as sglang's parallel linear layers keep in ``tp_group``): the
    copy runs on the same ranks, so it shares them (they cannot be copied)."""
    if not torch.distributed.is_available():
        return []
    group_type = torch.distributed.ProcessGroup
    found = []
    for module in model.modules():
        for name, value in vars(module).items():
            if name.startswith("_") or isinstance(value, (torch.Tensor, nn.Module)):
                continue
            if isinstance(value, group_type) or any(
                    isinstance(getattr(value, attr, None), group_type) for attr in ("device_group", "cpu_group")):
                found.append(value)
    return found


def merged_weight(w_base: torch.Tensor, name: str, loras: list[LoadedLoRA],
                  strengths: Mapping[str, float]) -> torch.Tensor:
    """``w_base`` with every LoRA that targets ``name`` merged in, as a new tensor."""
    merged = w_base.clone()
    with torch.no_grad():
        for lora in loras:
            target = lora.targets.get(name)
            strength = strengths.get(lora.name, 0.0)
            if target is None or strength == 0.0:
                continue
            # the LoRA factors in the base weight's dtype, as PEFT holds them for the merge path
            view = LayerTarget(name, merged, target.lora_A.to(w_base.dtype), target.lora_B.to(w_base.dtype),
                               (target.alpha if target.alpha is not None else target.rank) / target.rank)
            merged = torch.add(view.delta(strength), merged, out=torch.empty_like(merged))
    return merged


def rebuild_stage2_copy(stage2: nn.Module, base_weights: Mapping[str, torch.Tensor], loras: list[LoadedLoRA],
                      strengths: Mapping[str, float]) -> int:
    """Rewrite the stage-2 copy's adapted weights from clean base weights; returns bytes written.
    Only the adapted weights are rebuilt: the others are never written by any operation of ours."""
    written = 0
    with torch.no_grad():
        for name in sorted({m for lo in loras for m in lo.targets}):
            w = stage2.get_submodule(name).weight
            # merged where the base lives (the arithmetic of the build), then copied into place
            w.detach().copy_(merged_weight(base_weights[name].detach(), name, loras, strengths))
            written += w.numel() * w.element_size()
    return written
