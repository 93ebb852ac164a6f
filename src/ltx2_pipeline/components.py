"""Every component of diffusers' LTX-2 pipelines at tiny, seeded sizes, built offline.

Nothing here touches a hub: each model is constructed from an in-code config with seeded random
weights, and the tokenizer is a small byte-fallback BPE assembled with the ``tokenizers`` library.
The shapes are chained the way the 19 B model chains them, only smaller:

* Gemma 3 (hidden 64, 2 layers) -> its 3 hidden-state layers stacked -> ``LTX2TextConnectors``
  (``text_proj_in_factor`` = layers + 1, connector width = 64) -> the DiT's ``caption_channels`` = 64.
* Video VAE: 16 latent channels (= DiT ``in_channels``), 8x spatial / 4x temporal compression.
* Audio VAE: 2 latent channels x 16 mel bins / 4 = 8 packed features (= DiT ``audio_in_channels``
  and the length of its ``latents_mean``), 16 kHz, hop 160.
* Vocoder: x160 upsampling, so 100 mel frames/s become 16 000 samples/s of stereo audio.
* Latent upsampler: x2 spatial on the 16-channel video latent (rational resampler, as in LTX-2).

The VAEs carry seeded, non-trivial ``latents_mean`` / ``latents_std`` so that code which forgets
to un-normalise or re-normalise a latent produces a visibly different result.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2LatentUpsamplePipeline,
    LTX2Pipeline,
)
from diffusers.pipelines.ltx2 import LTX2LatentUpsamplerModel, LTX2TextConnectors, LTX2Vocoder
from diffusers.utils import logging as dlogging
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

from .tiny import TINY_TRANSFORMER_CONFIG, tiny_transformer

#: The ``LTX2Pipeline`` / ``LTX2LatentUpsamplePipeline`` constructor arguments among the components.
PIPELINE_COMPONENTS = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors",
                       "transformer", "vocoder")
UPSAMPLE_COMPONENTS = ("vae", "latent_upsampler")

#: The scheduler config of the converted Lightricks/LTX-2 checkpoint (diffusers' conversion script).
LTX2_SCHEDULER_CONFIG: dict[str, Any] = dict(
    use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
    max_image_seq_len=4096, shift_terminal=0.1,
)

TEXT_HIDDEN = TINY_TRANSFORMER_CONFIG["caption_channels"]  # Gemma width feeds the DiT's caption projection
TEXT_LAYERS = 2
VIDEO_LATENT_CHANNELS = TINY_TRANSFORMER_CONFIG["in_channels"]
AUDIO_LATENT_CHANNELS = 2
AUDIO_MEL_BINS = 16  # /4 in the audio VAE -> 4 latent mel bins; 2 x 4 = DiT audio_in_channels
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
AUDIO_SAMPLE_RATE = 16_000
AUDIO_HOP = 160

_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>")
# Words given whole-word merges, so prompts tokenize into subwords and not only characters.
_WORDS = ("the", "and", "with", "of", "in", "on", "at", "is", "a", "an", "robot", "cat", "dog",
          "woman", "man", "video", "light", "camera", "close", "up", "shot", "walks", "dancing",
          "street", "red", "blue", "green", "sun", "night", "rain", "music", "sound", "slow", "fast")


def _tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Special tokens, the 256 byte-fallback tokens, printable ASCII and ``▁``, then word merges."""
    tokens: list[str] = list(_SPECIAL)
    tokens += [f"<0x{b:02X}>" for b in range(256)]  # any UTF-8 text is representable
    tokens += ["▁", *(c for c in string.printable if c not in string.whitespace)]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # Left-to-right chains, word-initial ("▁robot") and inside a word ("robot").
        for piece, rest in (("▁", word), (word[0], word[1:])):
            for ch in rest:
                pair = (piece, ch)
                piece += ch
                if pair not in merges:
                    merges.append(pair)
                    tokens.append(piece)
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def tiny_tokenizer(max_length: int = 128) -> GemmaTokenizer:
    """The Gemma tokenizer class LTX2Pipeline expects, over a small in-code BPE vocabulary.

    Byte fallback makes every string encodable (unknown characters become UTF-8 byte tokens); the
    pipeline itself pads left to ``max_sequence_length`` and truncates.
    """
    vocab, merges = _tokenizer_vocab()
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=max_length)
    tok.padding_side = "left"
    return tok


def gemma3_config(vocab_size: int) -> Gemma3Config:
    vocab, _ = _tokenizer_vocab()
    text_config = dict(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=512, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=32, pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
    )
    # The vision tower is never run by LTX-2 but is part of Gemma3ForConditionalGeneration.
    vision_config = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=4, vision_use_head=False)
    return Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4,
        boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    # ``.to(dtype)`` warns about "modules to keep in float32" and then lists none for these classes.
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(verbosity)


def _latent_stats(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) away from the (0, 1) identity, so a missed (de)normalisation shows."""
    gen = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(n, generator=gen), 0.5 + torch.rand(n, generator=gen)


def _video_vae(seed: int) -> AutoencoderKLLTX2Video:
    torch.manual_seed(seed)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=VIDEO_LATENT_CHANNELS,
        block_out_channels=(16, 32), down_block_types=("LTX2VideoDownBlock3D",) * 2,
        decoder_block_out_channels=(16, 32), layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False), downsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal"), upsample_residual=(True, True),
        upsample_factor=(2, 2), timestep_conditioning=False, patch_size=2, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
        spatial_compression_ratio=SPATIAL_COMPRESSION, temporal_compression_ratio=TEMPORAL_COMPRESSION,
    )
    mean, std = _latent_stats(seed, VIDEO_LATENT_CHANNELS)
    vae.latents_mean.copy_(mean)
    vae.latents_std.copy_(std)
    return vae


def _audio_vae(seed: int) -> AutoencoderKLLTX2Audio:
    torch.manual_seed(seed)
    # The pipeline applies latents_mean/std (length base_channels) to the packed [B, L, C * M] audio latent.
    packed = AUDIO_LATENT_CHANNELS * AUDIO_MEL_BINS // 4
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=packed, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=None,
        in_channels=2, resolution=32, latent_channels=AUDIO_LATENT_CHANNELS, norm_type="pixel",
        causality_axis="height", dropout=0.0, mid_block_add_attention=False, sample_rate=AUDIO_SAMPLE_RATE,
        mel_hop_length=AUDIO_HOP, is_causal=True, mel_bins=AUDIO_MEL_BINS,
    )
    mean, std = _latent_stats(seed, packed)
    audio_vae.latents_mean.copy_(mean)
    audio_vae.latents_std.copy_(std)
    return audio_vae


def _cast_keeping_rope_fp32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``, except rotary ``inv_freq`` buffers, which stay float32 as
    ``from_pretrained(dtype=...)`` leaves them: a saved and reloaded model then computes the same bits."""
    keep = {n: b.clone() for n, b in module.named_buffers() if "inv_freq" in n}
    module.to(dtype).eval()
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        getattr(module.get_submodule(owner), attr).data = buf


def tiny_components(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Every LTX-2 component at tiny size with weights seeded from ``seed`` (see the module doc).

    Keys: the ``LTX2Pipeline`` constructor arguments (``PIPELINE_COMPONENTS``) plus ``latent_upsampler``.
    The DiT is ``tiny_transformer(seed)`` weight for weight; each other module is seeded from its own
    offset of ``seed``. The caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]), quiet_diffusers():
        transformer = tiny_transformer(
            seed, dtype=dtype,
            # RoPE coordinate scaling only (no weights): keep positions consistent with these VAEs.
            vae_scale_factors=(TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION, SPATIAL_COMPRESSION),
            audio_sampling_rate=AUDIO_SAMPLE_RATE, audio_hop_length=AUDIO_HOP,
        )
        tokenizer = tiny_tokenizer()

        torch.manual_seed(seed + 1)
        text_encoder = Gemma3ForConditionalGeneration(gemma3_config(len(tokenizer)))

        torch.manual_seed(seed + 2)
        connectors = LTX2TextConnectors(
            caption_channels=TEXT_HIDDEN, text_proj_in_factor=TEXT_LAYERS + 1,
            video_connector_num_attention_heads=4, video_connector_attention_head_dim=TEXT_HIDDEN // 4,
            video_connector_num_layers=1, video_connector_num_learnable_registers=8,
            audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=TEXT_HIDDEN // 4,
            audio_connector_num_layers=1, audio_connector_num_learnable_registers=8,
            connector_rope_base_seq_len=128, rope_theta=10000.0, rope_double_precision=False,
            causal_temporal_positioning=False, rope_type="split",
        )

        vae = _video_vae(seed + 3)
        audio_vae = _audio_vae(seed + 4)

        torch.manual_seed(seed + 5)
        vocoder = LTX2Vocoder(
            in_channels=2 * AUDIO_MEL_BINS, hidden_channels=32, out_channels=2,
            upsample_kernel_sizes=[8, 8, 20], upsample_factors=[4, 4, 10],  # x160 = the mel hop length
            resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]], leaky_relu_negative_slope=0.1,
            output_sampling_rate=AUDIO_SAMPLE_RATE,
        )

        torch.manual_seed(seed + 6)
        latent_upsampler = LTX2LatentUpsamplerModel(
            in_channels=VIDEO_LATENT_CHANNELS, mid_channels=32, num_blocks_per_stage=1, dims=3,
            spatial_upsample=True, temporal_upsample=False, rational_spatial_scale=2.0,
        )

        modules = dict(text_encoder=text_encoder, connectors=connectors, vae=vae, audio_vae=audio_vae,
                       vocoder=vocoder, latent_upsampler=latent_upsampler)
        for module in modules.values():
            _cast_keeping_rope_fp32(module, dtype)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**LTX2_SCHEDULER_CONFIG), tokenizer=tokenizer,
                transformer=transformer, **modules)


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                  components: dict[str, Any] | None = None) -> LTX2Pipeline:
    """diffusers' single-stage ``LTX2Pipeline`` over :func:`tiny_components` (progress bar off)."""
    components = components if components is not None else tiny_components(seed, dtype)
    pipe = LTX2Pipeline(**{k: components[k] for k in PIPELINE_COMPONENTS})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_upsample_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                           components: dict[str, Any] | None = None) -> LTX2LatentUpsamplePipeline:
    """diffusers' ``LTX2LatentUpsamplePipeline`` (video VAE + x2 latent upsampler).

    Pass the ``components`` a :func:`tiny_pipeline` was built from to share its VAE (and so its
    latent statistics), as the two-stage flow must.
    """
    components = components if components is not None else tiny_components(seed, dtype)
    pipe = LTX2LatentUpsamplePipeline(**{k: components[k] for k in UPSAMPLE_COMPONENTS})
    pipe.set_progress_bar_config(disable=True)
    return pipe
