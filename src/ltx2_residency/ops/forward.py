"""How a dynamic phase runs its adapters: PEFT's own forward, or ours over the same tensors.

``peft`` enables PEFT's adapters (``result + lora_B(lora_A(dropout(x))) * scaling``: five
kernels and PEFT's Python per layer and LoRA). ``fused`` replaces the forward of each
adapted PEFT layer, for the phase only, with :class:`FusedLoRALinear`, which reads the very
same ``lora_A``/``lora_B`` tensors and picks per call the cheaper of two exact-in-intent forms:

* **factored**: ``y = x Wᵀ + b``, then ``y += s·(x Aᵀ) Bᵀ`` as one ``addmm_`` (scale and add
  fused, one rounding): two launches per LoRA, cost ∝ tokens;
* **transient merge**: ``W' = W + s·B A`` into a fresh buffer (one ``addmm``), then
  ``y = x W'ᵀ + b``: cost ∝ the weight's size, independent of tokens, and the shared weight
  is only read. At LTX-2's stage-2 token counts this is the cheaper form for the video
  layers: their LoRA FLOPs per call exceed the ``rank·out·in`` of rebuilding the weight.

The choice is a crossover token count per layer, from a roofline where a byte of traffic costs
:data:`FLOPS_PER_BYTE` FLOPs, except in DiT calls small enough to be host-bound on a GPU
(:data:`HOST_BOUND_TOKENS`): there every layer rebuilds its weight, one aten call instead of
two, and the device time that costs hides under the host's. Both forms leave every shared weight
untouched; layers whose base is not a plain, hook-free ``nn.Linear`` keep PEFT's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import ConfigError

#: Roofline exchange rate of an H100-class card, in FLOPs per byte: its achieved bf16 matmul rate
#: over its achieved memory bandwidth (docs/results/measured_constants.md#roofline-exchange-rate).
FLOPS_PER_BYTE = 240.0
#: Tokens of a DiT call (its first input's, e.g. LTX-2's video latents) at or below which every
#: layer on a GPU takes the transient merge. The full LTX-2 DiT is host-bound at stage 1's 1536
#: tokens: fewer launches win although the rebuilds cost more device time; at 6144 tokens
#: (device-bound) the roofline's per-layer choice is best (measured in
#: docs/results/measured_constants.md#host-bound-tokens).
HOST_BOUND_TOKENS = 2048


@dataclass(frozen=True)
class LoRADelta:
    """One LoRA's factors on one layer at the phase's strength: ``scale · B @ A``."""

    lora_A: torch.Tensor  # (rank, in)
    lora_B: torch.Tensor  # (out, rank)
    scale: float  # strength · alpha / rank

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def merge_above_tokens(out_features: int, in_features: int, ranks: Sequence[int], elem_bytes: int = 2,
                       flops_per_byte: float = FLOPS_PER_BYTE) -> float:
    """Tokens per call above which rebuilding the weight beats the factored form.

    Factored, per token: ``2·r·(in+out)`` FLOPs; reads x, writes and reads the rank-wide h,
    reads and writes y. Transient merge, per call: ``2·r·out·in`` FLOPs; reads W, writes W' (and
    each further LoRA reads and writes W' again)."""
    if not ranks:
        return math.inf
    per_token = sum(2 * r * (in_features + out_features) + flops_per_byte * elem_bytes
                    * (in_features + 2 * r + 2 * out_features) for r in ranks)
    weight = out_features * in_features
    per_call = sum(2 * r * weight + flops_per_byte * elem_bytes * (2 * weight + r * (in_features + out_features))
                   for r in ranks)
    return per_call / per_token


class CallSize:
    """Whether the DiT call under way is host-bound-small, noted by a forward pre-hook on the model
    root: the layers of one call choose by the call's size, not their own input's (LTX-2's audio
    layers see ~126 tokens in both stages)."""

    __slots__ = ("limit", "small")

    def __init__(self, limit: int = HOST_BOUND_TOKENS) -> None:
        self.limit = limit
        self.small = False

    def note(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.small = isinstance(x, torch.Tensor) and x.dim() > 0 and x.numel() // x.shape[-1] <= self.limit


class FusedLoRALinear:
    """The forward of one adapted Linear during a dynamic phase (see the module doc)."""

    __slots__ = ("bias", "call", "deltas", "device", "factors", "in_features", "merge_above", "out_features",
                 "weight")

    def __init__(self, base: nn.Linear, deltas: Sequence[LoRADelta], merge_above: float | None = None,
                 call: CallSize | None = None) -> None:
        self.call = call  # None: choose by the roofline alone (off the GPU, or no DiT-level hook)
        self.weight = base.weight
        self.device = base.weight.device
        self.bias = base.bias
        self.deltas = tuple(deltas)
        # the transposed views, made once: stage 1 is host-bound, and every aten call per layer
        # and step shows in a request's time (``fusable`` already checked the dtypes)
        self.factors = tuple((d.lora_A.t(), d.lora_B.t(), d.scale) for d in self.deltas)
        self.out_features, self.in_features = base.weight.shape
        self.merge_above = (merge_above if merge_above is not None else merge_above_tokens(
            self.out_features, self.in_features, [d.rank for d in self.deltas], base.weight.element_size()))

    def current(self) -> bool:
        """Still valid for its layer: the weight on the device it was made for, the transposed
        views on the factors' present storage (a move rebinds ``.data``, which views do not follow)."""
        return self.weight.device == self.device and all(
            a_t.data_ptr() == d.lora_A.data_ptr() and b_t.data_ptr() == d.lora_B.data_ptr()
            for (a_t, b_t, _), d in zip(self.factors, self.deltas, strict=True))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.merge_above * self.in_features or (self.call is not None and self.call.small):
            first, *rest = self.deltas
            merged = torch.addmm(self.weight, first.lora_B, first.lora_A, alpha=first.scale)  # new buffer: W is read
            for d in rest:
                merged.addmm_(d.lora_B, d.lora_A, alpha=d.scale)
            return F.linear(x, merged, self.bias)
        y = F.linear(x, self.weight, self.bias)
        flat_y = y.view(-1, self.out_features)
        flat_x = x.reshape(-1, self.in_features)
        for a_t, b_t, scale in self.factors:
            flat_y.addmm_(torch.mm(flat_x, a_t), b_t, alpha=scale)  # y + s·(x·Aᵀ)·Bᵀ in one rounding
        return y


def _unhooked(layer: LoraLayer) -> bool:
    """A plain Linear base without hooks or a patched forward (an offload hook would be skipped),
    and no patch of somebody else's on the PEFT layer (ours is removed at every detach)."""
    base = layer.get_base_layer()
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in vars(base) and "forward" not in vars(layer))


def fusable(layer: LoraLayer, names: Sequence[str]) -> bool:
    """Our forward may stand in for PEFT's here: see :func:`_unhooked`, and vanilla LoRA adapters
    of the base's dtype and device."""
    if not _unhooked(layer):
        return False
    w = layer.get_base_layer().weight
    for n in names:
        if n in layer.lora_variant or not isinstance(layer.lora_dropout[n], nn.Identity):
            return False
        a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
        if a.dtype != w.dtype or b.dtype != w.dtype or a.device != w.device or b.device != w.device:
            return False
    return True


class PeftForward:
    """Dynamic phases run PEFT's adapters: enabled and scaled here; :class:`PeftAdapters`' sweep
    disables them again. Returns whether PEFT's adapters were touched (the sweep is then due)."""

    name = "peft"

    def begin(self, model: nn.Module) -> None:
        """A dynamic phase starts on ``model`` (before any layer is attached)."""

    def end(self) -> None:
        """Every layer has been detached."""

    def attach(self, layer: LoraLayer, strengths: dict[str, float]) -> bool:
        for n, s in strengths.items():
            layer.set_scale(n, s)
        layer.enable_adapters(True)
        layer.set_adapter(list(strengths), inference_mode=True)
        return True


def has_fused(layer: LoraLayer) -> bool:
    """Our forward stands in for PEFT's on ``layer`` (deleting the instance attribute detaches it)."""
    return isinstance(vars(layer).get("forward"), FusedLoRALinear)


class FusedForward(PeftForward):
    """Dynamic phases run :class:`FusedLoRALinear` in place of PEFT's forward; PEFT's adapters stay
    disabled, so removing our forward (an instance attribute) is the whole detach."""

    name = "fused"

    def __init__(self, host_bound_tokens: int = HOST_BOUND_TOKENS) -> None:
        self.call = CallSize(host_bound_tokens)
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        # each layer's last forward and the strengths it was made for: a dynamic switch walks
        # 1344 layers, and building each anew through PEFT's module dicts is slow
        # (docs/results/measured_constants.md#kept-fused-forwards)
        self._kept: dict[int, tuple[tuple[tuple[str, float], ...], FusedLoRALinear]] = {}

    def begin(self, model: nn.Module) -> None:
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self.call.note, with_kwargs=True)

    def end(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.call.small = False

    def attach(self, layer: LoraLayer, strengths: dict[str, float]) -> bool:
        key = tuple(strengths.items())
        kept = self._kept.get(id(layer))
        if kept is not None and kept[0] == key and kept[1].current() and _unhooked(layer):
            layer.forward = kept[1]  # type: ignore[method-assign]
            return False
        if not fusable(layer, list(strengths)):
            return super().attach(layer, strengths)
        deltas = [LoRADelta(layer.lora_A[n].weight, layer.lora_B[n].weight,
                            s * float(layer.lora_alpha[n]) / float(layer.r[n])) for n, s in strengths.items()]
        base = layer.get_base_layer()
        # host-bound small calls are a GPU matter: on the CPU the launches are the compute
        forward = FusedLoRALinear(base, deltas, call=self.call if base.weight.is_cuda else None)
        self._kept[id(layer)] = (key, forward)
        layer.forward = forward  # type: ignore[method-assign]
        return False


DYNAMIC_FORWARDS: dict[str, type[PeftForward]] = {"peft": PeftForward, "fused": FusedForward}


def forward_named(value: object) -> str:
    """The ``DYNAMIC_FORWARDS`` key ``value`` names (case and spaces forgiven)."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in DYNAMIC_FORWARDS:
        raise ConfigError(f"unknown dynamic_forward {value!r}; expected one of "
                          f"{', '.join(map(repr, DYNAMIC_FORWARDS))}")
    return name  # type: ignore[return-value]
