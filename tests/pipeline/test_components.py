"""The offline tiny LTX-2 components run diffusers' own pipelines end to end.

Every test here runs with the network blocked at the socket level, so building, running, saving
and reloading the tiny pipelines provably never reaches a hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2LatentUpsamplePipeline, LTX2Pipeline
from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES
from diffusers.utils import encode_video

from ltx2_pipeline.components import (
    AUDIO_HOP,
    AUDIO_SAMPLE_RATE,
    PIPELINE_COMPONENTS,
    tiny_components,
    tiny_pipeline,
    tiny_tokenizer,
    tiny_upsample_pipeline,
)
from ltx2_pipeline.tiny import tiny_transformer
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

HEIGHT = WIDTH = 32
FRAMES = 9
FPS = 24.0
TEXT_LEN = 16
#: Full LTX-2 guidance as LTX2Pipeline does it (CFG + STG + modality isolation); STG on block 1 of 2.
GUIDED: dict[str, Any] = dict(guidance_scale=3.0, stg_scale=1.0, modality_scale=3.0,
                              spatio_temporal_guidance_blocks=[1])
#: Every guidance term off. Note `audio_guidance_scale` defaults to 7.0, so it has to be set as well.
UNGUIDED: dict[str, Any] = dict(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0,
                                modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.0)


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    return tiny_components(seed=0)


@pytest.fixture(scope="module")
def pipe(components: dict[str, Any]) -> LTX2Pipeline:
    return tiny_pipeline(components=components)


def run(pipe: LTX2Pipeline, seed: int = 0, **kwargs: Any) -> Any:
    args: dict[str, Any] = dict(prompt="a robot dancing in the rain", negative_prompt="blurry, jittery",
                                height=HEIGHT, width=WIDTH, num_frames=FRAMES, frame_rate=FPS,
                                num_inference_steps=2, max_sequence_length=TEXT_LEN, output_type="pt", **GUIDED)
    args.update(kwargs)
    return pipe(generator=torch.Generator().manual_seed(seed), **args)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()  # parameters and buffers (the VAEs' latent statistics are buffers)


def expected_audio_samples(num_frames: int = FRAMES, fps: float = FPS) -> int:
    # The pipeline's audio latent length, x4 in the causal audio VAE (minus its 3 causal frames), x hop.
    latent_frames = round(num_frames / fps * AUDIO_SAMPLE_RATE / AUDIO_HOP / 4)
    return (latent_frames * 4 - 3) * AUDIO_HOP


def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone() -> None:
    rng_before = torch.random.get_rng_state()
    first, second, other = tiny_components(seed=0), tiny_components(seed=0), tiny_components(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    modules = [k for k, v in first.items() if isinstance(v, torch.nn.Module)]
    assert set(modules) == {"transformer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder",
                            "latent_upsampler"}
    for name in modules:
        a, b, c = state(first[name]), state(second[name]), state(other[name])
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(a[k], c[k]) for k in a), f"{name} ignores the seed"
    assert first["tokenizer"].get_vocab() == second["tokenizer"].get_vocab()

    # The pipeline's DiT is the project's tiny DiT (same weights), so its LoRA fixtures apply to it.
    reference = state(tiny_transformer(seed=0, dtype=torch.float32))
    dit = state(first["transformer"])
    assert reference.keys() == dit.keys()
    assert all(torch.equal(reference[k], dit[k]) for k in reference)

    # Non-identity latent statistics: a skipped (de)normalisation must change results.
    for vae in (first["vae"], first["audio_vae"]):
        assert not torch.allclose(vae.latents_mean, torch.zeros_like(vae.latents_mean))
        assert not torch.allclose(vae.latents_std, torch.ones_like(vae.latents_std))


def test_component_shapes_chain_like_the_full_model(components: dict[str, Any]) -> None:
    dit, vae, audio_vae = components["transformer"].config, components["vae"], components["audio_vae"]
    text = components["text_encoder"].config.text_config
    connectors, vocoder = components["connectors"].config, components["vocoder"].config
    assert dit.in_channels == dit.out_channels == vae.config.latent_channels
    packed_audio = audio_vae.config.latent_channels * audio_vae.config.mel_bins // audio_vae.mel_compression_ratio
    assert dit.audio_in_channels == packed_audio == audio_vae.latents_mean.numel()
    assert dit.caption_channels == connectors.caption_channels == text.hidden_size
    assert connectors.text_proj_in_factor == text.num_hidden_layers + 1
    assert components["text_encoder"].config.text_config.vocab_size == len(components["tokenizer"])
    assert vocoder.in_channels == audio_vae.config.output_channels * audio_vae.config.mel_bins
    mel_frames_per_s = audio_vae.config.sample_rate / audio_vae.config.mel_hop_length
    assert mel_frames_per_s * np.prod(vocoder.upsample_factors) == vocoder.output_sampling_rate
    assert components["latent_upsampler"].config.in_channels == vae.config.latent_channels
    assert tuple(dit.vae_scale_factors) == (vae.temporal_compression_ratio, vae.spatial_compression_ratio,
                                            vae.spatial_compression_ratio)


def test_tokenizer_encodes_any_prompt_pads_left_and_truncates(pipe: LTX2Pipeline) -> None:
    tok = tiny_tokenizer()
    prompts = ["", "a robot dancing", "Ünïcødé — 日本語 🤖 \t tabs", "the cat walks " * 40]
    enc = tok(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    assert ids.shape == mask.shape == (len(prompts), TEXT_LEN)
    assert int(ids.max()) < len(tok)
    assert tok.unk_token_id not in ids  # byte fallback covers every character
    # Left padding: the empty prompt is all padding but its <bos>; the long one is cut, not padded.
    assert ids[0].tolist() == [tok.pad_token_id] * (TEXT_LEN - 1) + [tok.bos_token_id]
    assert mask[0].tolist() == [0] * (TEXT_LEN - 1) + [1]
    assert mask[3].all() and ids[3, 0] == tok.bos_token_id
    for text in prompts[1:3]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert len(tok.tokenize("a robot dancing")) < len("a robot dancing")  # real merges, not characters only

    embeds, emb_mask, neg, _ = pipe.encode_prompt(prompts[:2], negative_prompt=["", "blurry"],
                                                         max_sequence_length=TEXT_LEN)
    text_config = pipe.text_encoder.config.text_config
    assert embeds.shape == neg.shape == (2, TEXT_LEN, text_config.hidden_size * (text_config.num_hidden_layers + 1))
    assert torch.equal(emb_mask, mask[:2]) and torch.isfinite(embeds).all()


def test_ltx2_pipeline_runs_end_to_end_and_is_deterministic(pipe: LTX2Pipeline) -> None:
    out = run(pipe, output_type="pt")
    video, audio = out.frames, out.audio
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH)
    assert audio.shape == (1, pipe.vocoder.config.out_channels, expected_audio_samples())
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0 and float(video.std()) > 0
    assert float(audio.abs().max()) <= 1.0 and float(audio.std()) > 0

    again = run(pipe, output_type="pt")
    assert torch.equal(again.frames, video) and torch.equal(again.audio, audio)
    assert not torch.equal(run(pipe, seed=1, output_type="pt").frames, video)
    assert not torch.equal(run(pipe, prompt="a red cat at night", output_type="pt").frames, video)  # text reaches it

    as_np = run(pipe, output_type="np")
    assert isinstance(as_np.frames, np.ndarray) and as_np.frames.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(as_np.frames, video.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    assert torch.equal(as_np.audio, audio)


def test_latents_upsample_x2_and_stage2_runs_on_the_distilled_sigmas(
        pipe: LTX2Pipeline, components: dict[str, Any]) -> None:
    stage1 = run(pipe, output_type="latent")
    vae = components["vae"]
    lat_frames = (FRAMES - 1) // vae.temporal_compression_ratio + 1
    lat_h, lat_w = HEIGHT // vae.spatial_compression_ratio, WIDTH // vae.spatial_compression_ratio
    assert stage1.frames.shape == (1, vae.config.latent_channels, lat_frames, lat_h, lat_w)
    audio_vae = components["audio_vae"]
    assert stage1.audio.shape == (1, audio_vae.config.latent_channels, (expected_audio_samples() // AUDIO_HOP + 3) // 4,
                                  audio_vae.config.mel_bins // audio_vae.mel_compression_ratio)
    assert torch.isfinite(stage1.frames).all() and torch.isfinite(stage1.audio).all()

    upsample = tiny_upsample_pipeline(components=components)
    up = upsample(latents=stage1.frames, height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type="latent").frames
    assert up.shape == (1, vae.config.latent_channels, lat_frames, 2 * lat_h, 2 * lat_w)
    assert torch.isfinite(up).all()
    # LTX2Pipeline's "latent" output is already un-normalised, and the upsample pipeline takes it as is;
    # un-normalising it a second time (latents_normalized=True) would give something else.
    with torch.no_grad():
        assert torch.equal(up, components["latent_upsampler"](stage1.frames))
    twice = upsample(latents=stage1.frames, latents_normalized=True, height=HEIGHT, width=WIDTH,
                     num_frames=FRAMES, output_type="latent").frames
    assert not torch.allclose(twice, up)

    # Stage 2 as diffusers documents it: a scheduler that takes the sigmas as given, noise_scale =
    # first sigma (lerp(upsampled, noise, 0.909375) inside prepare_latents), guidance off.
    raw = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                      shift_terminal=None)
    stage2 = LTX2Pipeline(**{**{k: components[k] for k in PIPELINE_COMPONENTS}, "scheduler": raw})
    stage2.set_progress_bar_config(disable=True)
    seen: list[float] = []

    def record(_pipe: Any, _i: int, t: torch.Tensor, kw: dict[str, Any]) -> dict[str, Any]:
        seen.append(float(t))
        return kw

    out = run(stage2, seed=1, latents=up, audio_latents=stage1.audio, height=2 * HEIGHT, width=2 * WIDTH,
              noise_scale=STAGE_2_DISTILLED_SIGMA_VALUES[0], sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
              num_inference_steps=len(STAGE_2_DISTILLED_SIGMA_VALUES), callback_on_step_end=record,
              **UNGUIDED)
    assert out.frames.shape == (1, FRAMES, 3, 2 * HEIGHT, 2 * WIDTH)
    assert out.audio.shape == (1, 2, expected_audio_samples())
    assert torch.isfinite(out.frames).all() and torch.isfinite(out.audio).all()
    assert seen == pytest.approx([1000 * s for s in STAGE_2_DISTILLED_SIGMA_VALUES])
    assert raw.sigmas.tolist() == pytest.approx([*STAGE_2_DISTILLED_SIGMA_VALUES, 0.0])

    # The LTX-2 scheduler config shifts and stretches custom sigmas, which is why stage 2 swaps it.
    shifted = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    shifted.set_timesteps(sigmas=STAGE_2_DISTILLED_SIGMA_VALUES,
                          mu=calculate_shift(up[0, 0].numel(), 1024, 4096, 0.95, 2.05))
    assert shifted.sigmas[:-1].tolist() != pytest.approx(STAGE_2_DISTILLED_SIGMA_VALUES, abs=1e-3)


def test_save_pretrained_round_trips_offline(pipe: LTX2Pipeline, components: dict[str, Any],
                                             tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "ltx2")
    index = json.loads((tmp_path / "ltx2" / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline"
    assert index["text_encoder"] == ["transformers", "Gemma3ForConditionalGeneration"]
    assert index["tokenizer"][1] == "GemmaTokenizer"

    loaded = LTX2Pipeline.from_pretrained(tmp_path / "ltx2")
    loaded.set_progress_bar_config(disable=True)
    for name in PIPELINE_COMPONENTS:
        assert type(loaded.components[name]) is type(pipe.components[name]), name
    for name in ("transformer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder"):
        a, b = state(pipe.components[name]), state(loaded.components[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    def public(config: Any) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)

    expected, got = run(pipe), run(loaded)
    assert torch.equal(got.frames, expected.frames) and torch.equal(got.audio, expected.audio)

    upsample = tiny_upsample_pipeline(components=components)
    upsample.save_pretrained(tmp_path / "upsample")
    upsample_loaded = LTX2LatentUpsamplePipeline.from_pretrained(tmp_path / "upsample")
    latents = run(pipe, output_type="latent").frames
    kw: dict[str, Any] = dict(latents=latents, height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type="latent")
    assert torch.equal(upsample_loaded(**kw).frames, upsample(**kw).frames)


def test_diffusers_encode_video_muxes_the_tiny_outputs_into_a_playable_mp4(pipe: LTX2Pipeline,
                                                                          tmp_path: Path) -> None:
    out = run(pipe, output_type="np", **UNGUIDED)
    path = tmp_path / "tiny.mp4"
    encode_video(out.frames[0], fps=int(FPS), output_path=str(path), audio=out.audio[0],
                 audio_sample_rate=pipe.vocoder.config.output_sampling_rate)
    with av.open(str(path)) as container:
        video_stream, audio_stream = container.streams.video[0], container.streams.audio[0]
        assert (video_stream.width, video_stream.height) == (WIDTH, HEIGHT)
        assert audio_stream.rate == AUDIO_SAMPLE_RATE and audio_stream.channels == 2
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    with av.open(str(path)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    # AAC rounds up to whole 1024-sample frames.
    assert expected_audio_samples() <= samples < expected_audio_samples() + 2 * 1024
