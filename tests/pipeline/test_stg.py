"""Stage 1's STG pass runs only on a DiT that can perturb. The tiny DiT is built as the LTX-2.0
checkpoints are (``perturbed_attn=False``): there STG is skipped with one STGSkippedWarning per
pipeline and one DiT call less per step, and the video is the one an explicit ``stg_scale=0``
gives. On the same DiT built with ``perturbed_attn=True`` (same weights) STG runs. ``work()`` and
the report count the DiT calls that actually run."""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ltx2_pipeline
from ltx2_pipeline.errors import STGSkippedWarning
from ltx2_pipeline.presets import DISTILLED_FILE, LTX2_PERTURBED_ATTN, full_preset, save_components, tiny_preset
from ltx2_pipeline.two_stage import STAGE2_SIGMAS, GenerationRequest, GenerationResult, Guidance, LTX2TwoStagePipeline
from ltx2_residency import PhaseWork
from ltx2_residency.testing import save_lora, weight_bits
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures
from untouched import assert_same_bits
from watch import StageWatch

STEPS = 2
KW: dict[str, Any] = dict(prompt="a robot dancing in the rain", negative_prompt="blurry", height=64, width=64,
                          num_frames=9, num_inference_steps=STEPS, max_sequence_length=32)
NO_STG = Guidance(stg_scale=0.0, audio_stg_scale=0.0)


def build(perturbed_attn: bool) -> LTX2TwoStagePipeline:
    return LTX2TwoStagePipeline.from_preset("tiny", progress=StageWatch(),
                                            preset_options={"perturbed_attn": perturbed_attn})


def run(pipe: LTX2TwoStagePipeline, **kw: Any) -> tuple[GenerationResult, int]:
    """The result and the DiT calls per stage-1 step, counted by a forward pre-hook on the DiT."""
    watch = pipe.progress
    assert isinstance(watch, StageWatch)
    calls: Counter[str] = Counter()
    hook = pipe.base.register_forward_pre_hook(lambda *_: calls.update([watch.stage]))
    try:
        result = pipe(**{**KW, **kw})
    finally:
        hook.remove()
    assert calls["LTX2RefinementStage"] == len(STAGE2_SIGMAS), "stage 2: one unguided call per step"
    per_step, rest = divmod(calls["LTX2AVDenoisingStage"], STEPS)
    assert rest == 0, calls
    return result, per_step


@contextlib.contextmanager
def no_stg_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if issubclass(w.category, STGSkippedWarning)], [str(w.message) for w in caught]


def same_output(a: GenerationResult, b: GenerationResult) -> bool:
    return np.array_equal(a.video, b.video) and torch.equal(a.audio, b.audio)


@pytest.fixture(scope="module")
def perturbed() -> LTX2TwoStagePipeline:
    return build(perturbed_attn=True)


def test_the_presets_build_the_dit_as_the_ltx2_checkpoints_do() -> None:
    assert LTX2_PERTURBED_ATTN is False
    components, _ = tiny_preset(seed=0)
    assert components["transformer"].config.perturbed_attn is False
    full, _ = full_preset(device="meta")
    assert full["transformer"].config.perturbed_attn is False
    assert full_preset(device="meta", perturbed_attn=True)[0]["transformer"].config.perturbed_attn is True
    assert ltx2_pipeline.STGSkippedWarning is STGSkippedWarning and issubclass(STGSkippedWarning, UserWarning)


def test_a_dit_without_perturbed_attention_skips_stg_with_one_warning(perturbed) -> None:
    pipe = build(perturbed_attn=False)
    assert not pipe.can_perturb
    with no_stg_warning():
        explicit, explicit_calls = run(pipe, guidance=NO_STG)
    with pytest.warns(STGSkippedWarning) as record:
        skipped, skipped_calls = run(pipe)  # diffusers' defaults: stg_scale = audio_stg_scale = 1
    [warning] = [w for w in record if issubclass(w.category, STGSkippedWarning)]
    message = str(warning.message)
    assert "perturbed_attn=False" in message and "conditional prediction again" in message
    assert "perturbed_attn=True" in message, "the message says how to get STG"
    assert warning.filename == __file__, "the warning points at the caller's line"
    with no_stg_warning():
        again, _ = run(pipe)  # once per pipeline

    _, with_stg_calls = run(perturbed)
    assert skipped_calls == explicit_calls == with_stg_calls - 1 == 2  # CFG batch + modality; STG is the third
    assert same_output(skipped, explicit) and same_output(again, explicit)
    report = skipped.report["stage1_guidance"]
    assert report == {"cfg": True, "stg": False, "modality": True, "stg_skipped": True, "dit_calls_per_step": 2}
    assert explicit.report["stage1_guidance"]["stg_skipped"] is False

    with pytest.warns(STGSkippedWarning):  # a new pipeline warns again
        build(perturbed_attn=False)(**{**KW, "num_inference_steps": 1})


def test_a_dit_with_perturbed_attention_runs_stg_on_the_same_weights(perturbed) -> None:
    plain = build(perturbed_attn=False)
    assert perturbed.can_perturb
    base, dit = plain.base, perturbed.base
    assert_same_bits(weight_bits(dict(base.state_dict())), weight_bits(dict(dit.state_dict())))
    differ = {k for k in {**base.config, **dit.config} if k != "_use_default_values"
              and base.config.get(k) != dit.config.get(k)}
    assert differ == {"perturbed_attn"}, "perturbed_attn adds no weights: the DiTs differ in that flag only"
    assert_same_bits(weight_bits(plain.manager.specs["distilled"].tensors),
                     weight_bits(perturbed.manager.specs["distilled"].tensors))

    with no_stg_warning():
        with_stg, calls = run(perturbed)
        without, no_stg_calls = run(perturbed, guidance=NO_STG)
    assert calls == no_stg_calls + 1 == 3
    assert with_stg.report["stage1_guidance"] == {"cfg": True, "stg": True, "modality": True, "stg_skipped": False,
                                                  "dit_calls_per_step": 3}
    assert not np.array_equal(with_stg.video, without.video), "STG perturbed the DiT and moved the video"
    # with nothing to perturb, the perturbed-attention DiT computes what the plain one does, bit for bit
    with pytest.warns(STGSkippedWarning):
        skipped, _ = run(plain)
    assert same_output(skipped, without)


@pytest.mark.parametrize(("guidance", "plain_calls", "perturbed_calls"), [
    (Guidance(), 2, 3),
    (NO_STG, 2, 2),
    (Guidance(stg_scale=0.0, audio_stg_scale=1.0), 2, 3),  # audio-only STG is STG too
    (Guidance(stg_scale=1.0, audio_stg_scale=0.0), 2, 3),  # diffusers: audio_stg_scale = 0.0 or stg_scale
    (Guidance(modality_scale=1.0, audio_modality_scale=1.0), 1, 2),
    (Guidance(guidance_scale=1.0, audio_guidance_scale=1.0, modality_scale=1.0, audio_modality_scale=1.0), 1, 2),
    (Guidance.off(), 1, 1),
], ids=["default", "no-stg", "audio-stg", "video-stg", "no-modality", "stg-only", "off"])
def test_work_counts_the_dit_calls_that_run(perturbed, guidance, plain_calls, perturbed_calls) -> None:
    plain = build(perturbed_attn=False)
    req = GenerationRequest(**KW, guidance=guidance)
    vae = plain.components["vae"]
    frames = (req.num_frames - 1) // vae.temporal_compression_ratio + 1
    cell = 2 * vae.spatial_compression_ratio  # stage 1 runs at half size
    half = frames * (req.height // cell) * (req.width // cell)
    for pipe, expected in ((plain, plain_calls), (perturbed, perturbed_calls)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", STGSkippedWarning)
            result, calls = run(pipe, guidance=guidance)
        work = pipe.work(req, 1)
        assert calls == expected == work.passes == result.report["stage1_guidance"]["dit_calls_per_step"]
        batched = 2 if guidance.cfg else 1  # the CFG call carries both halves: twice the tokens
        assert work == PhaseWork(STEPS, half * (batched + expected - 1) // expected, expected)
        assert pipe.work(req, 2) == PhaseWork(len(STAGE2_SIGMAS), 4 * half, 1)


def test_a_model_folder_with_perturbed_attention_keeps_stg(tmp_path: Path) -> None:
    components, lora = tiny_preset(seed=0, perturbed_attn=True)
    root = save_components(components, tmp_path / "ltx23-like")
    save_lora(root / DISTILLED_FILE, lora)
    pipe = LTX2TwoStagePipeline.from_pretrained(root, progress=StageWatch())
    assert pipe.base.config.perturbed_attn is True and pipe.can_perturb
    with no_stg_warning():
        result, calls = run(pipe)
    assert calls == 3 and result.report["stage1_guidance"]["stg"] is True
