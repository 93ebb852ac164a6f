"""The LTX-2 DiT at its real shapes (diffusers' default config, 18.9 B parameters) with
random weights, for GPU timing: real weights cannot be downloaded here, and the cost of a
weight operation depends on shapes, not values."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.utils import logging as dlogging


def real_shape_transformer(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0, std: float = 0.02,
                           **overrides: Any) -> LTX2VideoTransformer3DModel:
    """Build on the meta device, materialise on ``device``, fill with N(0, std) weights."""
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = LTX2VideoTransformer3DModel(**overrides)
        # cast on the meta device first: materialising in float32 would need twice the memory
        model = model.to(dtype).to_empty(device=device)
    finally:
        dlogging.set_verbosity(verbosity)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std, generator=gen)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    return model.eval()
