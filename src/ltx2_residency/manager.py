"""ResidencyManager: the facade a pipeline or serving engine talks to.

It is built from a model, a residency mode, the LoRAs, a merge policy and one frozen
:class:`~.options.ManagerOptions`, and wires the layers together: the mode (its table and plans,
:mod:`.modes`), the executor that runs plans as transitions (:mod:`.executor`), the phase
switches (:mod:`.switch`), the request gate (:mod:`.gate`) and the forward guard (:mod:`.guard`).
It decides nothing itself.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .compiled import CompileSpec, compile_dit, is_compiled, refuse_wrapper, spec_of
from .domain import MergePolicyName, Phase, ResidencyMode, WeightState
from .errors import CompiledModuleError, ConfigError, DirtyWeightsError, ModeNotAvailableError, RankMismatchError
from .executor import build_executor
from .faults import NO_FAULTS
from .gate import RequestGate
from .guard import DiTGuard, claim, unclaim
from .linears import is_sharded
from .lockstep import digest_mismatch, peers
from .lora import LoadedLoRA, LoRASpec, validate_all
from .lora_cache import LoRACache, managed_layers, slot_names
from .machine import WeightMachine
from .modes import MODES, REST_STATES, choose_auto
from .ops.dynamic import PeftAdapters
from .ops.exact import EXACT_KERNELS, choose_exact_kernel
from .ops.forward import forward_named
from .ops.merge import MergeStack
from .ops.slots import LoRASlots
from .options import ManagerOptions, checked_arguments, checked_timeout, with_legacy_keywords
from .policy import MergePolicy, make_policy
from .registry import RegisteredLoRA
from .request import RequestScope
from .switch import PhaseSwitch
from .trace import Trace


class ResidencyManager:
    """Guards one DiT's weights across the phases of LTX-2 requests.

    Args:
        transformer: the DiT (any ``nn.Module`` whose LoRA targets are ``nn.Linear``).
        mode: ``"original"`` (one shared DiT), ``"snapshot"``, ``"resident"`` or ``"auto"``.
        loras: the LoRAs to manage, e.g. the distilled LoRA plus a user LoRA.
        merge_policy: ``"sglang"``, ``"dynamic"``, ``"merge"`` or ``"auto"`` (a cost model weighs merging
            against dynamic adapters for each phase's declared work).
        options: everything else (:class:`ManagerOptions`: timeouts, the exact-merge kernel, the
            side-stream undo, the dynamic forward, verification, the clean source ...).
        process_group: a ``torch.distributed`` process group the host engine created (gloo or NCCL),
            one manager per rank: every change to the weights then commits on every rank or on none
            (rank 0 decides, a failure on any rank is every rank's; docs/embedding.md, "Several
            GPUs"). Sharded weights (tensor-parallel or FSDP2 DTensors) are merged shard by shard.
            ``None``: a manager on its own.

    The DiT may be compiled in place before or after (``transformer.compile()``,
    ``compile_repeated_blocks()``, :func:`~ltx2_residency.compile_dit` or :meth:`compile`), not
    wrapped by ``torch.compile(transformer)``; see :mod:`ltx2_residency.compiled`.

    The keywords of 0.1 (``restore=``, ``strict=``, ``request_timeout=`` ...) are still taken, with a
    ``DeprecationWarning``, as fields of ``options``.
    """

    def __init__(self, transformer: nn.Module, mode: ResidencyMode | str = "original",
                 loras: Sequence[LoRASpec] = (), merge_policy: MergePolicyName | str = "sglang", *,
                 options: ManagerOptions | None = None, process_group: Any = None, **keywords: Any) -> None:
        try:
            self.options = with_legacy_keywords(options, keywords)
            refused: BaseException | None = None
        except BaseException as exc:  # told to the other ranks at the first step, then raised
            self.options, refused = ManagerOptions(), exc
        # the host engine's process group (never made or destroyed here): every step in lock-step
        self._peers = peers(process_group, self.options.collective_timeout)
        self._guard: DiTGuard | None = None
        self._adapters: PeftAdapters | None = None
        self._claimed = False
        _, verdicts = self._peers.step(
            "build", lambda: self._configure(refused, transformer, mode, loras, merge_policy),
            choice=lambda config: json.dumps(config, sort_keys=True))
        if verdicts:
            self._agree_config(verdicts)
        _, verdicts = self._peers.step("built", self._build_here, digest=self._built_digest,
                                       undo=lambda *_: self._give_back())
        mismatch = digest_mismatch(verdicts)
        if mismatch:
            self._give_back()
            raise RankMismatchError(f"{mismatch}: load the same checkpoint on every rank; every rank gave its "
                                    "model back")

    def _configure(self, refused: BaseException | None, transformer: nn.Module, mode: ResidencyMode | str,
                   loras: Sequence[LoRASpec], merge_policy: MergePolicyName | str) -> dict[str, Any]:
        """Everything checked and decided before the first change to the model; returns what every
        rank must agree on."""
        if refused is not None:
            raise refused
        refuse_wrapper(transformer)
        if not isinstance(transformer, nn.Module):
            raise ConfigError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
        asked, specs, policy = checked_arguments(mode, loras, merge_policy)
        self.transformer = transformer
        self._specs = {s.name: s for s in specs}  # the LoRAs the manager was built with
        self._policy = policy
        self.trace = Trace(self.options.trace_maxlen)
        # everything is validated before the first mutation (PEFT injection wraps modules)
        self._loaded: list[LoadedLoRA] = validate_all(list(specs), transformer)
        self._managed = managed_layers(transformer, self._loaded)
        self.exact_kernel = choose_exact_kernel(self.options.exact_kernel,
                                                [transformer.get_submodule(n).weight for n in self._managed])
        self.mode, self.mode_reason = self._resolve(asked)
        self._check_sharded()
        self._check_compiled()  # before the stage-2 copy is made
        return {"asked": asked if isinstance(asked, str) else asked.value, "mode": self.mode.value,
                "policy": policy.value, "loras": sorted(self._specs), "managed": len(self._managed),
                "kernel": self.exact_kernel}

    def _agree_config(self, verdicts: list[Any]) -> None:
        """Every rank built alike: the same LoRAs, policy and layers; ``mode="auto"`` as rank 0 chose."""
        configs = [json.loads(v.choice) for v in verdicts]
        first = configs[0]
        differ = sorted({k for c in configs for k in c if k != "mode" and c.get(k) != first.get(k)})
        if first["asked"] != "auto" and any(c["mode"] != first["mode"] for c in configs):
            differ.append("mode")
        if differ:
            raise RankMismatchError(
                f"the ranks built their managers differently ({', '.join(differ)}: "
                + "; ".join(f"rank {v.rank}: " + ", ".join(f"{k}={c.get(k)!r}" for k in differ)
                            for v, c in zip(verdicts, configs, strict=True))
                + "); build every rank's manager with the same arguments")
        if self.mode.value != first["mode"]:
            self.mode, self.mode_reason = ResidencyMode(first["mode"]), "mode='auto' as rank 0 of the group chose"
            self._check_compiled()

    def _build_here(self) -> None:
        claim(self.transformer, self)  # one model, one manager: refused before anything changes
        self._claimed = True
        self._grad = {n: p.requires_grad for n, p in self.transformer.named_parameters()}
        try:
            self._build(make_policy(self._policy))
        except BaseException:
            self._give_back()  # a failed constructor leaves the model exactly as it was given
            raise

    def _built_digest(self) -> str:
        return self._gate.verified_digest()

    def _resolve(self, asked: ResidencyMode | str) -> tuple[ResidencyMode, str]:
        if isinstance(asked, ResidencyMode):
            return asked, f"mode={asked.value!r} was asked for"
        if self._sharded():
            return ResidencyMode.ORIGINAL, "the DiT's weights are sharded across ranks: one shared DiT per rank"
        if self._copies_uncompilable():
            return ResidencyMode.ORIGINAL, ("the DiT was compiled by other means than ltx2_residency, and a copy of "
                                            "it could not be compiled alike: one shared DiT")
        lora_bytes = sum(lo.nbytes for lo in self._loaded)
        return choose_auto(self.transformer, lora_bytes, int(self.options.activation_reserve_gib * 2**30))

    def _build(self, policy: MergePolicy) -> None:
        o, faults = self.options, self.options.faults or NO_FAULTS
        # the pre-merged stage-2 DiT is copied from the base before anything wraps or hooks it
        stage2 = {name: spec.strength(Phase.STAGE2) for name, spec in self._specs.items()}
        mode = MODES[self.mode](self.transformer, self._loaded, stage2, faults, o.low_vram)
        self._compile_copies(mode.dits)
        slots = slot_names(self.transformer, self._managed, o.lora_slot_rank, o.device_lora_cache_bytes,
                           self._specs)
        # slots at start-up when sized in the options (a compiled DiT then never changes) or when the
        # manager has no LoRA of its own; else at the first request that runs an added LoRA
        now = slots if o.device_lora_cache_bytes is not None or not self._loaded else []
        self._adapters = PeftAdapters(self.transformer, self._loaded, faults, o.dynamic_forward, now,
                                      o.lora_slot_rank, self._managed)
        stack = MergeStack(EXACT_KERNELS[self.exact_kernel](), faults, o.check_layers)
        self._executor = build_executor(mode, self._adapters, stack, o.clean_source, o.overlap_restore, faults,
                                        self.trace)
        self._cache = LoRACache(self.transformer, self._loaded,
                                LoRASlots(self._adapters, o.lora_slot_rank, slots, self._managed),
                                o.host_lora_cache_bytes)
        self._switch = PhaseSwitch(self._executor, policy, o, self._peers)
        self._gate = RequestGate(self._executor, self._switch, self._cache, self._peers,
                                 frozenset(self._executor.weights) - self._adapters.sharded())
        self._guard = DiTGuard(self._executor, self._gate, o.strict)

    def _sharded(self) -> list[str]:
        return [n for n in self._managed if is_sharded(self.transformer.get_submodule(n).weight)]

    def _check_sharded(self) -> None:
        sharded = self._sharded()
        if sharded and self.mode is not ResidencyMode.ORIGINAL:
            raise ModeNotAvailableError(
                f"mode {self.mode.value!r} keeps a second copy of the DiT, and {len(sharded)} of its managed weights "
                f"are sharded across ranks (e.g. {sharded[0]!r}, a DTensor): use mode='original' (each rank "
                "merges its own shards in place) or mode='auto'")

    def _copies_uncompilable(self) -> bool:
        return is_compiled(self.transformer) and spec_of(self.transformer) is None

    def _check_compiled(self) -> None:
        if self.mode in (ResidencyMode.RESIDENT, ResidencyMode.SNAPSHOT) and self._copies_uncompilable():
            raise CompiledModuleError(
                f"mode {self.mode.value!r} runs a copy of the DiT, and the DiT was compiled by other means "
                "than ltx2_residency, so the copy cannot be compiled the same way; compile with "
                "ltx2_residency.compile_dit(transformer, CompileSpec(...)) before building the manager, or "
                "build it on the eager DiT and call manager.compile(...)")

    def _compile_copies(self, dits: Sequence[Any]) -> None:
        """A stage-2 copy of a compiled base DiT is compiled as the base was (a copy of a module
        is not compiled: it would run eager beside the compiled base)."""
        spec = spec_of(self.transformer)
        for module in [d.module for d in dits if d.module is not self.transformer]:
            if spec is not None:
                compile_dit(module, spec)

    # ------------------------------------------------------------------ LoRAs
    def add_lora(self, spec: LoRASpec) -> RegisteredLoRA:
        """Register ``spec`` while requests run: it is validated against the model and its file
        hashed without waiting for the DiT, then published at once for the next requests. A typed
        error (a name already registered, a file that does not fit the model or the LoRA slots)
        registers nothing and moves nothing. Requests choose it with ``request(loras={name: ...})``."""
        self._gate.refuse_if_closed("add_lora()")
        def register() -> RegisteredLoRA:
            if not isinstance(spec, LoRASpec):
                raise ConfigError(f"add_lora() takes a LoRASpec, got {type(spec).__name__}; build one with "
                                  "LoRASpec(name=..., path=...)")
            return self._cache.register(spec)
        # with several ranks: registered on every rank or on none
        entry, _ = self._peers.step(f"add_lora {getattr(spec, 'name', '?')}", register,
                                    undo=lambda added, *_: self._cache.remove(added.spec.name))
        return entry

    def remove_lora(self, name: str) -> None:
        """Unregister ``name`` (requests already admitted with it keep it until they end)."""
        self._gate.refuse_if_closed("remove_lora()")
        # with several ranks: every rank knows the name before any removes it
        self._peers.step(f"check remove_lora {name}", lambda: self._cache.registry.known(name))
        self._cache.remove(name)

    @property
    def loras(self) -> Mapping[str, RegisteredLoRA]:
        """The registered LoRAs, by name (a snapshot)."""
        return self._cache.registry.entries

    @property
    def specs(self) -> dict[str, LoRASpec]:
        """The registered LoRAs' specs, by name."""
        return {name: entry.spec for name, entry in self.loras.items()}

    def lora_cache_stats(self) -> dict[str, Mapping[str, Any]]:
        """Bytes, hits and misses of the added LoRAs' tiers: ``host`` cache, ``device`` slots, ``disk`` reads."""
        return self._cache.stats()

    # ------------------------------------------------------------------ requests
    def request(self, timeout: float | None = ..., *,  # type: ignore[assignment]
                loras: Mapping[str, float | Mapping[str, float]] | None = None) -> RequestScope:
        """Own the DiT for one request: ``with manager.request() as req:``; leaving the block by any
        path (return, exception, Ctrl-C, even a second Ctrl-C during the cleanup) restores CLEAN
        or quarantines, and frees the DiT for the next request.

        ``loras`` chooses the request's LoRAs and strengths: ``{"style": 0.8}`` (every phase) or
        ``{"distilled": {"stage2": 1.0}}`` (the phases not named: 0). ``None``: every registered LoRA
        at its spec's strengths. Unknown names and bad strengths raise here, before anything moves;
        the added LoRAs chosen start loading (on a loader thread) as the request waits for the DiT."""
        def choose() -> tuple[Any, float | None]:
            chosen = self._cache.registry.choose(loras)
            self._cache.check(chosen)
            return chosen, self._wait(timeout, "request")
        # with several ranks: a choice one rank refuses is refused on every rank
        (chosen, wait), _ = self._peers.step("request", choose)
        return RequestScope(self._gate, wait, chosen)

    def verify_clean(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Raise :class:`DirtyWeightsError` unless every managed weight is bit-identical to clean.
        Call it between requests; a mismatch quarantines the DiT."""
        def check() -> None:
            self._executor.settle(host=True)
            self._executor.check_clean()
        # with several ranks: dirty on one rank quarantines every rank, as do differing weights
        _, verdicts = self._peers.step(
            "verify_clean", lambda: self._gate.between_requests(
                "verify_clean() checks the DiT", lambda: self._wait(timeout, "verify_clean"), check),
            digest=self._gate.verified_digest,
            undo=lambda *_: self._executor.quarantine_if_possible())
        mismatch = digest_mismatch(verdicts)
        if mismatch:
            self._executor.quarantine_if_possible()
            raise RankMismatchError(f"verify_clean(): {mismatch}; every rank is quarantined")

    def synchronize(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Wait (on the host) for an undo on the side stream to finish and settle the DiT to CLEAN,
        checking it when the deferred verify applies; a no-op when nothing is pending."""
        self._gate.between_requests("synchronize() settles the DiT", lambda: self._wait(timeout, "synchronize"),
                                    lambda: self._executor.settle(host=True))

    def repair(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Bring a QUARANTINED DiT back to CLEAN from its clean source (a no-op when not quarantined)."""
        def repair() -> None:
            with self._gate.hold(lambda: self._wait(timeout, "repair"), "repair()"):
                with contextlib.suppress(DirtyWeightsError):
                    self._executor.settle_pending(host=True)  # a dirty deferred verify quarantines: repaired below
                if self.state not in REST_STATES:  # (low-VRAM snapshot rests offloaded: nothing to repair)
                    self._executor.repair_quarantined()
        # with several ranks: repaired on every rank, or quarantined on every rank
        self._peers.step("repair", repair, undo=lambda *_: self._executor.quarantine_if_possible())

    def close(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Give the model back as it was given (module structure, ``requires_grad``, bits: its own
        DiT again, unguarded, free for another manager) and refuse every further use. Between
        requests only. A model is only given back clean: a quarantined DiT is repaired first (a
        ``RepairError`` when it cannot be, and the manager stays open). Idempotent."""
        if self._gate.closed:
            return
        with self._gate.hold(lambda: self._wait(timeout, "close"), "close()"):
            if self._gate.closed:  # another thread closed it while this call waited
                return
            with contextlib.suppress(DirtyWeightsError):
                self._executor.settle(host=True)  # a dirty deferred verify quarantines: repaired below
            if self.state is WeightState.QUARANTINED:
                self._executor.repair_quarantined()
            if self.state is WeightState.OFFLOADED:  # low-VRAM snapshot rests on the host: back on the device
                self._executor.fire("load_base")
                self._executor.fire("loaded")
            self._give_back()
            self._cache.close()
            self._gate.closed = True  # after: a close() cut short gives the model back on the next call

    def _wait(self, timeout: object, what: str) -> float | None:
        return self.options.request_timeout if timeout is ... else checked_timeout(timeout, f"{what}(timeout=)")

    def _give_back(self) -> None:
        """The model as it was given: hooks off, PEFT's wrappers gone, ``requires_grad`` as it was,
        unclaimed. Idempotent (a failed constructor and ``close()`` both end here)."""
        if not self._claimed:
            return
        if self._guard is not None:
            self._guard.hooks.remove(self.transformer)  # a stage-2 copy keeps its guard: it refuses once closed
        if self._adapters is not None:
            self._adapters.remove()
        for name, p in self.transformer.named_parameters():
            if name in self._grad:
                p.requires_grad_(self._grad[name])
        unclaim(self.transformer, self)

    # ------------------------------------------------------------------ settings between requests
    @property
    def policy(self) -> MergePolicy:
        return self._switch.policy

    def set_merge_policy(self, merge_policy: str) -> None:
        """Use another merge policy from the next request on (a request keeps the one it started with)."""
        policy = make_policy(merge_policy)  # an unknown name raises before anything changes
        self._gate.outside_requests("set_merge_policy()")
        self._switch.policy = policy

    def compile(self, spec: CompileSpec | str | bool = True, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Compile every DiT this manager runs (the base DiT, and the stage-2 copy of resident and
        snapshot modes) in place, as ``spec`` says (``True``: :class:`CompileSpec`'s defaults; a
        string: inductor's mode). Between requests; the auto policy then prices compiled calls.
        The model stays compiled after ``close()``."""
        checked = CompileSpec.of(spec)
        if checked is None:
            raise ConfigError("compile() needs a CompileSpec, a mode name or True; a DiT is not un-compiled")
        checked.require_backend()
        self._gate.outside_requests("compile()")
        with self._gate.hold(lambda: self._wait(timeout, "compile"), "compile()"):
            for dit in self._executor.mode.dits:
                compile_dit(dit.module, checked)
            self._switch.costs = None

    @property
    def compiled(self) -> bool:
        """Whether the DiT is compiled (in place, by any means)."""
        return is_compiled(self.transformer)

    @property
    def dynamic_forward(self) -> str:
        return self._executor.adapters.forward.name

    def set_dynamic_forward(self, dynamic_forward: str) -> None:
        """Run dynamic phases with ``"fused"`` or ``"peft"`` from the next request on."""
        name = forward_named(dynamic_forward)  # a bad name raises before anything changes
        self._gate.outside_requests("set_dynamic_forward()")
        self._executor.adapters.use_forward(name)
        self._switch.costs = None  # the cost model prices the forward in use

    # ------------------------------------------------------------------ what it holds
    @property
    def state(self) -> WeightState:
        return self._executor.state

    @property
    def machine(self) -> WeightMachine:
        return self._executor.machine

    @property
    def closed(self) -> bool:
        return self._gate.closed

    @property
    def managed_weights(self) -> Mapping[str, torch.Tensor]:
        return dict(self._executor.weights)

    @property
    def restore(self) -> str:
        """Deprecated since 0.2 (removed in 0.3): the exact-merge kernel is :attr:`exact_kernel`."""
        warnings.warn("manager.restore is deprecated; use manager.exact_kernel", DeprecationWarning, stacklevel=2)
        return self.exact_kernel

    @property
    def overlap_restore(self) -> bool:
        return self._executor.side_stream is not None

    @property
    def low_vram(self) -> bool:
        return self._executor.mode.low_vram

    def residency(self) -> dict[str, str]:
        """Where each DiT is: ``{"base": "resident", "stage2": "offloaded"}``."""
        return {d.name: d.residency.value for d in self._executor.mode.dits}

    def memory(self) -> dict[str, int | float]:
        """Bytes held for weight management (the DiT itself excluded)."""
        ex = self._executor
        source = ex.clean_source
        return {
            "managed_weight_bytes": sum(w.numel() * w.element_size() for w in ex.weights.values()),
            "lora_adapter_bytes": ex.adapters.nbytes,
            "restore_capture_bytes": ex.stack.nbytes_held,
            "clean_source_host_bytes": source.nbytes if source else 0,
            "clean_source_shared_host_bytes": source.shared_nbytes if source else 0,
            "last_merge_exception_fraction": ex.stack.last_exception_fraction,
            "expected_peak_device_bytes": ex.mode.expected_peak_bytes(ex.adapters.nbytes),
            **{f"{d.name}_{place}_bytes": n for d in ex.mode.dits for place, n in d.bytes_by_place().items()},
        }

    def __repr__(self) -> str:
        return (f"<ResidencyManager at 0x{id(self):x}: mode={self.mode.value!r}, loras={list(self.specs)}, "
                f"policy={self.policy.name.value!r}, state={self.state.value!r}{', closed' if self.closed else ''}>")
