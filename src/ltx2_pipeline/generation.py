"""What one generation asks for and what it returns: :class:`GenerationRequest` (with stage 1's
:class:`Guidance`), :class:`GenerationResult`, and :func:`check_request`, the checks a request
passes before any pipeline work starts."""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.utils import encode_video

from ltx2_residency import Phase

from .errors import GenerationInputError
from .loras import check_strength


@dataclass(frozen=True)
class Guidance:
    """Stage 1's guidance, as diffusers' ``LTX2Pipeline`` takes it (its defaults).

    ``stg_blocks=None``: diffusers' default block 28, or the last block of a DiT with fewer.
    """

    guidance_scale: float = 3.0
    stg_scale: float = 1.0
    modality_scale: float = 3.0
    guidance_rescale: float = 0.7
    audio_guidance_scale: float = 7.0
    audio_stg_scale: float = 1.0
    audio_modality_scale: float = 3.0
    audio_guidance_rescale: float = 0.7
    stg_blocks: tuple[int, ...] | None = None

    @classmethod
    def off(cls) -> Guidance:
        """No guidance term at all (stage 2). ``audio_*`` must be set too: diffusers falls back
        to the video value only for ``None``."""
        return cls(1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, ())

    # which DiT calls a step of LTX2Pipeline makes, decided as diffusers does: an ``audio_*`` scale
    # of 0 or None falls back to the video one (``audio_x = audio_x or x``)
    @property
    def cfg(self) -> bool:
        """The conditional and unconditional halves batched in one call (else the conditional alone)."""
        return self.guidance_scale > 1 or (self.audio_guidance_scale or self.guidance_scale) > 1

    @property
    def stg(self) -> bool:
        """A spatio-temporal guidance call."""
        return self.stg_scale > 0 or (self.audio_stg_scale or self.stg_scale) > 0

    @property
    def modality(self) -> bool:
        """A modality-isolation call."""
        return self.modality_scale > 1 or (self.audio_modality_scale or self.modality_scale) > 1

    def without_stg(self) -> Guidance:
        """This guidance with no STG call: both scales 0 (a falsy ``audio_stg_scale`` alone would
        fall back to ``stg_scale``)."""
        return replace(self, stg_scale=0.0, audio_stg_scale=0.0)

    def kwargs(self, num_layers: int) -> dict[str, Any]:
        blocks = list(self.stg_blocks) if self.stg_blocks is not None else [min(28, num_layers - 1)]
        out = {k: v for k, v in asdict(self).items() if k != "stg_blocks"}
        return {**out, "spatio_temporal_guidance_blocks": blocks}


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. ``height``/``width`` are the output size (stage 1 runs at half);
    ``loras`` chooses this generation's LoRAs among those registered with the pipeline's manager
    (``{"style": 0.8}``: every phase; ``{"style": {"stage1": 0.5}}``: the phases named), run with the
    distilled LoRA at its variant's strengths unless it is named too; ``None``: every registered
    LoRA at its own strengths. ``strengths`` overrides the strengths per phase:
    ``{"stage2": {"distilled": 0.5}}``."""

    prompt: str
    negative_prompt: str = ""
    height: int = 512
    width: int = 768
    num_frames: int = 121
    frame_rate: float = 24.0
    num_inference_steps: int = 30
    seed: int = 0
    guidance: Guidance = field(default_factory=Guidance)
    strengths: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    max_sequence_length: int = 1024
    loras: Mapping[str, float | Mapping[str, float]] | None = None

    @classmethod
    def for_preset(cls, preset: str, **fields: Any) -> GenerationRequest:
        """The request ``ltx2 generate --preset PRESET`` sends, with ``fields`` changed (the
        preset's size, frames, steps and sequence length; the CLI's default prompts)."""
        from .presets import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, PRESET_DEFAULTS

        d = PRESET_DEFAULTS[preset]
        base = dict(prompt=DEFAULT_PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=d["height"],
                    width=d["width"], num_frames=d["num_frames"], num_inference_steps=d["steps"],
                    max_sequence_length=d["max_sequence_length"])
        return cls(**{**base, **fields})


@dataclass
class GenerationResult:
    video: np.ndarray  # [frames, height, width, 3], float in [0, 1]
    audio: torch.Tensor  # [channels, samples], float in [-1, 1]
    audio_sample_rate: int
    frame_rate: float
    report: dict[str, Any]

    def save_mp4(self, path: str | os.PathLike[str]) -> Path:
        """H.264 video with the AAC audio track, via diffusers' own ``encode_video``."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stderr(io.StringIO()):  # encode_video's unconditional tqdm bar
            encode_video(self.video, fps=round(self.frame_rate), output_path=str(out),
                         audio=self.audio.float().cpu(), audio_sample_rate=self.audio_sample_rate)
        return out


def check_request(req: GenerationRequest, spatial: int, temporal: int, loras: Sequence[str]) -> None:
    """:class:`GenerationInputError` (or :class:`~ltx2_residency.StrengthError`) for a request a
    pipeline whose VAE compresses by ``spatial``/``temporal`` and that manages ``loras`` cannot
    run; needs no pipeline, so a caller can check before building one."""
    if not isinstance(req.prompt, str):
        raise GenerationInputError(f"prompt must be a string, got {type(req.prompt).__name__}")
    if not isinstance(req.negative_prompt, str):
        raise GenerationInputError(f"negative_prompt must be a string, got {type(req.negative_prompt).__name__}")
    # stage 1 runs at half size, which LTX2Pipeline takes in multiples of 32 (and of the VAE's cell)
    step = 2 * max(32, spatial)
    for name in ("height", "width"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step:
            lo = max(step, (value // step) * step) if isinstance(value, int) and value > 0 else step
            raise GenerationInputError(
                f"{name}={value!r}: must be a positive multiple of {step} (stage 1 runs at half size, "
                f"which must be a multiple of {step // 2}); try {lo} or {lo + step}")
    n = req.num_frames
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n - 1) % temporal:
        near = max(1, ((n - 1) // temporal) * temporal + 1) if isinstance(n, int) and n > 1 else 1
        raise GenerationInputError(f"num_frames={n!r}: must be {temporal}·k + 1 (the VAE compresses time by "
                                   f"{temporal}); try {near} or {near + temporal}")
    for name in ("num_inference_steps", "max_sequence_length"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenerationInputError(f"{name}={value!r}: must be an integer ≥ 1")
    if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed < 2**63:
        raise GenerationInputError(f"seed={req.seed!r}: must be an integer in [0, 2**63)")
    rate = req.frame_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
        raise GenerationInputError(f"frame_rate={rate!r}: must be a finite number > 0")
    if req.loras is not None:
        if not isinstance(req.loras, Mapping):
            raise GenerationInputError(f"loras must be a mapping of LoRA name to strength, e.g. {{'style': 0.8}}, "
                                       f"got {type(req.loras).__name__}")
        unknown = sorted(str(n) for n in req.loras if n not in loras)
        if unknown:
            raise GenerationInputError(f"loras: unknown LoRA {unknown[0]!r}; registered LoRAs: "
                                       f"{', '.join(map(repr, loras))} (add one with pipe.manager.add_lora)")
        for name, value in req.loras.items():
            per_phase = value if isinstance(value, Mapping) else {Phase.STAGE1.value: value, Phase.STAGE2.value: value}
            for phase, strength in per_phase.items():
                if phase not in (Phase.STAGE1.value, Phase.STAGE2.value):
                    raise GenerationInputError(f"loras[{name!r}]: unknown phase {phase!r}; use 'stage1' or 'stage2'")
                check_strength(strength, f"loras[{name!r}][{phase!r}]")
        loras = [*(n for n in ("distilled",) if n in loras), *req.loras]
    for phase, overrides in req.strengths.items():
        if phase not in (Phase.STAGE1.value, Phase.STAGE2.value):
            raise GenerationInputError(f"strengths: unknown phase {phase!r}; use 'stage1' or 'stage2'")
        unknown = sorted(set(overrides) - set(loras))
        if unknown:
            raise GenerationInputError(f"strengths[{phase!r}]: unknown LoRA {unknown[0]!r}; managed LoRAs: "
                                       f"{', '.join(map(repr, loras))}")
        for name, value in overrides.items():
            check_strength(value, f"strengths[{phase!r}][{name!r}]")
