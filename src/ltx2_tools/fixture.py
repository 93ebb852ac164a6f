"""The tiny DiT with two LoRA files (a distilled one on every block linear, a user one on the
self-attention) that the fault matrix, the soak and the interrupt sweep build their managers from."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import FaultInjector, LoRASpec, ManagerOptions, ResidencyManager, testing


@dataclass
class Fixture:
    base: torch.nn.Module
    specs: list[LoRASpec]
    inputs: dict

    def manager(self, policy: str, faults: FaultInjector | None = None, mode: str = "original",
                **options: Any) -> ResidencyManager:
        """A manager on a fresh copy of the model; ``options`` are :class:`ManagerOptions` fields."""
        return ResidencyManager(copy.deepcopy(self.base), mode=mode, loras=self.specs, merge_policy=policy,
                                options=ManagerOptions(faults=faults, **options))


def make_fixture(tmp: Path, seed: int = 0, num_layers: int = 2) -> Fixture:
    base = tiny_transformer(seed=seed, num_layers=num_layers)
    targets = testing.linear_names(base)
    distilled = testing.save_lora(tmp / "distilled.safetensors",
                          testing.synthetic_lora(base, targets, rank=8, relative_norm=0.10, seed=seed + 1))
    attn = [n for n in targets if ".attn1." in n]
    user = testing.save_lora(tmp / "user.safetensors",
                     testing.synthetic_lora(base, attn, rank=4, relative_norm=0.15, seed=seed + 2))
    specs = [LoRASpec("distilled", distilled, {"stage1": 0.25, "stage2": 1.0}),
             LoRASpec("user", user, {"stage1": 1.0, "stage2": 0.5})]
    return Fixture(base, specs, tiny_inputs(base, seed=seed))
