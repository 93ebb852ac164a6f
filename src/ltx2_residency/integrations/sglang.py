"""The manager inside sglang's multimodal_gen LTX-2 two-stage pipeline (checked against sglang 0.5.23).

sglang runs a request as a list of stages; its ``ComponentResidencyManager`` calls a
``ComponentResidencyStrategy`` per component around each use. :class:`SglangResidencyStrategy` is
that strategy for the DiT: one manager request per sglang request, the phase of each use entered
when the stage that runs it begins, and the DiT restored at ``finish_request`` (which sglang's
executor reaches by any path: a stage that raises included). :func:`install` wires it into a
``LTX2TwoStagePipeline``:

- the strategy serves the DiT components (``transformer``, and ``transformer_2`` where sglang
  built one);
- ``switch_lora_phase(phase, batch)`` no longer changes weights (sglang's ``set_lora`` /
  ``deactivate_lora_weights``): it hands the request's strengths, as sglang resolves them from
  ``batch.extra`` (``ltx2_distilled_lora_strength_stage_1/2``, else the pipeline's defaults), to
  the strategy, which enters the phase with them;
- the LoRA switch stages always run, so a phase's strengths are known before its DiT is prepared.

What sglang does that the strategy meets: it prefetches the next large use while a stage runs
(``prefetch_for_use`` for stage 2 as stage 1 begins); the strategy declines, since switching the
shared DiT early would run the rest of stage 1 on stage 2's weights. A use prepared for a stage
other than the running one is left alone the same way. A stage that hands over another module
makes sglang call ``finish_use`` and ``prepare_for_use`` again for the same phase: a no-op. In
resident mode the manager's stage-2 DiT is a copy: the running stage's ``transformer`` is bound to
it for the phase and bound back when the request ends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoRALinear
from sglang.multimodal_gen.runtime.layers.linear import LinearBase
from sglang.multimodal_gen.runtime.managers.memory_managers.component_residency_strategies import (
    ComponentResidencyStrategy,
)
from torch import nn

from ..domain import Phase, check_strength
from ..errors import EmbeddingError, LoRAKeyError, StrengthError
from ..linears import register_linear_type
from ..lora import LoRASpec, read_safetensors
from ..manager import ResidencyManager
from ..request import Request, RequestScope

__all__ = ["SGLANG_VERSION", "SglangLoRALinear", "SglangResidencyStrategy", "install", "lora_spec",
           "sglang_module_name"]

#: The sglang release this adapter was written and tested against.
SGLANG_VERSION = "0.5.23"
DIT_COMPONENTS = ("transformer", "transformer_2")
PHASES = {"stage1": Phase.STAGE1, "stage2": Phase.STAGE2}


class SglangLoRALinear(PeftLoRALinear):
    """PEFT's LoRA layer around one of sglang's linear layers (``LinearBase``: column- and
    row-parallel, replicated), whose forward returns ``(output, output_bias)``. The manager merges
    into the layer's ``weight`` as into an ``nn.Linear``'s; dynamic phases add the active adapters
    here, as PEFT's ``Linear`` does."""

    @property
    def weight(self) -> torch.Tensor | None:  # type: ignore[override]
        """The base weight; ``None`` while an adapter adds to the output. sglang's fused sites
        (linear + GELU in the feed-forward) read a linear's ``weight`` in place of calling it and
        check it per call: ``None`` sends them to the forward, which adds the adapters."""
        return None if self._adding() else self.get_base_layer().weight

    def _adding(self) -> list[str]:
        """The adapters this layer's forward adds to the base's output now."""
        if self.disable_adapters or self.merged:
            return []
        return [n for n in self.active_adapters if n in self.lora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        result, bias = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self._adding():
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(dtype), bias


# sglang's native LTX-2 DiT: its block linears take the manager's LoRAs (tp_size 1)
register_linear_type(LinearBase, SglangLoRALinear)

#: LoRA file prefixes before the module path (LTX-2's original files, PEFT's, diffusers')
_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
#: kohya-style factor names -> PEFT's
_FACTORS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "lora_alpha": "alpha"}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_[AB](?:\.[\w-]+)?\.weight|lora_down\.weight|lora_up\.weight"
                  r"|alpha|lora_alpha)$")


def sglang_module_name(module: str) -> str:
    """A LoRA key's module path (LTX-2 checkpoint / diffusers names) as sglang's native LTX-2 DiT
    names it, by sglang's own table (``LTX2_PARAM_NAMES_MAPPING``: ``ff.net.0.proj`` ->
    ``ff.proj_in``, ...)."""
    from sglang.multimodal_gen.configs.models.dits.ltx_2 import LTX2_PARAM_NAMES_MAPPING

    for prefix in _KEY_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    for pattern, replacement in LTX2_PARAM_NAMES_MAPPING.items():
        module, n = re.subn(pattern, replacement, module + ".")
        module = module[:-1] if module.endswith(".") else module
        if n:
            break
    return module


def lora_spec(name: str, path: str | os.PathLike[str], strengths: Mapping[str, float] | None = None) -> LoRASpec:
    """A LoRA file (LTX-2's original ``diffusion_model.*`` keys, PEFT's or diffusers' names,
    ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``) for sglang's native LTX-2 DiT: its keys
    renamed to sglang's module paths. The manager validates it against the DiT as any LoRA."""
    tensors = {}
    for key, tensor in read_safetensors(path, f"LoRA {name!r}").items():
        match = _KEY.match(key)
        if match is None:
            raise LoRAKeyError(f"LoRA {name!r}: key {key!r} in {os.fspath(path)!r} is not a LoRA factor "
                               "(<module>.lora_A.weight, .lora_B.weight, .lora_down.weight, .lora_up.weight or "
                               ".alpha)")
        part = match["part"]  # lora_down/lora_up/lora_alpha renamed; PEFT's lora_A.<adapter>.weight -> lora_A.weight
        part = _FACTORS.get(part) or (f"{part[:6]}.weight" if part.startswith("lora_") else part)
        renamed = f"{sglang_module_name(match['module'])}.{part}"
        if renamed in tensors:
            raise LoRAKeyError(f"LoRA {name!r}: {os.fspath(path)!r} has two keys for {renamed!r} (e.g. {key!r}); "
                               "keep one")
        tensors[renamed] = tensor
    kwargs = {} if strengths is None else {"strengths": dict(strengths)}
    return LoRASpec(name, tensors=tensors, **kwargs)


def use_phase(use: Any) -> Phase:
    """The manager's phase for an sglang ``ComponentUse`` (as sglang's own LTX-2 strategies read it)."""
    phase = PHASES.get(str(use.phase))
    if phase is not None:
        return phase
    return Phase.STAGE2 if use.component_name == "transformer_2" else Phase.STAGE1


class SglangResidencyStrategy(ComponentResidencyStrategy):
    """sglang's component residency strategy for the DiT, backed by a :class:`ResidencyManager`.

    ``lora`` names the manager's LoRA that sglang's distilled-LoRA strengths apply to."""

    def __init__(self, manager: ResidencyManager, lora: str = "distilled") -> None:
        if not isinstance(manager, ResidencyManager):
            raise EmbeddingError(f"SglangResidencyStrategy takes a ResidencyManager, not {type(manager).__name__}")
        if lora not in manager.specs:
            raise EmbeddingError(f"the manager has no LoRA {lora!r} for sglang's distilled-LoRA strengths (it has "
                                 f"{sorted(manager.specs)}); pass lora= one of those")
        self.manager = manager
        self.lora = lora
        self._strengths: dict[Phase, float] = {}  # the request's, as switch_lora_phase reported them
        self._scope: RequestScope | None = None
        self._request: Request | None = None
        self._state: Any = None  # sglang's ResidencyState of the request the manager request serves
        self._module: nn.Module | None = None  # what the current phase runs
        self._bound: list[tuple[Any, nn.Module]] = []  # (stage, its own transformer) rebound for a phase

    # ------------------------------------------------------------------ sglang's hooks
    def prefetch_for_use(self, module: nn.Module, use: Any, state: Any) -> bool:
        """Never: the shared DiT must not change before the running stage is done with it."""
        return False

    def prepare_for_use(self, module: nn.Module, use: Any, state: Any) -> None:
        if use.stage_name is not None and state.stage_name is not None and use.stage_name != state.stage_name:
            return  # prepared ahead for a later stage: its own stage prepares it when it begins
        phase = use_phase(use)
        req = self._open(state)
        if req.phase is not phase:
            strength = self._strengths.get(phase)
            self._module = req.enter(phase, strengths=None if strength is None else {self.lora: strength})
        assert self._module is not None
        self._bind(state, module, self._module)

    def wait_for_use(self, module: nn.Module, use: Any, state: Any) -> None:
        """Nothing to wait for: ``prepare_for_use`` returns with the phase's weights in place."""

    def finish_use(self, module: nn.Module, use: Any, state: Any) -> None:
        """Nothing: the next phase's switch undoes this one's, and ``finish_request`` restores."""

    def finish_request(self, module: nn.Module, use: Any, state: Any, *, preferred: bool) -> None:
        """Whatever ``preferred`` says, the request ends here: the DiT back to clean (the base
        weights, what stage 1 runs next), the stages bound back to their own DiT."""
        self.close_request()

    # ------------------------------------------------------------------ the rest
    def set_phase_strength(self, phase: str, strength: float) -> None:
        """sglang's ``switch_lora_phase``: the strength of the distilled LoRA for ``phase`` in the
        request now running (applied when the phase's DiT is prepared)."""
        if phase not in PHASES:
            raise EmbeddingError(f"sglang reported LoRA phase {phase!r}; the LTX-2 two-stage phases are "
                                 f"{sorted(PHASES)}")
        self._strengths[PHASES[phase]] = check_strength(strength, f"sglang's {phase} distilled-LoRA strength")

    def close_request(self) -> None:
        """End the manager request, if one is open (idempotent; every DiT component's
        ``finish_request`` calls it)."""
        try:
            if self._scope is not None:
                self._scope.__exit__(None, None, None)  # twice is harmless: the scope's steps are idempotent
        finally:
            self._scope = self._request = self._module = self._state = None
            for stage, own in reversed(self._bound):
                stage.transformer = own
            self._bound.clear()
            self._strengths.clear()

    def _open(self, state: Any) -> Request:
        if self._scope is not None and (self._request is None or state is not self._state):
            # a request sglang never finished (another component's finish_request raised before
            # the DiT's), or an entry cut short before it was kept: restore before this one
            self.close_request()
        if self._request is None:
            self._scope = self.manager.request()  # kept before it is entered: an interrupt after
            self._state = state  # __enter__ leaves a scope close_request() exits
            self._request = self._scope.__enter__()
        return self._request

    def _bind(self, state: Any, module: nn.Module, dit: nn.Module) -> None:
        """The running stage runs ``dit`` (resident mode: the manager's stage-2 copy)."""
        if dit is module:
            return
        stages, index = state.stages, state.stage_index
        stage = stages[index] if 0 <= index < len(stages) else None
        if stage is None or not hasattr(stage, "transformer"):
            raise EmbeddingError(f"sglang prepared the DiT for stage {state.stage_name!r}, which has no "
                                 "`transformer` to bind the manager's DiT to")
        if stage.transformer is not dit:
            if not any(s is stage for s, _ in self._bound):
                self._bound.append((stage, stage.transformer))
            stage.transformer = dit


def install(pipeline: Any, manager: ResidencyManager, lora: str = "distilled") -> SglangResidencyStrategy:
    """Put ``manager`` in charge of ``pipeline``'s DiT (a sglang ``LTX2TwoStagePipeline`` whose
    ``modules["transformer"]`` is the manager's model). Returns the strategy."""
    for attr in ("modules", "component_residency_strategies", "switch_lora_phase",
                 "_get_stage_distilled_lora_strength"):
        if not hasattr(pipeline, attr):
            raise EmbeddingError(f"{type(pipeline).__name__} has no `{attr}`: install() takes sglang's "
                                 f"multimodal_gen LTX2TwoStagePipeline (sglang {SGLANG_VERSION})")
    # what sglang did to the DiT itself, before the manager could own its weights
    if getattr(pipeline, "lora_initialized", False) or getattr(pipeline, "_stage1_distilled_in_base", False):
        raise EmbeddingError("sglang already applied LoRAs to this pipeline's DiT (its own LoRA layers, or the HQ "
                             "stage-1 LoRA committed into the base); build the pipeline with "
                             "ltx2_two_stage_device_mode='original' and no --lora-path, and let the manager apply them")
    if getattr(pipeline, "_stage1_lora_path", None):
        raise EmbeddingError(f"the pipeline has a user LoRA ({pipeline._stage1_lora_path!r}, --lora-path) that "
                             "install() would not apply; register it with the manager (lora_spec()) instead")
    dit = pipeline.modules.get("transformer")
    weight = next(iter(manager.managed_weights.values()), None)
    if not isinstance(dit, nn.Module) or weight is None or not any(p is weight for p in dit.parameters()):
        raise EmbeddingError("pipeline.modules['transformer'] is not the manager's DiT; build the "
                             "ResidencyManager on it before install()")
    strategy = SglangResidencyStrategy(manager, lora)
    for name in DIT_COMPONENTS:
        pipeline.component_residency_strategies[name] = strategy

    def strength(phase: str, batch: Any) -> object:
        try:
            return pipeline._get_stage_distilled_lora_strength(phase, batch)
        except (TypeError, ValueError):  # sglang's float() of a request's value
            key = f"ltx2_distilled_lora_strength_stage_{phase[-1]}"
            raise StrengthError(f"the request's batch.extra[{key!r}] must be a number, got "
                                f"{getattr(batch, 'extra', {}).get(key)!r}") from None

    def switch_lora_phase(phase: str, batch: Any = None) -> None:
        # at stage 1 both phases' strengths are checked: a bad stage-2 strength fails the request
        # before stage 1 runs, not after it
        for each in ("stage1", "stage2") if phase == "stage1" else (phase,):
            strategy.set_phase_strength(each, strength(each, batch))

    pipeline.switch_lora_phase = switch_lora_phase
    pipeline.should_skip_ltx2_lora_switch_stage = lambda: False
    return strategy
