"""A tiny, seeded LTX-2 DiT built offline from diffusers' own class (no hub access)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import LTX2VideoTransformer3DModel
from diffusers.utils import logging as dlogging

#: Small enough for a 2-core CPU, same module structure as the 19 B model.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=32,
    cross_attention_dim=128, audio_in_channels=8, audio_out_channels=8,
    audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32,
    num_layers=2, caption_channels=64,
)


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     **overrides: Any) -> LTX2VideoTransformer3DModel:
    """``LTX2VideoTransformer3DModel`` with the tiny config and seeded random weights."""
    torch.manual_seed(seed)
    model = LTX2VideoTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, **overrides})
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # its "keep in float32" note lists no module for this class
    try:
        return model.to(dtype).eval()
    finally:
        dlogging.set_verbosity(verbosity)


def tiny_inputs(model: LTX2VideoTransformer3DModel, seed: int = 0, frames: int = 2,
                height: int = 4, width: int = 4, text_tokens: int = 8,
                audio_frames: int = 4) -> dict[str, Any]:
    """Seeded forward kwargs for ``model`` (video, audio and text tokens at tiny sizes), on its device."""
    cfg = model.config
    weight = next(model.parameters())
    dtype, device = weight.dtype, weight.device
    gen = torch.Generator().manual_seed(seed)  # drawn on the host: the same inputs on every device

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        hidden_states=rand(1, frames * height * width, cfg.in_channels),
        audio_hidden_states=rand(1, audio_frames, cfg.audio_in_channels),
        encoder_hidden_states=rand(1, text_tokens, cfg.caption_channels),
        audio_encoder_hidden_states=rand(1, text_tokens, cfg.caption_channels),
        timestep=torch.tensor([500.0], device=device),
        num_frames=frames, height=height, width=width, audio_num_frames=audio_frames,
        return_dict=False,
    )
