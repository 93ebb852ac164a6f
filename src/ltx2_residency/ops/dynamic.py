"""Dynamic LoRA through real PEFT adapters: weights are never touched.

Each managed LoRA is injected once, at start-up, as a named PEFT adapter
(``peft.inject_adapter_in_model`` + ``set_peft_model_state_dict``), then disabled. A phase
that runs dynamic attaches the adapters it needs at their per-request strength, through the
forward strategy chosen from ``forward.DYNAMIC_FORWARDS`` (PEFT's own forward, or ours over
the same tensors); detaching puts every layer back. Disabled PEFT layers call their base layer
directly, so the base path is bit-identical to the unwrapped model.

The merge path reuses the same adapter tensors (:meth:`PeftAdapters.targets`): one copy of
each LoRA lives on the device, whichever way a phase applies it.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import LoRAValidationError
from ..faults import FaultInjector
from ..linears import LINEAR_TYPES, is_sharded
from ..lora import LoadedLoRA
from . import shards
from .forward import DYNAMIC_FORWARDS, FusedForward, has_fused, install, uninstall
from .undo import LayerTarget


def _config(lora: LoadedLoRA) -> LoraConfig:
    ranks = Counter(t.rank for t in lora.targets.values())
    rank = ranks.most_common(1)[0][0]
    alphas = {m: (t.alpha if t.alpha is not None else float(t.rank)) for m, t in lora.targets.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return _lora_config(sorted(lora.targets), rank, alpha,
                        {m: t.rank for m, t in lora.targets.items() if t.rank != rank},
                        {m: a for m, a in alphas.items() if a != alpha})


def _lora_config(modules: list[str], rank: int, alpha: float, ranks: Mapping[str, int],
                 alphas: Mapping[str, float]) -> LoraConfig:
    # PEFT matches pattern keys as regexes against the module path: escape the dots.
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        # a string is matched with re.fullmatch against each module path; a list would also
        # match by suffix and wrap modules that validation never saw ("a.lin" in "b.a.lin")
        target_modules="|".join(re.escape(m) for m in modules),
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): a for m, a in alphas.items()},
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    if LINEAR_TYPES:  # an engine's linear layers: PEFT wraps them in the class registered for them
        config._register_custom_module(dict(LINEAR_TYPES))
    return config


class PeftAdapters:
    """The PEFT adapters of every managed LoRA on one model, and ``slots``: adapters of rank
    ``slot_rank`` on every ``managed`` layer that take added LoRAs (:mod:`.slots`)."""

    def __init__(self, model: nn.Module, loras: list[LoadedLoRA], faults: FaultInjector,
                 forward: str = "fused", slots: Sequence[str] = (), slot_rank: int = 0,
                 managed: Sequence[str] = ()) -> None:
        self.model = model
        self.faults = faults
        self.forward = DYNAMIC_FORWARDS[forward]()
        self.names = [lo.name for lo in loras] + list(slots)
        self.slots = list(slots)
        #: the layers each adapter runs on: its LoRA's targets (a slot: those of the LoRA it holds now)
        self.covers: dict[str, frozenset[str]] = {}
        self._targets: dict[str, list[str]] = {}
        self._target_cache: dict[str, list[LayerTarget]] = {}
        self.layers: dict[str, LoraLayer] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.active: dict[str, float] = {}
        self._attached: list[LoraLayer] = []  # layers attached since the last detach
        self._touched = True  # PEFT injects enabled adapters: the first sweep disables them
        try:
            for lora in loras:
                self._inject(model, lora.name, _config(lora),
                             {m: (t.lora_A, t.lora_B) for m, t in lora.targets.items()})
            self._inject_slots(slots, slot_rank, managed)
            self._install()
            self.forward.begin(model)  # its hooks, once: on a compiled DiT a hook added later is a new graph
            self.deactivate()
        except BaseException:
            self.forward.release()
            for layer in model.modules():
                _uninstall(layer)
            _unwrap(model, self.names)  # leave the model as it was given to us
            raise

    def add_slots(self, slots: Sequence[str], rank: int, managed: Sequence[str]) -> None:
        """Between requests: inject LoRA slots after the start (the first time a request runs an added
        LoRA). On a compiled DiT this is the one change of its modules after the start: compile it
        again, or size the slots up front (``ManagerOptions(device_lora_cache_bytes=...)``)."""
        self.names += slots  # before the injection: remove() takes them off whatever happens next
        self.slots += slots
        try:
            self._inject_slots(slots, rank, managed)
            self._install()
        except BaseException:  # (out of memory, say) the adapters as they were, the slots gone again
            _unwrap(self.model, list(slots))
            self.names = [n for n in self.names if n not in slots]
            self.slots = [n for n in self.slots if n not in slots]
            for slot in slots:
                self.covers.pop(slot, None)
                self._targets.pop(slot, None)
            self._install()
            raise
        finally:
            self._touched = True  # PEFT injects enabled adapters: the sweep disables them
            self.deactivate()
            self.forward.forget()

    def _inject_slots(self, slots: Sequence[str], rank: int, managed: Sequence[str]) -> None:
        for slot in slots:  # zero adapters of one rank on every managed layer, filled later
            self._inject(self.model, slot, _lora_config(list(managed), rank, float(rank), {}, {}),
                         {m: _zero_factors(self.model.get_submodule(m), rank) for m in managed}, keep_device=True)
            self.covers[slot] = frozenset()

    def _install(self) -> None:
        """Our dynamic forward on every adapted layer (:func:`~.forward.install`), over all adapters."""
        # FSDP2 puts the sharded weights back on the layers (gathered ones are transient)
        shards.reshard(shards.fsdp_modules(self.model))
        self.layers = {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        # the layers' own weight parameters, held: under FSDP2 a layer's ``weight`` is a gathered
        # copy while it runs, and writes belong in the shard
        self.weights = {name: layer.get_base_layer().weight for name, layer in self.layers.items()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        # every LoRA's strength in the phase under way, read by the dynamic forward in a graph
        # (ops.forward): written in place, never re-allocated, so a captured graph sees it
        adapters = [p for layer in self.layers.values() for p in layer.lora_A.parameters()]
        strengths = torch.zeros(len(self.names), dtype=torch.float32, device=adapters[0].device if adapters else "cpu")
        for layer in self.layers.values():
            _uninstall(layer)
            if not install(layer, [n for n in self.names if n in layer.lora_A], strengths, self.names):
                shards.install(layer)  # a sharded weight: the tensor-parallel forward (or PEFT's under FSDP2)
        self.strengths = strengths

    def _inject(self, model: nn.Module, name: str, config: LoraConfig,
                factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], keep_device: bool = False) -> None:
        with warnings.catch_warnings():
            # several named adapters on one model is the point here, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            # low_cpu_mem_usage: adapters start on the meta device and take our tensors as
            # they are, instead of PEFT initialising rank-384 Linears on the CPU first.
            inject_adapter_in_model(config, model, adapter_name=name, low_cpu_mem_usage=True)
        state = {}
        for module, (a, b) in factors.items():
            # PEFT's own path casts adapters to the base layer's device and dtype: do the same
            # (``keep_device``: the factors were made where the layer's adapters live, which in
            # low-VRAM snapshot mode is the device while the base rests on the host)
            w = _base_weight(model.get_submodule(module))
            device = a.device if keep_device else w.device
            state[f"{module}.lora_A.weight"] = a.to(device=device, dtype=w.dtype)
            state[f"{module}.lora_B.weight"] = b.to(device=device, dtype=w.dtype)
        result = set_peft_model_state_dict(model, state, adapter_name=name, low_cpu_mem_usage=True)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer) and name in m.lora_A)
        left_on_meta = [n for n, p in model.named_parameters() if p.is_meta and f".{name}." in n]
        if unexpected or left_on_meta or wrapped != sorted(factors):
            raise LoRAValidationError(
                f"LoRA {name!r}: PEFT placed the adapter differently from what was validated "
                f"({len(unexpected)} unexpected keys, {len(left_on_meta)} tensors left unloaded, "
                f"{len(wrapped)} modules wrapped for {len(factors)} targets); the model was "
                "left unchanged"
            )
        self._targets[name] = sorted(factors)
        self.covers[name] = frozenset(factors)

    def targets(self, lora: str) -> list[LayerTarget]:
        """The merge path's view of ``lora``: base weights plus the adapter's own A/B tensors.

        Built once per LoRA: the modules and parameters never change after injection (a
        residency move rebinds a parameter's ``.data``, not the parameter), and walking PEFT's
        module tree for 1344 layers on every merge was slow (measured in
        docs/results/measured_constants.md#cached-merge-targets)."""
        cached = self._target_cache.get(lora)
        if cached is None:
            cached = self._target_cache[lora] = self._build_targets(lora)
        return cached

    def _build_targets(self, lora: str) -> list[LayerTarget]:
        out = []
        for module in self._targets[lora]:
            if module not in self.covers[lora]:  # a slot's layers its LoRA does not target
                continue
            layer = self.layers[module]
            # a sharded weight: this rank's block, with the factors' matching slices (ops.shards)
            weight, lora_A, lora_B = shards.local_factors(self.weights[module], layer.lora_A[lora].weight,
                                                          layer.lora_B[lora].weight)
            out.append(LayerTarget(name=module, weight=weight, lora_A=lora_A, lora_B=lora_B,
                                   scale=float(layer.lora_alpha[lora]) / float(layer.r[lora])))
        return out

    def forget(self, adapter: str) -> None:
        """``adapter``'s tensors are about to be rewritten (a LoRA slot takes another LoRA): drop
        what was derived from them (merge targets, kept eager forwards)."""
        self._target_cache.pop(adapter, None)
        self.forward.forget()

    def model_device(self) -> torch.device:
        """Where the adapted weights are now (a residency move may have taken them elsewhere)."""
        layer = next(iter(self.layers.values()), None)
        return layer.get_base_layer().weight.device if layer is not None else self.strengths.device

    def base_weights(self) -> dict[str, torch.Tensor]:
        """Every Linear weight any managed LoRA targets, keyed by module path (a sharded one's local
        shard: what this rank holds)."""
        return {name: shards.local_weight(self.weights[name]) for name in sorted(self.layers)}

    def sharded(self) -> frozenset[str]:
        """The managed layers whose weight is split across ranks."""
        return frozenset(name for name, weight in self.weights.items() if is_sharded(weight))

    def use_forward(self, name: str) -> None:
        """Run later dynamic phases through the ``DYNAMIC_FORWARDS`` strategy ``name``."""
        self.forward.release()  # a strategy left begun by a failed detach lets go of the model
        self.forward = DYNAMIC_FORWARDS[name]()
        self.forward.begin(self.model)

    def activate(self, strengths: Mapping[str, float]) -> int:
        """Attach the adapters with non-zero strength, scaled; returns how many layers run one."""
        live = {n: s for n, s in strengths.items() if s != 0.0}
        self.faults.hit("attach.before")
        self.forward.begin(self.model)
        with torch.no_grad():
            if self.strengths.device != self.model_device():
                self.strengths.data = self.strengths.data.to(self.model_device())
            self.strengths.copy_(torch.tensor([live.get(n, 0.0) for n in self.names], dtype=torch.float32))
        enabled = 0
        for module, layer in self.layers.items():
            names = [n for n in live if module in self.covers[n]]
            if not names:
                if live:
                    self._attached.append(layer)
                    if not self.forward.idle(layer):
                        self._attached.pop()
                continue
            self.faults.hit("attach.layer")
            self._attached.append(layer)  # before attaching: a failure part way is still swept
            sweep_due = self._touched
            self._touched = True  # a failure inside attach still gets PEFT's sweep
            self._touched = self.forward.attach(layer, {n: live[n] for n in names}) or sweep_due
            enabled += 1
        self.active = live
        self.faults.hit("attach.after")
        return enabled

    def deactivate(self) -> None:
        """Detach every adapter and reset scales: the model runs its base weights."""
        self.faults.hit("detach.before")
        for layer in self._attached:
            if has_fused(layer):
                self.faults.hit("detach.layer")
                FusedForward.detach(layer)
        self._attached = []
        self.forward.end()
        if self._touched:
            # PEFT's per-layer calls over 1344 layers are slow, on the request's critical path
            # (docs/results/measured_constants.md#peft-adapter-sweep):
            # swept only when some adapter was enabled or scaled since the last sweep
            for layer in self.layers.values():
                if not layer.disable_adapters:
                    self.faults.hit("detach.layer")
                layer.enable_adapters(False)
                for n in self.names:
                    layer.set_scale(n, 1.0)
            self._touched = False
        self.active = {}

    def remove(self) -> None:
        """Take every adapter off the model: PEFT's wrappers replaced by their base layers again."""
        self.deactivate()
        self.forward.release()
        for layer in self.layers.values():
            _uninstall(layer)
        _unwrap(self.model, self.names)
        self.layers = {}
        self.weights = {}
        self._target_cache = {}

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.layers.values():
            for n in self.names:
                if n in layer.lora_A:
                    for p in (layer.lora_A[n].weight, layer.lora_B[n].weight):
                        total += p.numel() * p.element_size()
        return total


def _uninstall(layer: nn.Module) -> None:
    uninstall(layer)
    shards.uninstall(layer)


def _base_weight(module: nn.Module) -> torch.Tensor:
    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    return base.weight


def _zero_factors(module: nn.Module, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's zero factors for ``module``, where its adapters already are (else its weight's device)."""
    w = _base_weight(module)
    owned = [m.weight for m in module.lora_A.values()] if isinstance(module, LoraLayer) else []
    device = owned[0].device if owned else w.device
    out_features, in_features = w.shape
    return (torch.zeros(rank, in_features, dtype=w.dtype, device=device),
            torch.zeros(out_features, rank, dtype=w.dtype, device=device))


def _unwrap(model: nn.Module, names: list[str]) -> None:
    """Undo a partial injection: put back the base layer of every LoraLayer holding only our
    adapters, and forget our entries in ``model.peft_config``."""
    for path, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        if set(module.lora_A) - set(names):
            for n in names:
                if n in module.lora_A:
                    module.delete_adapter(n)
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, module.get_base_layer())
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        for n in names:
            config.pop(n, None)
        if not config:
            del model.peft_config
