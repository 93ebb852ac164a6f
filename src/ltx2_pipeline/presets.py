"""Where a two-stage pipeline's components come from: ``tiny``, ``full`` or a local folder.

- ``tiny``: every component at tiny, seeded sizes, built offline (:mod:`.components`), with a
  synthetic distilled LoRA of realistic size (rank 8, ‖ΔW‖ = 10 % of ‖W‖ on every block linear).
- ``full``: the real LTX-2 shapes (diffusers' default configs) with random weights, for GPU
  timing: the 18.9 B DiT, the video and audio VAEs, vocoder, connectors, latent upsampler and a
  rank-384 distilled LoRA on all block linears. The Gemma 3 text encoder keeps its real width
  but only ``text_layers`` layers (default 2): the residency manager never touches it, and its
  48 real layers would add 24 GB. Pass ``text_layers=48`` for the real depth.
- a local diffusers-format folder (``--model-path``): ``LTX2Pipeline.save_pretrained`` output
  plus a ``latent_upsampler/`` subfolder (what :func:`save_components` writes), loaded from
  safetensors only, never from a hub.

Both presets build the DiT as the LTX-2 checkpoints are configured: ``perturbed_attn=False``
(:data:`LTX2_PERTURBED_ATTN`), so stage 1 skips its STG pass (see :mod:`.two_stage`); pass
``perturbed_attn=True`` for a DiT that can perturb, as LTX-2.3's is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel, LTX2TextConnectors, LTX2Vocoder
from diffusers.utils import logging as dlogging
from torch import nn
from transformers import Gemma3ForConditionalGeneration

from ltx2_residency import testing

from .components import (
    LTX2_SCHEDULER_CONFIG,
    PIPELINE_COMPONENTS,
    SPATIAL_COMPRESSION,
    TEMPORAL_COMPRESSION,
    gemma3_config,
    quiet_diffusers,
    tiny_components,
    tiny_tokenizer,
)
from .errors import GenerationInputError

#: Request defaults per preset: the tiny one runs on a CPU in seconds; the full one is LTX-2's.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(height=64, width=64, num_frames=9, steps=4, max_sequence_length=32),
    "full": dict(height=512, width=768, num_frames=121, steps=30, max_sequence_length=1024),
}
DEFAULT_PROMPT = "a robot dancing in the rain, slow camera, warm light"
DEFAULT_NEGATIVE_PROMPT = "blurry, jittery, low quality"

PRESETS = ("tiny", "full")
UPSAMPLER_SUBFOLDER = "latent_upsampler"
DISTILLED_FILE = "distilled_lora.safetensors"
#: Gemma 3 12B's text tower (the LTX-2 text encoder): width, heads, vocabulary.
GEMMA3_12B_TEXT = dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, vocab_size=262_208, query_pre_attn_scalar=256,
                       sliding_window=1024)
#: LTX-2's video VAE: 32x in space, 8x in time (diffusers' default config derives 64 in space).
FULL_VAE_COMPRESSION = (32, 8)
#: Gemma 3 12B's depth: the most text-encoder layers the full preset builds.
GEMMA3_12B_LAYERS = 48
#: The LTX-2 (2.0) checkpoints' DiT config leaves perturbed attention off (diffusers' LTX-2
#: converter writes ``perturbed_attn=False`` for LTX-2.0, ``True`` for LTX-2.3): the presets do too.
LTX2_PERTURBED_ATTN = False


def tiny_preset(seed: int = 0, dtype: torch.dtype = torch.bfloat16, perturbed_attn: bool = LTX2_PERTURBED_ATTN,
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The tiny components and their synthetic distilled LoRA (PEFT/diffusers keys).
    ``perturbed_attn=True``: the same DiT, weight for weight, built with perturbed attention."""
    components = tiny_components(seed, dtype)  # its DiT: perturbed_attn off, as the LTX-2 checkpoints
    if bool(components["transformer"].config.perturbed_attn) != perturbed_attn:
        components["transformer"] = with_perturbed_attn(components["transformer"], perturbed_attn)
    dit = components["transformer"]
    lora = testing.synthetic_lora(dit, testing.linear_names(dit), rank=8, relative_norm=0.10, seed=seed + 100,
                                  dtype=dtype)
    return components, lora


def with_perturbed_attn(dit: LTX2VideoTransformer3DModel, perturbed_attn: bool = True) -> LTX2VideoTransformer3DModel:
    """A copy of ``dit`` (its config, its weights) built with ``perturbed_attn`` set. The flag only
    picks the blocks' self-attention processor, which holds no weights: the state dict is the same."""
    config = {k: v for k, v in dit.config.items() if not k.startswith("_")}
    with torch.device("meta"), quiet_diffusers():
        copy = LTX2VideoTransformer3DModel(**{**config, "perturbed_attn": perturbed_attn})
    copy.load_state_dict({k: v.clone() for k, v in dit.state_dict().items()}, strict=True, assign=True)
    return copy.train(dit.training)


def _materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                 std: float = 0.02) -> nn.Module:
    """Meta module -> ``device`` with random weights that keep activations finite: matrices and
    kernels N(0, std), vectors (norm scales, biases) 1 or 0, latent statistics (0, 1)."""
    module = module.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                b.fill_(1.0 if name.endswith("std") else 0.0)
    return module.eval()


def full_preset(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                text_layers: int = 2, lora_rank: int = 384, relative_norm: float = 0.10,
                perturbed_attn: bool = LTX2_PERTURBED_ATTN) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every component at LTX-2's real shapes with random weights (see the module doc)."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)
    tokenizer = tiny_tokenizer(max_length=1024)
    text_config = gemma3_config(GEMMA3_12B_TEXT["vocab_size"])
    for key, value in {**GEMMA3_12B_TEXT, "num_hidden_layers": text_layers,
                       "layer_types": ["full_attention"] * text_layers}.items():
        setattr(text_config.text_config, key, value)
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with torch.device("meta"):
            modules: dict[str, nn.Module] = dict(
                # perturbed_attn as the LTX-2 checkpoints set it (LTX2_PERTURBED_ATTN: off) unless asked
                transformer=LTX2VideoTransformer3DModel(perturbed_attn=perturbed_attn),
                text_encoder=Gemma3ForConditionalGeneration(text_config),
                connectors=LTX2TextConnectors(text_proj_in_factor=text_layers + 1),
                vae=AutoencoderKLLTX2Video(spatial_compression_ratio=FULL_VAE_COMPRESSION[0],
                                           temporal_compression_ratio=FULL_VAE_COMPRESSION[1]),
                audio_vae=AutoencoderKLLTX2Audio(),
                vocoder=LTX2Vocoder(),
                latent_upsampler=LTX2LatentUpsamplerModel(),
            )
        if device.type == "meta":
            built = {k: m.to(dtype) for k, m in modules.items()}
        else:
            built = {k: _materialise(m, device, dtype, gen) for k, m in modules.items()}
    finally:
        dlogging.set_verbosity(verbosity)
    components: dict[str, Any] = dict(scheduler=FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER_CONFIG),
                                      tokenizer=tokenizer, **built)
    dit = built["transformer"]
    lora = {} if device.type == "meta" else testing.synthetic_lora(
        dit, testing.linear_names(dit), rank=lora_rank, relative_norm=relative_norm, seed=seed + 100, dtype=dtype)
    # made on the device (fast), kept on the host: the manager places its own copy where the DiT is,
    # and a second device copy of a rank-384 LoRA is 7 GiB a compiled pipeline on an 80 GB card lacks
    return components, {key: t.cpu() for key, t in lora.items()}


def save_components(components: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a local model folder: the LTX2Pipeline layout plus ``latent_upsampler/``."""
    root = Path(path)
    LTX2Pipeline(**{k: components[k] for k in PIPELINE_COMPONENTS}).save_pretrained(root, safe_serialization=True)
    components["latent_upsampler"].save_pretrained(root / UPSAMPLER_SUBFOLDER, safe_serialization=True)
    return root


def check_model_folder(path: str | os.PathLike[str]) -> Path:
    """:class:`GenerationInputError` unless ``path`` looks like a folder :func:`load_components` reads
    (its index, its VAE config and the upsampler subfolder); reads nothing but those names."""
    root = Path(path)
    if not (root / "model_index.json").is_file():
        raise GenerationInputError(
            f"--model-path {str(root)!r} is not a diffusers model folder (no model_index.json); pass the folder "
            "LTX2Pipeline.save_pretrained wrote (or ltx2_pipeline.presets.save_components)"
        )
    if not (root / "vae" / "config.json").is_file():
        raise GenerationInputError(f"--model-path {str(root)!r} has no vae/config.json; the folder is incomplete")
    if not (root / UPSAMPLER_SUBFOLDER / "config.json").is_file():
        raise GenerationInputError(
            f"--model-path {str(root)!r} has no {UPSAMPLER_SUBFOLDER}/ subfolder with a config.json; the two-stage "
            f"flow needs the x2 latent upsampler (LTX2LatentUpsamplerModel.save_pretrained(path / "
            f"'{UPSAMPLER_SUBFOLDER}'))"
        )
    return root


def vae_compression(preset: str | None = None, model_path: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """The video VAE's (spatial, temporal) compression of a preset or a model folder, which the
    request's size and frame count must fit; the folder's VAE is built from its config on the
    meta device (no weights read)."""
    if model_path is None:
        if preset == "tiny":
            return SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
        if preset == "full":
            return FULL_VAE_COMPRESSION
        raise GenerationInputError(f"unknown preset {preset!r}; expected 'tiny' or 'full' (or a --model-path)")
    config = AutoencoderKLLTX2Video.load_config(check_model_folder(model_path) / "vae")
    with torch.device("meta"), quiet_diffusers():
        vae = AutoencoderKLLTX2Video.from_config(config)
    return int(vae.spatial_compression_ratio), int(vae.temporal_compression_ratio)


def full_preset_bytes(dtype: torch.dtype = torch.bfloat16, text_layers: int = 2,
                      lora_rank: int = 384) -> dict[str, int]:
    """What the full preset holds, per component, at ``dtype``: the parameters and buffers of
    diffusers' real configs (built on the meta device, no memory), plus ``distilled_lora``, the
    synthetic distilled LoRA's A/B factors on every block linear."""
    components, _ = full_preset(device="meta", dtype=dtype, text_layers=text_layers)
    size = torch.empty((), dtype=dtype).element_size()
    out = {name: sum(t.numel() for t in (*m.parameters(), *m.buffers())) * size
           for name, m in components.items() if isinstance(m, nn.Module)}
    dit = components["transformer"]
    out["distilled_lora"] = sum(lora_rank * (lin.in_features + lin.out_features) * size
                                for lin in (dit.get_submodule(n) for n in testing.linear_names(dit)))
    return out


def load_components(path: str | os.PathLike[str], dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Read a local model folder (see :func:`save_components`); safetensors only, no hub.
    ``dtype=None`` keeps diffusers' default (float32)."""
    root = check_model_folder(path)
    kw: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
    if dtype is not None:
        kw["dtype"] = dtype
    pipe = LTX2Pipeline.from_pretrained(root, **kw)
    upsampler = LTX2LatentUpsamplerModel.from_pretrained(root / UPSAMPLER_SUBFOLDER, **kw)
    components = {k: pipe.components[k] for k in PIPELINE_COMPONENTS}
    components["latent_upsampler"] = upsampler
    for module in components.values():
        if isinstance(module, nn.Module):
            module.eval()
    return components
