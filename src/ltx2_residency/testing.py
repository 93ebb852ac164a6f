"""Helpers for tests, demos and benchmarks: realistic synthetic LoRAs.

A LoRA whose delta is tiny next to the weight hides bf16 rounding (every merge looks
reversible); these helpers scale each delta to a chosen fraction of its weight's norm, as
trained LoRAs have (‖ΔW‖ around 5-20 % of ‖W‖).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from .linears import is_linear


def linear_names(model: nn.Module, pattern: str = "transformer_blocks.") -> list[str]:
    """Names of the Linear modules whose path contains ``pattern`` (LTX-2's block linears)."""
    return [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_linear(m)) and pattern in n]


def synthetic_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int = 8,
    relative_norm: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    alpha: float | None = None,
    prefix: str = "transformer.",
) -> dict[str, torch.Tensor]:
    """PEFT/diffusers-format LoRA tensors with ‖scale·B·A‖ = ``relative_norm``·‖W‖ per target."""
    gens: dict[torch.device, torch.Generator] = {}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in targets:
            # generated where the weight lives: a 19 B-parameter DiT stays on its GPU
            w = model.get_submodule(name).weight.detach()
            gen = gens.setdefault(w.device, torch.Generator(device=w.device).manual_seed(seed))
            r = min(rank, *w.shape)
            a = torch.randn(r, w.shape[1], generator=gen, device=w.device) / w.shape[1] ** 0.5
            b = torch.randn(w.shape[0], r, generator=gen, device=w.device)
            scale = (alpha / r) if alpha is not None else 1.0
            delta_norm = (scale * (b @ a)).norm()
            b *= relative_norm * w.float().norm() / delta_norm.clamp_min(1e-12)
            out[f"{prefix}{name}.lora_A.weight"] = a.to(dtype)
            out[f"{prefix}{name}.lora_B.weight"] = b.to(dtype)
            if alpha is not None:
                out[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
    return str(path)


def weight_bits(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent ground truth for tests: a host copy of every weight's bits."""
    return {n: w.detach().cpu().clone().view(-1).view(torch.int16 if w.element_size() == 2
                                                      else torch.int32)
            for n, w in weights.items()}
