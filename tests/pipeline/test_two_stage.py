"""The two-stage pipeline end to end on the tiny preset, offline: every mode and merge policy
gives the same video for the same seed, the shared DiT is bit-clean after every request
(including one that fails in stage 2), and the flow follows the LTX-2 recipe."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES

from ltx2_pipeline import two_stage
from ltx2_pipeline.errors import GenerationInputError, NonFiniteOutputError
from ltx2_pipeline.loras import load_lora
from ltx2_pipeline.tiny import tiny_transformer
from ltx2_pipeline.two_stage import (
    STAGES,
    GenerationRequest,
    Guidance,
    LTX2TwoStageHQPipeline,
    LTX2TwoStagePipeline,
)
from ltx2_residency import FaultInjector, ResidencyError, StrengthError, WeightState
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures
from untouched import assert_same_bits
from watch import StageWatch

KW: dict[str, Any] = dict(prompt="a robot dancing in the rain", negative_prompt="blurry", height=64, width=64,
                          num_frames=9, num_inference_steps=2, max_sequence_length=32)
MODES = [("original", None), ("resident", None), ("snapshot", False), ("snapshot", True)]
POLICIES = ["sglang", "dynamic", "merge", "auto"]
VARIANTS = {"normal": LTX2TwoStagePipeline, "hq": LTX2TwoStageHQPipeline}
#: Merged vs dynamic LoRA differ by bf16 rounding only: measured max 0.012, mean 0.0014 on the
#: tiny preset; switching the LoRA off moves the video by max 0.09, mean 0.012.
MAX_TOL, MEAN_TOL = 0.03, 0.004


def applied(report: dict[str, Any]) -> tuple[str, str]:
    """How each phase applied its LoRA, read from the transition trace: merged, dynamic or none."""
    events = [r["event"] for r in report["trace"]]
    stage1 = "merged" if "merged_stage1" in events else "dynamic" if "attached_stage1" in events else "none"
    stage2 = "merged" if {"merged_stage2", "activate_stage2"} & set(events) else \
        "dynamic" if "attached_stage2" in events else "none"
    return stage1, stage2


def close(a: np.ndarray, b: np.ndarray) -> bool:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(diff.max()) <= MAX_TOL and float(diff.mean()) <= MEAN_TOL


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str, str], np.ndarray]:
    """Original mode's videos, keyed by (variant, stage-1 kind, stage-2 kind)."""
    out = {}
    for variant, cls in VARIANTS.items():
        for policy in ("merge", "dynamic"):
            result = cls.from_preset("tiny", mode="original", merge_policy=policy)(**KW)
            out[(variant, *applied(result.report))] = result.video
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("mode", "low_vram"), MODES)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_mode_and_policy_gives_the_same_video(references, variant, mode, low_vram, policy) -> None:
    kw = {} if low_vram is None else {"low_vram": low_vram}
    pipe = VARIANTS[variant].from_preset("tiny", mode=mode, merge_policy=policy, **kw)
    clean = weight_bits(pipe.manager.managed_weights)
    result = pipe(**KW)
    assert result.video.shape == (9, 64, 64, 3)
    assert result.report["dit_state_after"] == ("offloaded" if low_vram else "clean")
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    pipe.manager.verify_clean()

    kinds = applied(result.report)
    assert kinds[1] != "none", "stage 2 ran without the distilled LoRA"
    same_arithmetic = references.get((variant, *kinds))
    if same_arithmetic is not None:
        assert np.array_equal(result.video, same_arithmetic), f"{kinds}: not bit-identical to original mode"
    for reference in (v for k, v in references.items() if k[0] == variant):
        assert close(result.video, reference)


def test_the_tolerance_is_tighter_than_the_lora_itself(references) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy="dynamic")
    off = pipe(**KW, strengths={"stage2": {"distilled": 0.0}})
    assert applied(off.report) == ("none", "none")
    assert not close(off.video, references[("normal", "none", "dynamic")])


@pytest.mark.parametrize(("mode", "low_vram"), MODES)
def test_a_request_failing_in_stage2_leaves_the_dit_clean_and_the_next_succeeds(mode, low_vram) -> None:
    faults = FaultInjector()
    kw = {} if low_vram is None else {"low_vram": low_vram}
    pipe = LTX2TwoStageHQPipeline.from_preset("tiny", mode=mode, merge_policy="merge", faults=faults, **kw)
    clean = weight_bits(pipe.manager.managed_weights)
    expected = pipe(**KW).video
    forwards = faults.hits["forward"]  # stage 2 is the last 3 of them: guidance off, one per step
    faults.arm("forward", lambda: RuntimeError("CUDA error: an illegal memory access"), on_hit=forwards - 1)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pipe(**KW)
    assert faults.fired == ["forward"]
    failed = [r for r in pipe.manager.trace if r.phase == "stage2" or r.phase is None][-2:]
    assert [r.event for r in failed] == ["restore", "restored" if not low_vram else "offloaded"]
    assert pipe.manager.state in (WeightState.CLEAN, WeightState.OFFLOADED)
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    pipe.manager.verify_clean()
    assert np.array_equal(pipe(**KW).video, expected)


def test_failure_outside_the_dit_between_steps_also_leaves_it_clean() -> None:
    class Cancel(Exception):
        pass

    class CancelInStage2:
        def stage_started(self, stage: str, steps: int) -> None: ...
        def stage_finished(self, stage: str, ms: float) -> None: ...

        def step(self, stage: str) -> None:
            if stage == "LTX2RefinementStage":
                raise Cancel("client went away")

    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy="merge", progress=CancelInStage2())
    clean = weight_bits(pipe.manager.managed_weights)
    with pytest.raises(Cancel):
        pipe(**KW)
    assert pipe.manager.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    assert pipe.stage2.transformer is pipe.base, "diffusers' pipeline got the base DiT back"


def test_the_flow_follows_the_ltx2_recipe() -> None:
    events: list[tuple[str, str, int]] = []

    class Record:
        def stage_started(self, stage: str, steps: int) -> None:
            events.append(("start", stage, steps))

        def step(self, stage: str) -> None:
            events.append(("step", stage, 0))

        def stage_finished(self, stage: str, ms: float) -> None:
            events.append(("end", stage, 0))

    pipe = LTX2TwoStagePipeline.from_preset("tiny", progress=Record())
    seen: dict[str, Any] = {}

    class Spy:
        """Records the keyword arguments a diffusers pipeline is called with; delegates the rest."""

        def __init__(self, name: str, real: Any) -> None:
            object.__setattr__(self, "_name", name)
            object.__setattr__(self, "_real", real)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            seen[self._name] = kwargs
            out = self._real(*args, **kwargs)
            if self._name == "stage2":
                seen["stage2_sigmas"] = self._real.scheduler.sigmas.tolist()
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def __setattr__(self, name: str, value: Any) -> None:
            setattr(self._real, name, value)

    pipe.stage2 = Spy("stage2", pipe.stage2)  # type: ignore[assignment]
    pipe.upsample = Spy("upsample", pipe.upsample)  # type: ignore[assignment]
    result = pipe(**KW)
    report = result.report
    assert list(report["stages_ms"]) == list(STAGES)
    assert [s for kind, s, _ in events if kind == "start"] == [s for s in STAGES if s != "LTX2LoRARestoreStage"]
    assert sum(1 for kind, s, _ in events if kind == "step" and s == "LTX2AVDenoisingStage") == 2
    assert len(report["denoise_step_ms"]["stage1"]) == 2 and len(report["denoise_step_ms"]["stage2"]) == 3
    # stage 2: the distilled sigmas as given, the lerp at 0.909375, guidance off, at full size
    s2 = seen["stage2"]
    assert s2["sigmas"] == list(STAGE_2_DISTILLED_SIGMA_VALUES) and s2["noise_scale"] == 0.909375
    assert seen["stage2_sigmas"] == pytest.approx([*STAGE_2_DISTILLED_SIGMA_VALUES, 0.0])
    assert (s2["height"], s2["width"]) == (64, 64) and s2["guidance_scale"] == 1.0 and s2["stg_scale"] == 0.0
    assert s2["audio_guidance_scale"] == 1.0 and s2["modality_scale"] == 1.0
    # the upsampler gets stage 1's raw latent at half size and un-normalises nothing itself
    up = seen["upsample"]
    assert (up["height"], up["width"]) == (32, 32) and up["latents_normalized"] is False
    assert tuple(up["latents"].shape[-2:]) == (32 // 8, 32 // 8)
    assert tuple(s2["latents"].shape[-2:]) == (64 // 8, 64 // 8)
    assert report["e2e_ms"] >= sum(report["stages_ms"].values()) * 0.99
    assert report["avg_denoise_ms"] > 0 and report["memory"]["peak_host_rss_bytes"] > 0


def test_decode_is_ltx2_pipelines_own_decode() -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny")
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 3, 8, 8, generator=gen)
    audio = torch.randn(1, 2, 6, 4, generator=gen)
    video, waveform = pipe.decode(latents, audio)
    vae = pipe.components["vae"]
    with torch.no_grad():
        frames = vae.decode(latents.to(vae.dtype), None, return_dict=False)[0]
    assert np.array_equal(video, pipe.stage2.video_processor.postprocess_video(frames, output_type="np"))
    assert video.shape == (1, 9, 64, 64, 3) and waveform.shape[:2] == (1, 2)


def test_strength_overrides_and_a_user_lora_stack(tmp_path) -> None:
    dit = tiny_transformer(seed=0)  # the preset's DiT, weight for weight
    attn = [n for n in linear_names(dit) if ".attn1." in n]
    path = save_lora(tmp_path / "user.safetensors", synthetic_lora(dit, attn, rank=4, relative_norm=0.15, seed=7))
    user = load_lora(path, "user", {"stage1": 1.0, "stage2": 0.5})
    pipe = LTX2TwoStagePipeline.from_preset("tiny", loras=[user], merge_policy="merge")
    stacked = pipe(**KW)
    assert applied(stacked.report) == ("merged", "merged")
    merges = [r for r in stacked.report["trace"] if r["event"] == "merge"]
    assert len(merges) == 2 and stacked.report["dit_state_after"] == "clean"
    without = pipe(**KW, strengths={"stage1": {"user": 0.0}, "stage2": {"user": 0.0}})
    assert not np.array_equal(stacked.video, without.video)
    alone = LTX2TwoStagePipeline.from_preset("tiny", merge_policy="merge")(**KW)
    assert np.array_equal(without.video, alone.video), "a user LoRA at 0 leaves the distilled-only bits"


@pytest.mark.parametrize(("change", "match"), [
    (dict(height=96), "height=96: must be a positive multiple of 64.*try 64 or 128"),
    (dict(width=0), "width=0"),
    (dict(height=True), "height=True"),
    (dict(num_frames=10), r"num_frames=10: must be 4·k \+ 1.*try 9 or 13"),
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(frame_rate=-1.0), "frame_rate=-1.0"),
    (dict(strengths={"stage3": {"distilled": 1.0}}), "unknown phase 'stage3'"),
    (dict(strengths={"stage2": {"styel": 1.0}}), "unknown LoRA 'styel'.*'distilled'"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(frame_rate=float("inf")), "frame_rate=inf: must be a finite number"),
    (dict(frame_rate=float("nan")), "frame_rate=nan"),
    (dict(max_sequence_length=0), "max_sequence_length=0: must be an integer ≥ 1"),
    (dict(max_sequence_length=-5), "max_sequence_length=-5"),
    (dict(seed=-1), r"seed=-1: must be an integer in \[0, 2\*\*63\)"),
])
def test_bad_requests_fail_before_anything_runs(change, match) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny")
    clean = weight_bits(pipe.manager.managed_weights)
    total = pipe.manager.trace.total
    with pytest.raises(GenerationInputError, match=match):
        pipe(GenerationRequest(**{**KW, **change}))
    assert pipe.manager.trace.total == total, "no transition was attempted"
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))


def test_guidance_kwargs_follow_the_dit_depth() -> None:
    assert Guidance().kwargs(48)["spatio_temporal_guidance_blocks"] == [28]
    assert Guidance().kwargs(2)["spatio_temporal_guidance_blocks"] == [1]
    off = Guidance.off().kwargs(48)
    assert off["spatio_temporal_guidance_blocks"] == [] and off["audio_guidance_scale"] == 1.0


def test_each_stage_declares_its_work_and_auto_decides_from_it() -> None:
    from ltx2_residency import PhaseWork

    pipe = LTX2TwoStagePipeline.from_preset("tiny", mode="original", merge_policy="auto")
    req = GenerationRequest(**{**KW, "height": 128, "width": 192, "num_frames": 17})
    vae = pipe.components["vae"]
    frames = (17 - 1) // vae.temporal_compression_ratio + 1
    s = vae.spatial_compression_ratio
    # stage 2: the three distilled sigmas, one call per step, at full size
    assert pipe.work(req, 2) == PhaseWork(3, frames * (128 // s) * (192 // s), 1)
    # stage 1 at half size, guided: CFG batched (twice the tokens), then the modality call (the tiny
    # DiT has no perturbed attention, so no STG call: tests/pipeline/test_stg.py)
    half = frames * (128 // (2 * s)) * (192 // (2 * s))
    assert pipe.work(req, 1) == PhaseWork(req.num_inference_steps, half * 3 // 2, 2)
    unguided = GenerationRequest(**{**KW, "guidance": Guidance.off()})
    assert pipe.work(unguided, 1).passes == 1
    report = pipe(**KW).report
    assert report["merge_policy"] == "auto" and report["dit_state_after"] == "clean"
    assert f"{pipe.work(GenerationRequest(**KW), 2).tokens} tokens" in pipe.manager.policy.last.reason


def test_stage2_merge_ahead_gives_the_same_video_and_rolls_back_from_a_fault() -> None:
    faults = FaultInjector()
    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy="merge", faults=faults)
    clean = weight_bits(pipe.manager.managed_weights)
    ahead = pipe(**KW)
    assert pipe.prepared
    events = [r["event"] for r in ahead.report["trace"]]
    assert events[:3] == ["merge_ahead", "merge", "merged_stage2"]
    pipe.merge_ahead = False
    usual = pipe(**KW)
    assert not pipe.prepared and "merge_ahead" not in [r["event"] for r in usual.report["trace"]]
    assert np.array_equal(ahead.video, usual.video)
    three = {**KW, "num_inference_steps": 3}  # announced before step 2 of 3: over the last AHEAD_STEPS steps
    usual3 = pipe(**three)
    pipe.merge_ahead = True
    ahead3 = pipe(**three)
    assert pipe.prepared and [r["event"] for r in ahead3.report["trace"]][:2] == ["merge_ahead", "merge"]
    assert np.array_equal(ahead3.video, usual3.video)

    faults.arm("merge.layer", lambda: RuntimeError("CUDA error: out of memory"), on_hit=5)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe(**KW)  # in stage 1's last step, some blocks merged
    assert pipe.manager.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    assert np.array_equal(pipe(**KW).video, ahead.video)


@pytest.mark.parametrize(("phase", "value", "match"), [
    ("stage2", 1e30, "strength 1e\\+30 is above 10"),
    ("stage1", float("nan"), "must be finite"),
    ("stage2", float("inf"), "must be finite"),
    ("stage2", -1.0, ">= 0"),
])
def test_strengths_out_of_range_fail_before_anything_runs(phase, value, match) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny")
    clean = weight_bits(pipe.manager.managed_weights)
    total = pipe.manager.trace.total
    with pytest.raises(StrengthError, match=match):
        pipe(GenerationRequest(**KW, strengths={phase: {"distilled": value}}))
    assert pipe.manager.trace.total == total
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))


def test_a_configured_strength_out_of_range_is_refused_before_the_manager_exists(tmp_path) -> None:
    dit = tiny_transformer(seed=0)
    path = save_lora(tmp_path / "user.safetensors", synthetic_lora(dit, linear_names(dit)[:2], rank=4, seed=7))
    with pytest.raises(StrengthError, match="LoRA 'user' stage2: strength 50.0 is above 10"):
        LTX2TwoStagePipeline.from_preset("tiny", loras=[load_lora(path, "user", {"stage2": 50.0})])


def test_one_stage1_step_gives_a_finite_video_from_the_ltx2_schedule() -> None:
    """One step: LTX-2's terminal stretch divides by one minus the only sigma, 1; the schedule is
    then the single step from noise to the clean latent. More steps keep diffusers' own schedule."""
    pipe = LTX2TwoStagePipeline.from_preset("tiny")
    result = pipe(**{**KW, "num_inference_steps": 1})
    assert np.isfinite(result.video).all() and bool(torch.isfinite(result.audio).all())
    assert pipe.stage1.scheduler.sigmas.tolist() == [1.0, 0.0]
    reference = pipe.components["scheduler"]  # diffusers' scheduler, as the components hold it
    for steps in (2, 4, 30):
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        pipe.stage1.scheduler.set_timesteps(sigmas=sigmas, mu=1.0)
        reference.set_timesteps(sigmas=sigmas, mu=1.0)
        assert torch.equal(pipe.stage1.scheduler.sigmas, reference.sigmas)


def _poison(pipe: LTX2TwoStagePipeline, watch: StageWatch, stage: str) -> Any:
    """A forward hook that turns the output of the module ``stage`` runs into NaN, only there."""
    def nan(_module: Any, _args: Any, output: Any) -> Any:
        if watch.stage != stage:
            return None
        if isinstance(output, torch.Tensor):
            return output * float("nan")
        return type(output)(o * float("nan") if isinstance(o, torch.Tensor) else o for o in output)
    module = {"LTX2AVDenoisingStage": pipe.base, "LTX2RefinementStage": pipe.base,
              "LTX2UpsampleStage": pipe.components["latent_upsampler"],
              "LTX2AVDecodingStage": pipe.components["vocoder"]}[stage]
    return module.register_forward_hook(nan)


@pytest.mark.parametrize(("stage", "policy"), [
    ("LTX2AVDenoisingStage", "merge"), ("LTX2UpsampleStage", "merge"), ("LTX2RefinementStage", "merge"),
    ("LTX2RefinementStage", "dynamic"), ("LTX2AVDecodingStage", "sglang"),
])
def test_non_finite_output_fails_at_the_stage_that_made_it(stage, policy) -> None:
    watch = StageWatch()
    pipe = LTX2TwoStageHQPipeline.from_preset("tiny", merge_policy=policy, progress=watch)
    clean = weight_bits(pipe.manager.managed_weights)
    hook = _poison(pipe, watch, stage)
    with pytest.raises(NonFiniteOutputError, match=f"^{stage}: .*non-finite") as info:
        pipe(**KW)
    assert isinstance(info.value, ResidencyError) and info.value.stage == stage
    report = info.value.report
    assert report is not None and report["error"]["stage"] == stage and report["error"]["message"] == str(info.value)
    ran = list(report["stages_ms"])
    assert ran[-1] == stage, "no stage ran after the one that made the non-finite values"
    assert report["dit_state_after"] == "clean" and report["trace"][-1]["dest"] == "clean"
    assert pipe.manager.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    pipe.manager.verify_clean()
    hook.remove()
    assert np.isfinite(pipe(**KW).video).all(), "the next request runs as usual"


def test_a_lora_that_overflows_fails_in_stage1_and_leaves_the_dit_clean(tmp_path) -> None:
    dit = tiny_transformer(seed=0)
    factors = synthetic_lora(dit, [n for n in linear_names(dit) if ".attn1." in n], rank=4, seed=7)
    path = save_lora(tmp_path / "huge.safetensors", {k: v * 1e18 for k, v in factors.items()})  # finite, huge
    for policy in ("merge", "dynamic"):
        user = load_lora(path, "user", {"stage1": 1.0, "stage2": 1.0})
        pipe = LTX2TwoStagePipeline.from_preset("tiny", loras=[user], merge_policy=policy)
        clean = weight_bits(pipe.manager.managed_weights)
        with pytest.raises(NonFiniteOutputError, match="LTX2AVDenoisingStage: stage 1"):
            pipe(**KW)
        assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))


def test_each_stage_output_is_checked_once(monkeypatch) -> None:
    checked: list[str] = []
    real = two_stage._check_finite

    def count(stage: str, outputs: Any) -> None:
        checked.append(stage)
        real(stage, outputs)

    monkeypatch.setattr(two_stage, "_check_finite", count)
    LTX2TwoStagePipeline.from_preset("tiny", merge_policy="dynamic")(**{**KW, "num_inference_steps": 3})
    assert checked == ["LTX2AVDenoisingStage", "LTX2UpsampleStage", "LTX2RefinementStage", "LTX2AVDecodingStage"]
