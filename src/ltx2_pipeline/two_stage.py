"""The LTX-2 two-stage flow on diffusers components, every DiT weight change through a
:class:`~ltx2_residency.ResidencyManager`.

text encoding (once, reused by both stages) → stage 1 at half the target resolution
(``LTX2Pipeline`` with the LTX-2 sigma schedule and its guidance) → ×2 latent upsample
(``LTX2LatentUpsamplePipeline``: raw latent in, raw latent out; stage 2's ``latents=`` then
normalises it) → stage 2 (``LTX2Pipeline`` on a scheduler that takes the distilled sigmas as
given; ``noise_scale`` = 0.909375 is the ``lerp(upsampled, noise, 0.909375)``; guidance off;
distilled LoRA at its stage-2 strength) → decode video and audio → mp4 with the audio track.

Stage 1's STG pass runs only on a DiT built with perturbed attention (``perturbed_attn=True``,
as LTX-2.3's is): on any other (LTX-2.0's) it would compute the conditional prediction again,
so the pipeline skips it and warns once (:class:`~ltx2_pipeline.errors.STGSkippedWarning`).

The pipeline never touches a weight: it asks the manager for the DiT each phase runs on
(``req.enter(phase)``) and hands that module to diffusers' pipeline for the stage. The request
is closed (LoRA restored, the shared DiT back to clean) before the VAE decode, so a failure
anywhere in the denoising leaves the DiT clean for the next request.

Stage names follow sglang's LTX-2 stages, so ``stages_ms`` reads like its perf baselines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, FlowMatchEulerDiscreteScheduler, LTX2LatentUpsamplePipeline, LTX2Pipeline
from diffusers.pipelines.ltx2.utils import STAGE_2_DISTILLED_SIGMA_VALUES
from torch import nn

from ltx2_residency import CompileSpec, LoRASpec, ManagerOptions, Phase, PhaseWork, Request, ResidencyManager

from .compiling import check_compile, compile_counts, compile_report, cuda_graph_hooks
from .components import PIPELINE_COMPONENTS
from .context_parallel import ContextParallel, ContextParallelDiTs, check_context_parallel, check_sequences
from .errors import GenerationInputError, NonFiniteOutputError, STGSkippedWarning
from .generation import GenerationRequest, GenerationResult, Guidance, check_request
from .loras import VARIANT_STRENGTHS, check_strength, load_lora, to_diffusers_format
from .parallel import CFGParallel, check_cfg_parallel
from .presets import DISTILLED_FILE, full_preset, load_components, tiny_preset

STAGE2_SIGMAS: tuple[float, ...] = tuple(STAGE_2_DISTILLED_SIGMA_VALUES)
STAGES = ("TextEncodingStage", "LTX2LoRASwitchStage_stage1", "LTX2AVDenoisingStage", "LTX2UpsampleStage",
          "LTX2LoRASwitchStage_stage2", "LTX2RefinementStage", "LTX2LoRARestoreStage", "LTX2AVDecodingStage",
          "LTX2LoRARestoreWaitStage")
#: A path (either key format), in-memory tensors, or a ready spec.
DistilledLoRA = str | os.PathLike[str] | Mapping[str, torch.Tensor] | LoRASpec
DENOISE_STAGES = {"LTX2AVDenoisingStage": "stage1", "LTX2RefinementStage": "stage2"}
#: What each checked stage hands on, and what to try when it is not finite.
STAGE_OUTPUTS = {
    "LTX2AVDenoisingStage": ("stage 1 (denoising at half size)",
                             "lower the LoRA strengths in stage 1, or check the LoRA files and the model's weights"),
    "LTX2UpsampleStage": ("the x2 latent upsample",
                          "check the latent upsampler's weights, or run in float32 (--dtype fp32)"),
    "LTX2RefinementStage": ("stage 2 (refinement)",
                            "lower the LoRA strengths in stage 2, or check the LoRA files and the model's weights"),
    "LTX2AVDecodingStage": ("the video/audio decode",
                            "check the VAE and vocoder weights, or run in float32 (--dtype fp32)"),
}
#: Stage 1's last steps a merge ahead is announced over: its check (the undo records) rides behind
#: the first, its writes behind the last (one step: the whole merge behind the last).
AHEAD_STEPS = 2
#: The :class:`~ltx2_pipeline.errors.STGSkippedWarning` a request asking for STG gets (once per
#: pipeline) when the DiT cannot perturb.
STG_SKIPPED = ("stage 1 skips spatio-temporal guidance (STG): the DiT was built without perturbed attention "
               "(perturbed_attn=False, as the LTX-2.0 checkpoints are), so it ignores the STG blocks and the STG "
               "pass would only compute the conditional prediction again, one DiT call per step for nothing. For "
               "STG, use a DiT built with perturbed_attn=True (as LTX-2.3's is); to skip STG without this "
               "warning, pass Guidance(stg_scale=0.0, audio_stg_scale=0.0).")


class _LTX2Scheduler(FlowMatchEulerDiscreteScheduler):
    """Stage 1's scheduler: LTX-2's shifted sigmas stretched to end at ``shift_terminal``, where a
    schedule can be stretched. The stretch divides by one minus the last sigma, and a one-step
    schedule's only sigma is 1 (pure noise): there it is left as it is, one step from noise to
    the clean latent, instead of turning every sigma into NaN."""

    def stretch_shift_to_terminal(self, t: Any) -> Any:
        if float(t[-1]) >= 1.0:
            return t
        return super().stretch_shift_to_terminal(t)


def _check_finite(stage: str, outputs: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """:class:`NonFiniteOutputError` naming ``stage`` when any of its outputs holds NaN or inf."""
    for what, value in outputs.items():
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad, total = int((~finite).sum()), finite.numel()
            label, fix = STAGE_OUTPUTS[stage]
            raise NonFiniteOutputError(stage, f"{stage}: {label} produced non-finite {what} ({bad} of {total} "
                                              f"values are NaN or infinite); {fix}")


class Progress(Protocol):
    """What the pipeline tells a progress display (the CLI draws rich bars from it)."""

    def stage_started(self, stage: str, steps: int) -> None: ...
    def step(self, stage: str) -> None: ...
    def stage_finished(self, stage: str, ms: float) -> None: ...


class _Silent:
    def stage_started(self, stage: str, steps: int) -> None: ...
    def step(self, stage: str) -> None: ...
    def stage_finished(self, stage: str, ms: float) -> None: ...


class _Clock:
    """Wall time per stage and per denoising step; synchronises the current CUDA stream so a
    stage's time is its own (not the device: an overlapped restore on the manager's side stream
    runs on under the decode, and is waited for where the pipeline says so)."""

    def __init__(self, device: torch.device, progress: Progress) -> None:
        self.cuda = device.type == "cuda"
        self.progress = progress
        self.stages_ms: dict[str, float] = {}
        self.steps_ms: dict[str, list[float]] = {}
        self._last = 0.0
        self.compiled_at_start = compile_counts()  # Dynamo's, process-wide: the request's own is the difference

    def now(self) -> float:
        if self.cuda:
            torch.cuda.current_stream().synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, steps: int = 0) -> Iterator[None]:
        self.progress.stage_started(name, steps)
        start = self._last = self.now()
        yield
        self.stages_ms[name] = (self.now() - start) * 1e3
        self.progress.stage_finished(name, self.stages_ms[name])

    def step(self, stage: str) -> None:
        # a step runs from the previous step's end (the stage's start for the first step)
        now = self.now()
        self.steps_ms.setdefault(DENOISE_STAGES[stage], []).append((now - self._last) * 1e3)
        self._last = now
        self.progress.step(stage)


def _move(components: Mapping[str, Any], device: str | torch.device) -> None:
    for module in components.values():
        if isinstance(module, nn.Module):
            module.to(device)


def _device_of(module: nn.Module) -> torch.device:
    return next(iter(module.parameters())).device


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class LTX2TwoStagePipeline:
    """LTX-2 two-stage generation with the DiT held by a :class:`ResidencyManager`.

    Args:
        components: the ``LTX2Pipeline`` components plus ``latent_upsampler``
            (see :mod:`ltx2_pipeline.presets`).
        distilled_lora: the distilled LoRA: a safetensors path (PEFT/diffusers or original
            ``diffusion_model.*`` keys), in-memory tensors, or a ready :class:`LoRASpec`
            (used as given). Paths and tensors get the variant's strengths.
        loras: further LoRAs (e.g. a user's style LoRA), stacked after the distilled one.
        mode, merge_policy, options: passed to :class:`ResidencyManager` (``options``: its
            :class:`ManagerOptions`; the deprecated 0.1 keywords in ``**manager_options`` too).
        progress: receives stage and step events (the CLI's rich bars).
        compile: the DiT under ``torch.compile`` (:mod:`.compiling`): ``None`` (eager), ``True``, a
            mode name or a :class:`~ltx2_residency.CompileSpec`, checked before anything is built.
        process_group: a ``torch.distributed`` group when the pipeline runs on several ranks (one
            pipeline per rank, the same requests on each): the managers change the weights in lock-step.
        cfg_parallel: stage 1's guidance batch split across the ranks of ``process_group``
            (:class:`~ltx2_pipeline.parallel.CFGParallel`; two ranks: one guidance branch each).
        context_parallel: every DiT call's sequences split across the ranks of ``process_group`` with
            diffusers' context parallelism (:mod:`~ltx2_pipeline.context_parallel`): ``"ulysses"``,
            ``"ring"`` or a diffusers ``ContextParallelConfig`` spanning the group.
    """

    variant = "normal"

    def __init__(self, components: Mapping[str, Any], distilled_lora: DistilledLoRA, *,
                 loras: Sequence[LoRASpec] = (), mode: str = "original", merge_policy: str = "sglang",
                 progress: Progress | None = None, options: ManagerOptions | None = None,
                 compile: CompileSpec | str | bool | None = None, process_group: Any = None,
                 cfg_parallel: bool = False, context_parallel: ContextParallelConfig | str | None = None,
                 **manager_options: Any) -> None:
        compile_spec = check_compile(compile)  # a bad value raises before anything is built
        check_cfg_parallel(cfg_parallel, process_group)
        missing = [k for k in (*PIPELINE_COMPONENTS, "latent_upsampler") if k not in components]
        if missing:
            raise GenerationInputError(f"components lack {', '.join(missing)}; build them with "
                                       "ltx2_pipeline.presets (tiny_preset, full_preset, load_components)")
        cp_spec = check_context_parallel(context_parallel, process_group, cfg_parallel, components["transformer"],
                                         components["connectors"], compile_spec)
        self.components = dict(components)
        strengths = VARIANT_STRENGTHS[self.variant]
        if isinstance(distilled_lora, LoRASpec):
            distilled = distilled_lora
        elif isinstance(distilled_lora, Mapping):
            distilled = LoRASpec("distilled", tensors=to_diffusers_format(distilled_lora, "LoRA 'distilled'"),
                                 strengths=strengths)
        else:
            distilled = load_lora(distilled_lora, "distilled", strengths)
        for spec in (distilled, *loras):
            if isinstance(spec, LoRASpec):  # anything else is the manager's to refuse
                for phase, value in spec.strengths.items():
                    check_strength(value, f"LoRA {spec.name!r} {getattr(phase, 'value', phase)}")
        self.manager = ResidencyManager(components["transformer"], mode=mode, loras=[distilled, *loras],
                                        merge_policy=merge_policy, options=options, process_group=process_group,
                                        **manager_options)
        self.process_group = process_group
        self.cfg_parallel = cfg_parallel
        self.context_parallel = cp_spec
        if compile_spec is not None:
            try:
                self.manager.compile(compile_spec)  # the DiT only: every DiT the manager runs (a stage-2 copy too)
            except BaseException:
                self.manager.close()  # the model is given back, free for another pipeline
                raise
        self._compile_spec = compile_spec
        self.progress: Progress = progress or _Silent()
        shared = {k: components[k] for k in PIPELINE_COMPONENTS}
        scheduler = components["scheduler"]
        if type(scheduler) is FlowMatchEulerDiscreteScheduler:
            scheduler = _LTX2Scheduler.from_config(scheduler.config)
        self.stage1 = LTX2Pipeline(**{**shared, "scheduler": scheduler})
        # stage 2 takes the distilled sigmas as given: the LTX-2 scheduler config would shift them
        raw = FlowMatchEulerDiscreteScheduler.from_config(components["scheduler"].config,
                                                          use_dynamic_shifting=False, shift_terminal=None)
        self.stage2 = LTX2Pipeline(**{**shared, "scheduler": raw})
        self.upsample = LTX2LatentUpsamplePipeline(vae=components["vae"],
                                                   latent_upsampler=components["latent_upsampler"])
        for pipe in (self.stage1, self.stage2, self.upsample):
            pipe.set_progress_bar_config(disable=True)
        self.base = components["transformer"]
        self.device = _device_of(self.base)
        self._cp_dits = None
        if cp_spec is not None:
            try:
                self._cp_dits = ContextParallelDiTs(cp_spec, self.device)
                self._cp_dits.enable(self.base)  # collective on every rank: built here, not at a request
            except BaseException:
                self.close()  # the model is given back, free for another pipeline
                raise
        # stage 2's merge starts behind stage 1's last step (Request.prepare); off: at the switch
        self.merge_ahead = True
        self.prepared = False  # whether the last request's stage-2 weights were started ahead
        self._stg_warned = False  # STGSkippedWarning is given once per pipeline

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, preset: str, *, seed: int = 0, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.bfloat16, preset_options: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> LTX2TwoStagePipeline:
        """``"tiny"`` (CPU-sized, offline) or ``"full"`` (real shapes, random weights, on ``device``);
        ``preset_options`` go to :func:`~ltx2_pipeline.presets.tiny_preset` or
        :func:`~ltx2_pipeline.presets.full_preset` (e.g. ``{"perturbed_attn": True}``)."""
        kwargs["compile"] = check_compile(kwargs.get("compile"))  # checked before anything is built
        if preset == "tiny":
            components, lora = tiny_preset(seed, dtype, **dict(preset_options or {}))
            if device is not None:
                _move(components, device)
                lora = {k: v.to(device) for k, v in lora.items()}
        elif preset == "full":
            components, lora = full_preset(device or "cuda", dtype, seed, **dict(preset_options or {}))
        else:
            raise GenerationInputError(f"unknown preset {preset!r}; expected 'tiny' or 'full' (or a --model-path)")
        kwargs.setdefault("distilled_lora", lora)
        return cls(components, **kwargs)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], *, distilled_lora: Any = None,
                        dtype: torch.dtype | None = torch.bfloat16, device: str | torch.device | None = None,
                        **kwargs: Any) -> LTX2TwoStagePipeline:
        """A local diffusers-format folder; the distilled LoRA defaults to its ``distilled_lora.safetensors``."""
        kwargs["compile"] = check_compile(kwargs.get("compile"))  # checked before anything loads
        components = load_components(model_path, dtype)
        if distilled_lora is None:
            candidate = Path(model_path) / DISTILLED_FILE
            if not candidate.is_file():
                raise GenerationInputError(f"no distilled LoRA: pass --distilled-lora, or put {DISTILLED_FILE} "
                                           f"into {str(model_path)!r}")
            distilled_lora = candidate
        if device is not None:
            _move(components, device)
        return cls(components, distilled_lora, **kwargs)

    def close(self) -> None:
        """Give the DiT back as it was given (the manager's :meth:`~ltx2_residency.ResidencyManager.close`,
        then context parallelism off), free for another pipeline. Between requests only."""
        self.manager.close()
        if self._cp_dits is not None:
            self._cp_dits.close()

    @property
    def compile_spec(self) -> CompileSpec | None:
        """How the DiT is compiled (``compile=``), or ``None``: it runs eager."""
        return self._compile_spec

    # ------------------------------------------------------------------ generation
    def check(self, req: GenerationRequest) -> None:
        """Raise :class:`GenerationInputError` for a request the flow cannot run (before any work)."""
        vae = self.components["vae"]
        check_request(req, vae.spatial_compression_ratio, vae.temporal_compression_ratio, list(self.manager.specs))
        if self.context_parallel is not None:
            longer = (dataclasses.replace(req, num_frames=req.num_frames + k * vae.temporal_compression_ratio)
                      for k in range(1, 65))
            check_sequences(self.context_parallel, self.sequences(req), (
                (r.num_frames, self.sequences(r)) for r in longer))

    def sequences(self, req: GenerationRequest) -> dict[str, int]:
        """The tokens of each sequence context parallelism splits in the request's DiT calls: the video
        per stage and the text (the audio stream stays whole on every rank)."""
        return {"stage-1 video": self._video_tokens(req, 1), "stage-2 video": self._video_tokens(req, 2),
                "text": req.max_sequence_length}

    def _video_tokens(self, req: GenerationRequest, stage: int) -> int:
        vae, cfg = self.components["vae"], self.base.config
        frames = (req.num_frames - 1) // vae.temporal_compression_ratio + 1
        scale = vae.spatial_compression_ratio * (2 if stage == 1 else 1)
        side = scale * cfg.patch_size
        return frames // cfg.patch_size_t * (req.height // side) * (req.width // side)

    @property
    def can_perturb(self) -> bool:
        """Whether the DiT was built with perturbed attention (``perturbed_attn=True``), which STG needs."""
        return bool(getattr(self.base.config, "perturbed_attn", False))

    def stage1_guidance(self, req: GenerationRequest) -> Guidance:
        """The guidance stage 1 runs: the request's, without STG where the DiT cannot perturb (there
        the STG call would repeat the conditional one)."""
        g = req.guidance
        return g.without_stg() if g.stg and not self.can_perturb else g

    def __call__(self, request: GenerationRequest | None = None, /, **kwargs: Any) -> GenerationResult:
        req = request if request is not None else GenerationRequest(**kwargs)
        self.check(req)
        if req.guidance.stg and not self.can_perturb and not self._stg_warned:
            self._stg_warned = True
            warnings.warn(STG_SKIPPED, STGSkippedWarning, stacklevel=2)
        clock = _Clock(self.device, self.progress)
        self.prepared = False
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        gen = torch.Generator("cpu").manual_seed(req.seed)  # same noise on every device
        start = clock.now()
        opened: list[int] = []  # the manager request's id, once it opens (before any checked stage)
        # the LoRAs chosen and their strengths are checked now, before any work; they start loading
        # when the DiT request is entered
        scope = self.manager.request(loras=self.lora_mix(req))
        try:
            video, audio = self._stages(req, clock, gen, opened, scope)
        except NonFiniteOutputError as exc:
            self.manager.synchronize()  # the failed request's undo, so the report shows the DiT as it is left
            exc.report = self._report(req, clock, (clock.now() - start) * 1e3, opened[0])
            exc.report["error"] = {"type": type(exc).__name__, "stage": exc.stage, "message": str(exc)}
            raise
        e2e_ms = (clock.now() - start) * 1e3
        report = self._report(req, clock, e2e_ms, opened[0])
        return GenerationResult(video=video[0], audio=audio[0], frame_rate=req.frame_rate, report=report,
                                audio_sample_rate=int(self.components["vocoder"].config.output_sampling_rate))

    def lora_mix(self, req: GenerationRequest) -> dict[str, Any] | None:
        """The manager request's ``loras=``: the request's LoRAs, on the distilled LoRA at its variant's
        strengths unless the request names it (``None``: every registered LoRA at its own strengths)."""
        if req.loras is None:
            return None
        distilled = self.manager.loras.get("distilled")
        base = {"distilled": {p.value: s for p, s in distilled.spec.strengths.items()}} if distilled else {}
        return {**base, **req.loras}

    def _stages(self, req: GenerationRequest, clock: _Clock, gen: torch.Generator,
                opened: list[int], scope: Any) -> tuple[np.ndarray, torch.Tensor]:
        """Every stage in order, each output checked for non-finite values before the next runs."""
        layers = self.base.config.num_layers
        with torch.no_grad():
            with clock.stage("TextEncodingStage"):
                embeds, mask, neg, neg_mask = self.stage1.encode_prompt(
                    req.prompt, req.negative_prompt, do_classifier_free_guidance=True,
                    max_sequence_length=req.max_sequence_length, device=self.device)
            with scope as mreq:
                opened.append(mreq.id)
                with clock.stage("LTX2LoRASwitchStage_stage1"):
                    dit = mreq.enter(Phase.STAGE1, strengths=req.strengths.get("stage1"), work=self.work(req, 1))
                with clock.stage("LTX2AVDenoisingStage", req.num_inference_steps), self._runs_on(self.stage1, dit):
                    s1 = self.stage1(
                        prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                        negative_prompt_attention_mask=neg_mask, height=req.height // 2, width=req.width // 2,
                        num_frames=req.num_frames, frame_rate=req.frame_rate,
                        num_inference_steps=req.num_inference_steps, generator=gen, output_type="latent",
                        callback_on_step_end=self._on_step(clock, "LTX2AVDenoisingStage", self._ahead(mreq, req)),
                        max_sequence_length=req.max_sequence_length, **self.stage1_guidance(req).kwargs(layers))
                _check_finite("LTX2AVDenoisingStage", {"video latents": s1.frames, "audio latents": s1.audio})
                with clock.stage("LTX2UpsampleStage"):
                    upsampled = self.upsample(
                        latents=s1.frames, height=req.height // 2, width=req.width // 2, num_frames=req.num_frames,
                        latents_normalized=False, adain_factor=0.0, tone_map_compression_ratio=0.0,
                        output_type="latent").frames
                _check_finite("LTX2UpsampleStage", {"video latents": upsampled})
                with clock.stage("LTX2LoRASwitchStage_stage2"):
                    dit = mreq.enter(Phase.STAGE2, strengths=req.strengths.get("stage2"), work=self.work(req, 2))
                with clock.stage("LTX2RefinementStage", len(STAGE2_SIGMAS)), self._runs_on(self.stage2, dit):
                    s2 = self.stage2(
                        prompt_embeds=embeds, prompt_attention_mask=mask, latents=upsampled, audio_latents=s1.audio,
                        height=req.height, width=req.width, num_frames=req.num_frames, frame_rate=req.frame_rate,
                        noise_scale=STAGE2_SIGMAS[0], sigmas=list(STAGE2_SIGMAS),
                        num_inference_steps=len(STAGE2_SIGMAS), generator=gen, output_type="latent",
                        callback_on_step_end=self._on_step(clock, "LTX2RefinementStage"),
                        max_sequence_length=req.max_sequence_length, **Guidance.off().kwargs(layers))
                _check_finite("LTX2RefinementStage", {"video latents": s2.frames, "audio latents": s2.audio})
                restore = clock.now()
            # the request is closed: the shared DiT is restored, or (overlap_restore) its exact undo
            # is queued on the manager's side stream and runs under the decode
            clock.stages_ms["LTX2LoRARestoreStage"] = (clock.now() - restore) * 1e3
            with clock.stage("LTX2AVDecodingStage"):
                video, audio = self.decode(s2.frames, s2.audio)
            _check_finite("LTX2AVDecodingStage", {"video frames": video, "audio": audio})
            with clock.stage("LTX2LoRARestoreWaitStage"):  # what of the undo the decode did not hide
                self.manager.synchronize()
        return video, audio

    def work(self, req: GenerationRequest, stage: int) -> PhaseWork:
        """What a stage runs, for the manager's ``merge_policy="auto"``: its steps, its video tokens
        per DiT call and its calls per step. Stage 1's guidance runs the DiT once for CFG (the
        conditional and unconditional halves batched: twice the tokens) and once more for each of
        STG (only on a DiT that can perturb: :meth:`stage1_guidance`) and modality guidance; the
        tokens are averaged over those calls."""
        tokens = self._video_tokens(req, stage)
        if stage == 2:
            return PhaseWork(len(STAGE2_SIGMAS), tokens, 1)
        g = self.stage1_guidance(req)
        batched = [2 if g.cfg else 1] + [1] * (g.stg + g.modality)
        return PhaseWork(req.num_inference_steps, max(1, tokens * sum(batched) // len(batched)), len(batched))

    def decode(self, latents: torch.Tensor, audio_latents: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Raw (un-normalised) latents → video frames in [0, 1] and the waveform, as ``LTX2Pipeline``
        decodes them (decode timestep 0: no decode noise)."""
        vae, audio_vae = self.components["vae"], self.components["audio_vae"]
        latents = latents.to(vae.dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        with torch.no_grad():
            frames = vae.decode(latents, timestep, return_dict=False)[0]
            video = self.stage2.video_processor.postprocess_video(frames, output_type="np")
            mel = audio_vae.decode(audio_latents.to(audio_vae.dtype), return_dict=False)[0]
            audio = self.components["vocoder"](mel)
        return video, audio

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _runs_on(self, pipe: LTX2Pipeline, dit: nn.Module) -> Iterator[None]:
        """Hand diffusers' pipeline the module the phase runs on; give the base back afterwards."""
        if self.cfg_parallel:
            pipe.transformer = CFGParallel(dit, self.process_group)
        elif self._cp_dits is not None:
            pipe.transformer = ContextParallel(dit, self._cp_dits)
        else:
            pipe.transformer = dit
        hooks = cuda_graph_hooks(dit, self._compile_spec, self.device)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            pipe.transformer = self.base

    def _ahead(self, mreq: Request, req: GenerationRequest) -> Callable[[int], None]:
        """Stage 1's step callback: before its last :data:`AHEAD_STEPS` steps (after the first),
        announce their DiT calls (as many a step as the steps so far ran) so stage 2's merge can
        start behind them (``Request.prepare``): checked behind the first, written behind the last."""
        steps = req.num_inference_steps
        at = max(1, steps - AHEAD_STEPS)

        def before_last_steps(done: int) -> None:
            if self.merge_ahead and done == at < steps:
                self.prepared = mreq.prepare(Phase.STAGE2, strengths=req.strengths.get("stage2"),
                                             work=self.work(req, 2), calls=max(1, mreq.calls // done) * (steps - done))
        return before_last_steps

    @staticmethod
    def _on_step(clock: _Clock, stage: str, then: Callable[[int], None] | None = None) -> Any:
        def callback(_pipe: Any, i: int, _t: torch.Tensor, _kw: dict[str, Any]) -> dict[str, Any]:
            clock.step(stage)
            if then is not None:
                then(i + 1)
            return {}
        return callback

    def _report(self, req: GenerationRequest, clock: _Clock, e2e_ms: float, request_id: int) -> dict[str, Any]:
        steps = [ms for stage in ("stage1", "stage2") for ms in clock.steps_ms.get(stage, [])]
        mgr = self.manager
        peak_device = int(torch.cuda.max_memory_allocated(self.device)) if clock.cuda else None
        guidance = self.stage1_guidance(req)
        return {
            "pipeline": type(self).__name__,
            "variant": self.variant,
            "mode": mgr.mode.value,
            "mode_reason": mgr.mode_reason,
            "merge_policy": mgr.policy.name.value,
            "device": torch.cuda.get_device_name(self.device) if clock.cuda else str(self.device),
            "ranks": {"size": 1 if self.process_group is None else dist.get_world_size(self.process_group),
                      "cfg_parallel": self.cfg_parallel,
                      "context_parallel": None if self.context_parallel is None else self.context_parallel.kind},
            "request": {"prompt": req.prompt, "height": req.height, "width": req.width,
                        "num_frames": req.num_frames, "frame_rate": req.frame_rate,
                        "num_inference_steps": req.num_inference_steps, "seed": req.seed,
                        "strengths": {p: dict(s) for p, s in req.strengths.items()},
                        "loras": self.lora_mix(req)},
            "e2e_ms": e2e_ms,
            "avg_denoise_ms": statistics.fmean(steps) if steps else 0.0,
            "median_denoise_ms": statistics.median(steps) if steps else 0.0,
            "stages_ms": {name: clock.stages_ms[name] for name in STAGES if name in clock.stages_ms},
            # stage 1's DiT calls: stg_skipped when the request asked for STG and the DiT cannot perturb
            "stage1_guidance": {"cfg": guidance.cfg, "stg": guidance.stg, "modality": guidance.modality,
                                "stg_skipped": req.guidance.stg and not guidance.stg,
                                "dit_calls_per_step": self.work(req, 1).passes},
            "denoise_step_ms": clock.steps_ms,
            **compile_report(self._compile_spec, clock.compiled_at_start),  # compile, graphs_compiled, compile_ms
            "trace": [r.as_dict() for r in mgr.trace.for_request(request_id)],
            "dit_state_after": mgr.state.value,
            "memory": {"peak_device_bytes": peak_device, "peak_host_rss_bytes": _peak_rss_bytes(),
                       "manager": mgr.memory()},
        }


class LTX2TwoStageHQPipeline(LTX2TwoStagePipeline):
    """The HQ variant: the distilled LoRA at 0.25 in stage 1 and 0.5 in stage 2 (whether stage 1
    merges is the merge policy's call)."""

    variant = "hq"
