"""How a dynamic phase runs its adapters: PEFT's own forward, or ours over the same tensors.

``peft`` enables PEFT's adapters (``result + lora_B(lora_A(dropout(x))) * scaling``: five
kernels and PEFT's Python per layer and LoRA). ``fused`` gives each adapted PEFT layer, once
when the adapters are injected, a class whose forward is PEFT's until a dynamic phase sets the
layer's flag; then it reads the very same ``lora_A``/``lora_B`` tensors and takes the cheaper of
two exact-in-intent forms:

* **factored**: ``y = x Wᵀ + b``, then ``y += s·(x Aᵀ) Bᵀ``: two matmuls per LoRA, cost ∝ tokens;
* **transient merge**: ``W' = W + s·B A`` into a fresh buffer, then ``y = x W'ᵀ + b``: cost ∝ the
  weight's size, independent of tokens, and the shared weight is only read. At LTX-2's stage-2
  token counts this is the cheaper form for the video layers: their LoRA FLOPs per call exceed
  the ``rank·out·in`` of rebuilding the weight.

The choice is a crossover token count per layer, from a roofline where a byte of traffic costs
:data:`FLOPS_PER_BYTE` FLOPs. Run eagerly (:class:`FusedLoRALinear`, made per strength and kept),
the scale is a Python number fused into one ``addmm`` (one rounding), only the LoRAs the phase
runs are computed, and in DiT calls small enough to be host-bound on a GPU
(:data:`HOST_BOUND_TOKENS`) every layer rebuilds its weight, one aten call instead of two. Traced
into a graph (:func:`_traced`), every managed LoRA of the layer is computed, each scaled by its
strength read from one tensor shared by the model's layers: a new strength or mix is a write
into that tensor, and the graph stays the same. Both forms leave every shared weight untouched;
layers whose base is not a plain, hook-free ``nn.Linear`` keep PEFT's forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import ConfigError
from ..linears import is_sharded
from .graph_hooks import outside_graphs

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
    #: the adapter's parameters the factors view (a LoRA slot's leading rows): a move rebinds their
    #: ``.data``, which a view does not follow
    sources: tuple[torch.Tensor, torch.Tensor] | None = None

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
            a_t.data_ptr() == src_a.data_ptr() and b_t.data_ptr() == src_b.data_ptr()
            for (a_t, b_t, _), (src_a, src_b) in zip(
                self.factors, [d.sources or (d.lora_A, d.lora_B) for d in self.deltas], strict=True))

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
    and no patch of somebody else's on the PEFT layer."""
    base = layer.get_base_layer()
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in vars(base) and "forward" not in vars(layer))


def fusable(layer: LoraLayer, names: Sequence[str]) -> bool:
    """Our forward may stand in for PEFT's here: see :func:`_unhooked`, and vanilla LoRA adapters
    of the base's dtype and device."""
    if not _unhooked(layer):
        return False
    w = layer.get_base_layer().weight
    if is_sharded(w):  # split across ranks (ops.shards runs it)
        return False
    for n in names:
        if n in layer.lora_variant or not isinstance(layer.lora_dropout[n], nn.Identity):
            return False
        a, b = layer.lora_A[n].weight, layer.lora_B[n].weight
        if a.dtype != w.dtype or b.dtype != w.dtype or a.device != w.device or b.device != w.device:
            return False
    return True


# ---------------------------------------------------------------------------- the compile-ready layer
#: attributes :func:`install` puts on a layer (and :func:`uninstall` takes off)
_DYNAMIC, _SLOTS, _FUSED, _MERGE_ABOVE, _PEFT_CLASS, _STRENGTHS = (
    "_ltx2_dynamic", "_ltx2_slots", "_ltx2_fused", "_ltx2_merge_above", "_ltx2_peft_class", "_ltx2_strengths")
#: the layer's buffer of alpha/rank per slot: a tensor, not Python floats a graph would be
#: specialised on (a LoRA whose alpha differs per block would compile a graph per block)
RATIOS = "ltx2_lora_ratios"
_CLASSES: dict[type, type] = {}


def _traced(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """The dynamic forward as a graph sees it: every managed LoRA of the layer, each scaled by its
    strength read from the shared tensor (0 for one the phase does not run), so a new strength or
    mix is a write into that tensor, not a new graph. The form is chosen by the input's shape,
    which a graph is specialised on anyway."""
    base = layer.base_layer
    strengths = getattr(layer, _STRENGTHS)
    ratios = getattr(layer, RATIOS)
    slots = getattr(layer, _SLOTS)
    if x.numel() > getattr(layer, _MERGE_ABOVE) * base.in_features:
        w = base.weight
        for i, (k, name) in enumerate(slots):
            b = (layer.lora_B[name].weight.float() * (strengths[k] * ratios[i])).to(w.dtype)
            w = torch.addmm(w, b, layer.lora_A[name].weight)
        return F.linear(x, w, base.bias)
    y = F.linear(x, base.weight, base.bias)
    for i, (k, name) in enumerate(slots):
        h = F.linear(x, layer.lora_A[name].weight)
        y = y + F.linear((h.float() * (strengths[k] * ratios[i])).to(h.dtype), layer.lora_B[name].weight)
    return y


def _dynamic_class(peft_class: type) -> type:
    """``peft_class`` with the forward every installed layer runs: PEFT's own unless the layer runs
    dynamic; then ours, eager (:class:`FusedLoRALinear`, per strength) or traced (:func:`_traced`).
    A class, not a per-layer attribute: a graph guards on a callable's identity, and one forward
    shared by every block lets one graph serve them all."""
    cls = _CLASSES.get(peft_class)
    if cls is None:
        def forward(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not getattr(self, _DYNAMIC) or args or kwargs:
                return peft_class.forward(self, x, *args, **kwargs)
            if torch.compiler.is_compiling():
                return _traced(self, x)
            fused = getattr(self, _FUSED)
            return fused(x) if fused is not None else peft_class.forward(self, x)
        cls = _CLASSES.setdefault(peft_class, type(peft_class.__name__, (peft_class,), {
            "forward": forward, "__module__": __name__,
            "__doc__": f"{peft_class.__doc__ or ''}\n\nWith ltx2_residency's dynamic forward (ops.forward)."}))
    return cls


def install(layer: LoraLayer, names: Sequence[str], strengths: torch.Tensor, order: Sequence[str]) -> bool:
    """Make ``layer`` run our dynamic forward for its LoRAs ``names`` (``order``: every managed LoRA,
    in the order of ``strengths``). Once, when the adapters are injected; returns False (and
    changes nothing) where PEFT's forward has to stay (:func:`fusable`)."""
    if not names or not fusable(layer, names):
        return False
    base = layer.get_base_layer()
    ranks = [layer.lora_A[n].weight.shape[0] for n in names]
    # the class first: uninstall() keys on it, so an interrupt part way is still undone
    object.__setattr__(layer, _PEFT_CLASS, type(layer))
    object.__setattr__(layer, _SLOTS, tuple((order.index(n), n) for n in names))
    object.__setattr__(layer, _DYNAMIC, False)
    object.__setattr__(layer, _FUSED, None)
    object.__setattr__(layer, _MERGE_ABOVE, merge_above_tokens(*base.weight.shape, ranks, base.weight.element_size()))
    ratios = [float(layer.lora_alpha[n]) / float(layer.r[n]) for n in names]
    # beside the adapters (the base may rest on the host in low-VRAM snapshot mode; adapters do not)
    device = layer.lora_A[names[0]].weight.device
    layer.register_buffer(RATIOS, torch.tensor(ratios, dtype=torch.float32, device=device), persistent=False)
    # one tensor object for every layer, a plain attribute, not a buffer: ``module.to()`` would
    # give each layer a copy of a buffer, and a write would no longer reach them all
    object.__setattr__(layer, _STRENGTHS, strengths)
    layer.__class__ = _dynamic_class(type(layer))
    return True


def installed(layer: nn.Module) -> bool:
    return _PEFT_CLASS in vars(layer)


def set_ratio(layer: nn.Module, name: str, ratio: float) -> None:
    """Write LoRA ``name``'s alpha/rank into an installed layer's ratios, in place (a LoRA slot took
    another LoRA; a graph reads the same tensor)."""
    if installed(layer):
        index = [n for _, n in vars(layer)[_SLOTS]].index(name)
        getattr(layer, RATIOS)[index] = ratio


def uninstall(layer: nn.Module) -> None:
    """Give ``layer`` PEFT's class and forward back (idempotent)."""
    peft_class = vars(layer).get(_PEFT_CLASS)
    if peft_class is None:
        return
    layer.__class__ = peft_class
    layer._buffers.pop(RATIOS, None)
    for attr in (_DYNAMIC, _SLOTS, _FUSED, _MERGE_ABOVE, _PEFT_CLASS, _STRENGTHS):
        vars(layer).pop(attr, None)


class _Deferred:
    """A layer's eager forward for a phase's strengths, made at its first eager call: a compiled
    DiT never makes one, and a dynamic switch then costs a flag and a pointer per layer."""

    __slots__ = ("layer", "strategy", "strengths")

    def __init__(self, strategy: FusedForward, layer: LoraLayer, strengths: dict[str, float]) -> None:
        self.strategy, self.layer, self.strengths = strategy, layer, strengths

    def made(self) -> FusedLoRALinear:
        fused = self.strategy.make(self.layer, self.strengths)
        object.__setattr__(self.layer, _FUSED, fused)
        return fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.made()(x)


def eager_forward(layer: nn.Module) -> FusedLoRALinear | None:
    """The eager forward :class:`FusedForward` gave ``layer`` for its last dynamic phase (made now
    if the layer has not run eagerly since)."""
    fused = vars(layer).get(_FUSED)
    return fused.made() if isinstance(fused, _Deferred) else fused


def has_fused(layer: nn.Module) -> bool:
    """Our forward runs ``layer`` dynamic now."""
    return bool(vars(layer).get(_DYNAMIC, False))


class PeftForward:
    """Dynamic phases run PEFT's adapters: enabled and scaled here; :class:`PeftAdapters`' sweep
    disables them again. Returns whether PEFT's adapters were touched (the sweep is then due)."""

    name = "peft"

    def begin(self, model: nn.Module) -> None:
        """Bind to ``model``: when the adapters are injected, and again as each dynamic phase
        starts (idempotent)."""

    def end(self) -> None:
        """Every layer has been detached."""

    def release(self) -> None:
        """The strategy is replaced or the adapters removed: let go of the model."""

    def forget(self) -> None:
        """Adapter tensors or scales were rewritten: nothing made from the old ones may run again."""

    def idle(self, layer: LoraLayer) -> bool:
        """``layer`` runs none of the phase's LoRAs; returns whether it was touched all the same."""
        return False

    def attach(self, layer: LoraLayer, strengths: dict[str, float]) -> bool:
        for n, s in strengths.items():
            layer.set_scale(n, s)
        layer.enable_adapters(True)
        layer.set_adapter(list(strengths), inference_mode=True)
        return True


class FusedForward(PeftForward):
    """Dynamic phases run our forward on every installed layer (:func:`install`); PEFT's adapters stay
    disabled, so clearing the layer's flag is the whole detach."""

    name = "fused"

    def __init__(self, host_bound_tokens: int = HOST_BOUND_TOKENS) -> None:
        self.call = CallSize(host_bound_tokens)
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        # each layer's last eager forward and the strengths it was made for: a dynamic switch walks
        # 1344 layers, and building each anew through PEFT's module dicts is slow
        # (docs/results/measured_constants.md#kept-fused-forwards)
        self._kept: dict[int, tuple[tuple[tuple[str, float], ...], FusedLoRALinear]] = {}

    def begin(self, model: nn.Module) -> None:
        # registered once and kept: a hook added or removed on a compiled DiT is a new graph
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(outside_graphs(self.call.note), with_kwargs=True)

    def end(self) -> None:
        self.call.small = False

    def release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.end()

    def forget(self) -> None:
        self._kept.clear()

    def idle(self, layer: LoraLayer) -> bool:
        # every installed layer runs dynamic in a dynamic phase, those of no live LoRA at strength 0
        # in a graph: which layers run which LoRA is then no part of a graph's guards
        if not installed(layer) or not _unhooked(layer):  # a hooked base runs PEFT's forward, eager or compiled
            return False
        object.__setattr__(layer, _FUSED, None)
        object.__setattr__(layer, _DYNAMIC, True)
        return True

    def attach(self, layer: LoraLayer, strengths: dict[str, float]) -> bool:
        if not installed(layer) or not _unhooked(layer) or not fusable(layer, list(strengths)):
            return super().attach(layer, strengths)
        kept = self._kept.get(id(layer))
        fresh = kept is not None and kept[0] == tuple(strengths.items()) and kept[1].current()
        object.__setattr__(layer, _FUSED, kept[1] if fresh else _Deferred(self, layer, strengths))
        object.__setattr__(layer, _DYNAMIC, True)
        return False

    def make(self, layer: LoraLayer, strengths: dict[str, float]) -> FusedLoRALinear:
        """``layer``'s eager forward at ``strengths``, kept for the next phase that asks the same."""
        deltas = []
        for n, s in strengths.items():
            a, b, r = layer.lora_A[n].weight, layer.lora_B[n].weight, int(layer.r[n])
            scale = s * float(layer.lora_alpha[n]) / r
            if r < a.shape[0]:  # a LoRA slot holds a LoRA of a smaller rank in its leading rows: only those run
                deltas.append(LoRADelta(a[:r], b[:, :r], scale, (a, b)))
            else:
                deltas.append(LoRADelta(a, b, scale))
        base = layer.get_base_layer()
        # host-bound small calls are a GPU matter: on the CPU the launches are the compute
        fused = FusedLoRALinear(base, deltas, call=self.call if base.weight.is_cuda else None)
        self._kept[id(layer)] = (tuple(strengths.items()), fused)
        return fused

    @staticmethod
    def detach(layer: LoraLayer) -> None:
        object.__setattr__(layer, _DYNAMIC, False)


DYNAMIC_FORWARDS: dict[str, type[PeftForward]] = {"peft": PeftForward, "fused": FusedForward}


def forward_named(value: object) -> str:
    """The ``DYNAMIC_FORWARDS`` key ``value`` names (case and spaces forgiven)."""
    name = value.strip().lower() if isinstance(value, str) else value
    if name not in DYNAMIC_FORWARDS:
        raise ConfigError(f"unknown dynamic_forward {value!r}; expected one of "
                          f"{', '.join(map(repr, DYNAMIC_FORWARDS))}")
    return name  # type: ignore[return-value]
