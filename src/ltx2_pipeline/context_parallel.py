"""Context parallelism: every DiT call's sequences split across the ranks, with diffusers' own hooks.

diffusers shards a model's inputs and gathers its outputs by a *context-parallel plan*
(``ContextParallelConfig``; Ulysses attention trades sequence shards for head shards with an
all-to-all, ring attention passes key/value shards around the ranks). The plan diffusers ships with
``LTX2VideoTransformer3DModel`` shards the video tokens but not the RoPE table of the audio-video
cross-attention, and the forward fails. :func:`ltx2_cp_plan` shards the video tokens with both of
their RoPE tables and the two text streams, and gathers the video output.

The audio stream stays whole on every rank (as vllm-omni runs LTX-2 under Ulysses): it is short
(126 latents for 121 frames, against 6,144 video tokens at 768x512), and any frame count serves.
diffusers' attention exchanges it as if it were sharded, so each rank's attention sees the audio
tokens once per rank: keys repeated change no softmax, and repeated queries give the same rows.

:class:`ContextParallel` stands in for the DiT in diffusers' ``LTX2Pipeline`` (as
:class:`~ltx2_pipeline.parallel.CFGParallel` does). The text masks after LTX-2's connectors are
all open (the connectors' learnable registers replace the padding) and are dropped before the
call: diffusers' Ulysses attention gathers a mask along the key axis but not across the heads it
exchanges, so an open mask would fail the call while adding nothing to it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from diffusers.hooks.context_parallel import remove_context_parallel
from diffusers.hooks.hooks import HookRegistry
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from torch import nn

from .components import quiet_diffusers
from .errors import GenerationInputError
from .parallel import DiTStandIn

# diffusers' sharding hook calls a torch collective that torch has renamed; once per process, nothing to act on
warnings.filterwarnings("ignore", message=r".*all_gather_tensor` is deprecated", category=FutureWarning,
                        module=r"diffusers\.hooks\.context_parallel")

#: the names ``--context-parallel`` takes: which of diffusers' attentions spans the ranks
KINDS = ("ulysses", "ring")
#: the forward's inputs the plan shards along their sequence axis (all are passed, ``None`` if unused)
_SEQUENCES = ("hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states")
_MASKS = ("encoder_attention_mask", "audio_encoder_attention_mask")
_UNPLANNED = ("video_self_attention_mask", "video_keyframes_mask")  # per video token; LTX2Pipeline passes neither


def ltx2_cp_plan(rope_type: str) -> dict[str, Any]:
    """The context-parallel plan of ``LTX2VideoTransformer3DModel`` for its ``rope_type``."""
    # RoPE tables: (batch, tokens, dim) interleaved, (batch, heads, tokens, dim/2) split
    axis, dims = (1, 3) if rope_type == "interleaved" else (2, 4)
    rope = {i: ContextParallelInput(split_dim=axis, expected_dims=dims, split_output=True) for i in (0, 1)}
    inputs = {name: ContextParallelInput(split_dim=1, expected_dims=3, split_output=False) for name in _SEQUENCES}
    return {
        "": inputs,
        "rope": rope, "cross_attn_rope": rope,  # the video tokens' (the audio stream's stay whole)
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


@dataclass(frozen=True)
class ContextParallelSpec:
    """Which attention spans the ranks and over how many (the whole group)."""

    kind: str  # "ulysses" or "ring"
    ranks: int
    convert_to_fp32: bool = True  # ring attention: partial outputs and log-sum-exps merged in fp32

    def config(self, mesh: Any) -> ContextParallelConfig:
        degree = {"ulysses_degree": self.ranks} if self.kind == "ulysses" else {"ring_degree": self.ranks}
        return ContextParallelConfig(**degree, mesh=mesh, convert_to_fp32=self.convert_to_fp32)


def check_context_parallel(context_parallel: object, process_group: object, cfg_parallel: bool,
                           dit: nn.Module, connectors: Any, compile_spec: object) -> ContextParallelSpec | None:
    """The pipeline's ``context_parallel=`` checked before anything is built: ``None``, ``"ulysses"``,
    ``"ring"`` or a diffusers ``ContextParallelConfig`` whose degrees span the group."""
    if context_parallel is None:
        return None
    kind = _kind_of(context_parallel)
    if process_group is None:
        raise GenerationInputError(f"context_parallel={kind!r} splits every DiT call across ranks: pass the "
                                   "process_group of the ranks (run under torchrun)")
    if cfg_parallel:
        raise GenerationInputError("cfg_parallel and context_parallel both split the group: choose one")
    if compile_spec is not None:
        raise GenerationInputError("context_parallel runs an eager DiT: leave compile unset")
    ranks = dist.get_world_size(process_group)
    if ranks != dist.get_world_size():
        raise GenerationInputError(f"context_parallel spans every process (diffusers builds its mesh on the "
                                   f"default group): the process_group has {ranks} of {dist.get_world_size()}")
    if ranks < 2:
        raise GenerationInputError("context_parallel needs at least 2 ranks")
    if isinstance(context_parallel, ContextParallelConfig):
        degrees = context_parallel.ulysses_degree * context_parallel.ring_degree
        if degrees != ranks or min(context_parallel.ulysses_degree, context_parallel.ring_degree) != 1:
            raise GenerationInputError(
                f"ContextParallelConfig(ulysses_degree={context_parallel.ulysses_degree}, "
                f"ring_degree={context_parallel.ring_degree}): one of the two must be the group's {ranks} "
                "ranks, the other 1")
        taken = {"mesh": context_parallel.mesh is not None, "ulysses_anything": context_parallel.ulysses_anything,
                 "ring_anything": context_parallel.ring_anything}
        if any(taken.values()):
            raise GenerationInputError(f"ContextParallelConfig({', '.join(k for k, v in taken.items() if v)}=...): the "
                                       "pipeline builds its mesh on the group and splits sequences equally; leave "
                                       "them unset")
    if getattr(dit, "_parallel_config", None) is not None:
        raise GenerationInputError("the DiT is already parallelized (enable_parallelism, or a pipeline still open "
                                   "on it): close that pipeline first, or pass a DiT without parallelism")
    backend = _attention_backend(dit)
    if not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend)):
        raise GenerationInputError(f"the DiT's attention backend {backend!r} has no context-parallel form in "
                                   "diffusers: set_attention_backend('native') for ulysses, '_native_cudnn' for ring")
    cfg = dit.config
    if kind == "ulysses":
        for what, heads in (("video", cfg.num_attention_heads), ("audio", cfg.audio_num_attention_heads)):
            if heads % ranks:
                raise GenerationInputError(f"Ulysses attention shares the {what} stream's {heads} heads among "
                                           f"{ranks} ranks: use a number of ranks that divides it, or ring")
    elif next(dit.parameters()).device.type == "cpu":
        raise GenerationInputError("ring attention merges partial results by their log-sum-exp, which no "
                                   "attention of diffusers returns on a CPU: use ulysses")
    elif backend == "native":
        raise GenerationInputError("ring attention merges partial results by their log-sum-exp, which diffusers' "
                                   "native attention does not return: call set_attention_backend('_native_cudnn') "
                                   "(or 'flash') on the DiT first, or use ulysses")
    # the DiT takes the video connector's mask for both text streams
    if getattr(connectors.config, "video_connector_num_learnable_registers", None) is None:
        raise GenerationInputError("context_parallel needs text connectors with learnable registers (LTX-2's own): "
                                   "the video connector has none, so the text mask can close tokens, which "
                                   "diffusers' Ulysses attention cannot shard")
    fp32 = context_parallel.convert_to_fp32 if isinstance(context_parallel, ContextParallelConfig) else True
    return ContextParallelSpec(kind, ranks, fp32)


def _attention_backend(dit: nn.Module) -> str:
    """The attention backend the DiT's processors run (diffusers' active one where they name none)."""
    for module in dit.modules():
        backend = getattr(getattr(module, "processor", None), "_attention_backend", False)
        if backend is not False:
            return str(getattr(backend, "value", backend) if backend is not None
                       else _AttentionBackendRegistry.get_active_backend()[0].value)
    return "native"


def _kind_of(context_parallel: object) -> str:
    if isinstance(context_parallel, ContextParallelConfig):
        return "ulysses" if context_parallel.ulysses_degree > 1 else "ring"
    if context_parallel not in KINDS:
        raise GenerationInputError(f"context_parallel must be one of {', '.join(KINDS)}, a diffusers "
                                   f"ContextParallelConfig or None, got {context_parallel!r}")
    return str(context_parallel)


def check_sequences(spec: ContextParallelSpec, sequences: Mapping[str, int],
                    alternatives: Iterable[tuple[int, Mapping[str, int]]] = ()) -> None:
    """Every sequence a request's DiT calls carry divides among the ranks (diffusers shards equally);
    ``alternatives`` (num_frames, its sequences) are searched for a frame count to suggest."""
    uneven = {name: n for name, n in sequences.items() if n % spec.ranks}
    if not uneven:
        return
    listed = ", ".join(f"{name} {n} tokens" for name, n in uneven.items())
    fits = next((frames for frames, seqs in alternatives if not any(n % spec.ranks for n in seqs.values())), None)
    hint = f"; num_frames={fits} divides them all" if fits is not None else ""
    raise GenerationInputError(f"context_parallel splits each sequence among {spec.ranks} ranks, and these do not "
                               f"divide: {listed}. Choose a size, frame count or max_sequence_length whose "
                               f"tokens divide{hint}")


class ContextParallel(DiTStandIn):
    """The DiT as diffusers' pipeline calls it, each call's sequences split across the ranks."""

    def __init__(self, dit: nn.Module, enabled: ContextParallelDiTs) -> None:
        super().__init__(dit)
        enabled.enable(dit)

    def forward(self, **kwargs: Any) -> Any:
        unplanned = [name for name in _UNPLANNED if kwargs.get(name) is not None]
        if unplanned:
            raise GenerationInputError(f"context_parallel does not shard {', '.join(unplanned)}")
        for name in _MASKS:
            kwargs[name] = None  # open everywhere (checked: the connectors have registers): the same call
        for name in _SEQUENCES:
            kwargs.setdefault(name, None)  # diffusers' hook looks every planned input up by name
        return object.__getattribute__(self, "dit")(**kwargs)


class ContextParallelDiTs:
    """The DiTs one pipeline has put under context parallelism, on one mesh.

    diffusers' ``enable_parallelism`` runs once per module: the shared DiT at construction, and a
    second module the manager runs a phase on (resident mode's stage-2 copy) when it first runs.
    """

    def __init__(self, spec: ContextParallelSpec, device: torch.device) -> None:
        self.spec = spec
        self.mesh = dist.device_mesh.init_device_mesh(
            device.type, mesh_shape=spec.config(None).mesh_shape, mesh_dim_names=("ring", "ulysses"))
        self._done: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def enable(self, dit: nn.Module) -> None:
        if dit in self._done:
            return
        self._done.add(dit)  # first: close() takes off what a failed enable left
        with _without_accelerator_count(), quiet_diffusers():
            dit.enable_parallelism(config=self.spec.config(self.mesh), cp_plan=ltx2_cp_plan(dit.config.rope_type))

    def close(self) -> None:
        """Every DiT as it was before: diffusers' hooks off, no parallel config left on it."""
        for dit in list(self._done):
            remove_context_parallel(dit, ltx2_cp_plan(dit.config.rope_type))
            dit._parallel_config = None
            for module in dit.modules():
                processor = getattr(module, "processor", None)
                if processor is not None and hasattr(processor, "_parallel_config"):
                    processor._parallel_config = None
            HookRegistry.check_if_exists_or_initialize(dit).invalidate_child_registries_cache()
        self._done.clear()


@contextmanager
def _without_accelerator_count() -> Iterator[None]:
    """diffusers places each rank on device ``rank % torch.accelerator.device_count()``, a division by
    zero on a host without accelerators; there it counts one (the host), for that call only."""
    if torch.accelerator.device_count():
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = real  # type: ignore[assignment]
