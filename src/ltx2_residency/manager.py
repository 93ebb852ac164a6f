"""ResidencyManager: the facade a pipeline or serving engine talks to.

It owns the weight-state machine, the request lock, the forward guard and the trace. It
decides nothing about *how* weights change (``ops``) or *when* to merge (``policy``); it
sequences events of the mode's table and turns every failure into either CLEAN (rolled back
exactly) or QUARANTINED (the DiT refuses to run until :meth:`ResidencyManager.repair`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .costmodel import CostModel, PhaseWork
from .domain import (
    PHASE_TARGET,
    REST_STATES,
    ApplyKind,
    MergePolicyName,
    Phase,
    ResidencyMode,
    WeightState,
)
from .errors import (
    ConfigError,
    DirtyWeightsError,
    QuarantinedError,
    RepairError,
    RequestStateError,
)
from .faults import NO_FAULTS, FaultInjector
from .guard import ForwardGuard, GuardedDiT, claim
from .lora import LoadedLoRA, LoRASpec, resolve_strengths, validate_all
from .machine import TABLES, Edge, WeightMachine
from .modes import MODE_STRATEGIES, choose_auto
from .ops.ahead import MergeAhead
from .ops.clean_source import HostCopy
from .ops.dynamic import PeftAdapters
from .ops.fingerprint import Fingerprint, FingerprintPlan
from .ops.forward import forward_named
from .ops.merge import RESTORE_STRATEGIES, MergeStack, choose_restore
from .ops.overlap import PendingUndo, UndoStream
from .options import Verify, checked_timeout, manager_options
from .ownership import Ownership
from .policy import MergePolicy, PhaseContext, hides_merge, make_policy
from .request import Request, RequestScope
from .trace import Trace, TransitionRecord


class ResidencyManager(GuardedDiT):
    """Guards one DiT's weights across the phases of LTX-2 requests.

    Args:
        transformer: the DiT (any ``nn.Module`` whose LoRA targets are ``nn.Linear``).
        mode: residency mode, ``"original"`` (one shared DiT).
        loras: the LoRAs to manage, e.g. the distilled LoRA plus a user LoRA.
        merge_policy: ``"sglang"``, ``"dynamic"``, ``"merge"`` or ``"auto"`` (a cost model weighs merging
            against dynamic adapters for each phase's declared work; see ``policy`` and ``costmodel``).
        native_ltx23: the model is the native LTX-2.3 variant (the sglang policy merges then).
        restore: exact-undo strategy of the merge path: ``"auto"`` (default: ``"fused"`` when
            the weights are bf16 on a CUDA device and Triton is there, else ``"recompute"``),
            ``"fused"`` (the recompute undo as Triton kernels, one launch per LoRA),
            ``"recompute"`` (least memory, pure torch), ``"copy"`` (a same-device copy) or
            ``"copy_host"``.
        check_layers: also check every undone layer against its pre-merge digest (catches a
            bad undo at the layer it happens; costs one more pass at merge and at restore).
        strict: the forward guard also refuses runs outside a request's phase.
        verify: fingerprint the DiT when a request ends: ``"after_merge"`` (when the request
            merged into the weights), ``"always"`` or ``"never"``.
        clean_source: ``"host_copy"`` keeps a host copy of the managed weights for
            :meth:`repair`; ``None`` keeps none (repair is then impossible).
        request_timeout: seconds a request waits for the DiT (``None`` or ``inf``: forever).
        faults: a :class:`FaultInjector` for tests and drills.
        low_vram: snapshot mode only: evict the base before prefetching stage 2 (never both on
            the device). ``None``: on when the device has less than 130 GiB.
        activation_reserve_gib: ``mode="auto"`` keeps this much device memory free for
            activations when deciding whether two DiTs fit.
        overlap_restore: run the exact undo of merged LoRAs on a side stream when a request
            ends, so the caller's next work (the VAE decode) overlaps it; the DiT stays
            ``restoring`` until its next user (the next request, :meth:`verify_clean`,
            :meth:`synchronize`) orders itself after the undo on the device, and the end-of-request
            verify is deferred to that point too. ``None`` (default): on with the ``fused``
            restore on a CUDA device. On the CPU the undo runs inline; only the bookkeeping differs.
        dynamic_forward: how dynamic phases run the adapters: ``"fused"`` (default: our forward
            over PEFT's adapter tensors, see ``ops.forward``) or ``"peft"`` (PEFT's own forward,
            bit for bit what diffusers' ``set_adapters`` gives).
    """

    def __init__(
        self,
        transformer: nn.Module,
        mode: ResidencyMode | str = "original",
        loras: Sequence[LoRASpec] = (),
        merge_policy: str = "sglang",
        *,
        native_ltx23: bool = False,
        restore: str = "auto",
        check_layers: bool = False,
        strict: bool = True,
        verify: Verify = "after_merge",
        clean_source: Literal["host_copy"] | None = "host_copy",
        request_timeout: float | None = 300.0,
        trace_maxlen: int = 10_000,
        faults: FaultInjector | None = None,
        low_vram: bool | None = None,
        activation_reserve_gib: float = 16.0,
        overlap_restore: bool | None = None,
        dynamic_forward: str = "fused",
    ) -> None:
        if not isinstance(transformer, nn.Module):
            raise ConfigError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
        options = manager_options(
            mode=mode, loras=loras, merge_policy=merge_policy, native_ltx23=native_ltx23, restore=restore,
            check_layers=check_layers, strict=strict, verify=verify, clean_source=clean_source,
            request_timeout=request_timeout, trace_maxlen=trace_maxlen, faults=faults, low_vram=low_vram,
            activation_reserve_gib=activation_reserve_gib, overlap_restore=overlap_restore,
            dynamic_forward=dynamic_forward)
        auto = options.auto
        self.mode = options.mode if isinstance(options.mode, ResidencyMode) else ResidencyMode.ORIGINAL
        self.policy: MergePolicy = make_policy(options.merge_policy)
        restore, verify, dynamic_forward = options.restore, options.verify, options.dynamic_forward
        specs = list(options.loras)

        self.transformer = transformer
        self.native_ltx23 = options.native_ltx23
        self.strict = options.strict
        self.verify = verify
        self.request_timeout = options.request_timeout
        self.faults = options.faults or NO_FAULTS
        self.specs = {s.name: s for s in specs}
        self.trace = Trace(options.trace_maxlen)

        # Validate everything before the first mutation (PEFT injection wraps modules).
        self.loras: list[LoadedLoRA] = validate_all(specs, transformer)
        targets = sorted({m for lo in self.loras for m in lo.targets})
        self.restore = choose_restore(restore, [transformer.get_submodule(n).weight for n in targets])
        self.mode_reason = f"mode={self.mode.value!r} was asked for"
        if auto:
            lora_bytes = sum(lo.nbytes for lo in self.loras)
            self.mode, self.mode_reason = choose_auto(transformer, lora_bytes,
                                                      int(options.activation_reserve_gib * 2**30))
        self._closed = False
        claim(transformer, self)  # one model, one manager: refused before anything changes
        self._grad = {n: p.requires_grad for n, p in transformer.named_parameters()}
        try:
            self._build(transformer, options.clean_source, options.check_layers, options.overlap_restore,
                        dynamic_forward, options.low_vram)
        except BaseException:
            self._give_back()  # a failed constructor leaves the model exactly as it was given
            raise

    def _build(self, transformer: nn.Module, clean_source: str | None, check_layers: bool,
               overlap_restore: bool | None, dynamic_forward: str, low_vram: bool | None) -> None:
        # the pre-merged stage-2 DiT is copied from the base before anything wraps or hooks it
        stage2 = {name: spec.strength(Phase.STAGE2) for name, spec in self.specs.items()}
        self._mode = MODE_STRATEGIES[self.mode](transformer, self.loras, stage2, self.faults, low_vram)
        self._adapters = PeftAdapters(transformer, self.loras, self.faults, dynamic_forward)
        self._weights = self._adapters.base_weights()
        self._fingerprints = FingerprintPlan(self._weights)
        self._clean = self._fingerprints.compute()
        self._clean_source = (HostCopy(self._weights, shared=self._mode.shared_clean_copies(self._weights))
                              if clean_source == "host_copy" else None)
        self._stack = MergeStack(RESTORE_STRATEGIES[self.restore](), self.faults, check_layers)
        device = next(iter(self._weights.values())).device if self._weights else torch.device("cpu")
        if overlap_restore is None:
            overlap_restore = self.restore == "fused" and device.type == "cuda"
        self.overlap_restore = overlap_restore
        self._undo_stream = UndoStream(device) if overlap_restore else None
        self._pending: PendingUndo | None = None  # an overlapped undo its next user has not settled
        self._ahead: MergeAhead | None = None  # stage 2's merge, started behind stage 1's last calls
        self._costs: CostModel | None = None  # merge_policy="auto" only
        self.machine = WeightMachine(TABLES[self.mode], {
            "merge": self._effect_merge,
            "premerge": self._effect_premerge,
            "attach": self._effect_attach,
            "restore": self._effect_restore,
            "repair": self._effect_repair,
            "activate": lambda edge, ctx: self._mode.activate_stage2(),
            "load": self._effect_load,
        })
        self._base_resident = True
        self._ownership = Ownership()
        self._request: Request | None = None
        self._context: tuple[int | None, str | None] = (None, None)
        self._guard = ForwardGuard([d.module for d in self._mode.dits], self._forward_guard, self._block_guard)

    # ------------------------------------------------------------------ public surface
    @property
    def state(self) -> WeightState:
        return self.machine.state

    @property
    def managed_weights(self) -> Mapping[str, torch.Tensor]:
        return dict(self._weights)

    def request(self, timeout: float | None = ...) -> RequestScope:  # type: ignore[assignment]
        """Own the DiT for one request: ``with manager.request() as req:``; leaving the block by any
        path (return, exception, Ctrl-C, even a second Ctrl-C during the cleanup) restores CLEAN
        or quarantines, and frees the DiT for the next request."""
        return RequestScope(self, self._wait(timeout, "request"))

    def _open_request(self, timeout: float | None) -> Request:
        """The request scope's entry: its ``ExitStack`` already holds the release and the close."""
        self._refuse_if_closed("request()")
        self._ownership.acquire(timeout, "request()")
        self._settle()
        req = self._request = Request(self)
        if self.state is WeightState.QUARANTINED:
            raise QuarantinedError(self._quarantine_message())
        return req

    def _close_request(self, interrupted: BaseException | None) -> None:
        """The request scope's exit (run twice, see ``RequestScope``): restore, verify, close."""
        req = self._request
        if req is None:
            return
        try:
            self._finish(req)
        except Exception as exc:
            if interrupted is None or isinstance(interrupted, Exception):
                raise
            # the body's Ctrl-C keeps propagating; the quarantine rides along as a note
            interrupted.add_note(str(exc))
        req.closed = True
        self._request = None

    def _wait(self, timeout: object, what: str) -> float | None:
        return self.request_timeout if timeout is ... else checked_timeout(timeout, f"{what}(timeout=)")

    def verify_clean(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Raise :class:`DirtyWeightsError` unless every managed weight is bit-identical to clean.
        Call it between requests; a mismatch quarantines the DiT."""
        def check() -> None:
            self._settle(host=True)
            self._check_clean()
        self._between_requests("verify_clean() checks the DiT", timeout, check)

    def synchronize(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Wait (on the host) for an overlapped restore to finish and settle the DiT to CLEAN,
        checking it when the deferred verify applies; a no-op when nothing is pending."""
        self._between_requests("synchronize() settles the DiT", timeout, lambda: self._settle(host=True))

    def _between_requests(self, what: str, timeout: float | None, run: Callable[[], None]) -> None:
        self._refuse_if_closed(what.split()[0])
        if self._ownership.mine and self._request is not None:
            raise RequestStateError(f"{what} between requests; call it after the `with manager.request()` block")
        with self._ownership.held(self._wait(timeout, what.split("(")[0]), what.split()[0]):
            run()

    def repair(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Bring a QUARANTINED DiT back to CLEAN from its clean source (a no-op when not quarantined)."""
        self._refuse_if_closed("repair()")
        with self._ownership.held(self._wait(timeout, "repair"), "repair()"):
            with contextlib.suppress(DirtyWeightsError):
                self._settle_restore(host=True)  # a dirty deferred verify quarantines: repaired below
            if self.state not in REST_STATES:  # (low-VRAM snapshot rests offloaded: nothing to repair)
                self._repair_quarantined()

    def _repair_quarantined(self) -> None:
        try:
            self._fire("repair")
            self._fire("restored")
        except BaseException as exc:
            if self.machine.can("quarantine"):
                self._fire("quarantine")
            if isinstance(exc, RepairError):
                raise
            raise RepairError(f"repair failed, the DiT stays quarantined: {exc!r}") from exc

    def set_merge_policy(self, merge_policy: str) -> None:
        """Use another merge policy from the next request on (between requests only: a request
        keeps the policy it started with)."""
        policy = make_policy(merge_policy)  # an unknown name raises before anything changes
        self._outside_requests("set_merge_policy()")
        self.policy = policy

    @property
    def dynamic_forward(self) -> str:
        return self._adapters.forward.name

    def set_dynamic_forward(self, dynamic_forward: str) -> None:
        """Run dynamic phases with ``"fused"`` or ``"peft"`` from the next request on."""
        name = forward_named(dynamic_forward)  # a bad name raises before anything changes
        self._outside_requests("set_dynamic_forward()")
        self._adapters.use_forward(name)
        self._costs = None  # the cost model prices the forward in use

    def _outside_requests(self, what: str) -> None:
        if self._request is not None:
            raise RequestStateError(f"{what} takes effect between requests; call it after the `with` block")

    def memory(self) -> dict[str, int | float]:
        """Bytes held for weight management (the DiT itself excluded)."""
        return {
            "managed_weight_bytes": sum(w.numel() * w.element_size() for w in self._weights.values()),
            "lora_adapter_bytes": self._adapters.nbytes,
            "restore_capture_bytes": self._stack.nbytes_held,
            "clean_source_host_bytes": self._clean_source.nbytes if self._clean_source else 0,
            "clean_source_shared_host_bytes": self._clean_source.shared_nbytes if self._clean_source else 0,
            "last_merge_exception_fraction": self._stack.last_exception_fraction,
            "expected_peak_device_bytes": self._mode.expected_peak_bytes(self._adapters.nbytes),
            **{f"{d.name}_{place}_bytes": n for d in self._mode.dits for place, n in d.bytes_by_place().items()},
        }

    def close(self, timeout: float | None = ...) -> None:  # type: ignore[assignment]
        """Give the model back as it was given (module structure, ``requires_grad``, bits: its own
        DiT again, unguarded, free for another manager) and refuse every further use. Between
        requests only. A model is only given back clean: a quarantined DiT is repaired first (a
        ``RepairError`` when it cannot be, and the manager stays open). Idempotent."""
        if self._closed:
            return
        with self._ownership.held(self._wait(timeout, "close"), "close()"):
            with contextlib.suppress(DirtyWeightsError):
                self._settle(host=True)  # a dirty deferred verify quarantines: repaired below
            if self.state is WeightState.QUARANTINED:
                self._repair_quarantined()
            if self.state is WeightState.OFFLOADED:  # low-VRAM snapshot rests on the host: back on the device
                self._fire("load_base")
                self._fire("loaded")
            self._give_back()
            self._closed = True  # after: a close() cut short gives the model back on the next call

    def __repr__(self) -> str:
        return (f"<ResidencyManager at 0x{id(self):x}: mode={self.mode.value!r}, loras={list(self.specs)}, "
                f"policy={self.policy.name.value!r}, state={self.state.value!r}{', closed' if self._closed else ''}>")

    @property
    def low_vram(self) -> bool:
        return self._mode.low_vram

    def residency(self) -> dict[str, str]:
        """Where each DiT is: ``{"base": "resident", "stage2": "offloaded"}``."""
        return {d.name: d.residency.value for d in self._mode.dits}

    # ------------------------------------------------------------------ request internals
    def _enter_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                     work: PhaseWork | None = None) -> nn.Module:
        if self.state is WeightState.QUARANTINED:
            raise QuarantinedError(self._quarantine_message())
        strengths = resolve_strengths(self.specs, phase, overrides)
        stage1 = req.strengths.get(Phase.STAGE1, strengths if phase is Phase.STAGE1 else {})
        premerged = phase is Phase.STAGE2 and self._mode.uses_premerged(strengths)
        # a merge started ahead (req.prepare) is completed when the phase and strengths are the ones
        # prepared; anything else undoes it and switches as usual
        ahead = self.state is WeightState.PREMERGING and req.prepared == (phase, strengths)
        kind = ApplyKind.MERGED if ahead else self._decide(phase, strengths, stage1, work)
        if phase is Phase.STAGE2 and self._mode.stage2 is not None:
            # a second DiT serves stage 2 at its pre-merged strengths; any other strength runs
            # dynamic on the base, whose weights stay untouched
            kind = ApplyKind.MERGED if premerged else (ApplyKind.NONE if kind is ApplyKind.NONE
                                                         else ApplyKind.DYNAMIC)
        self._context = (req.id, phase.value)
        req.phase = None  # no phase may run until this switch has completed
        try:
            if self._ahead is not None:
                self._ahead.refuse_if_failed()  # the engine may have caught the failed call: the request fails
            if self.state not in (WeightState.CLEAN, WeightState.OFFLOADED) and not ahead:
                self._restore_or_quarantine(final=False)
            if premerged:
                self._fire("activate_stage2")
                if self.machine.can("activated"):
                    self._fire("activated")
            else:
                if phase is Phase.STAGE2:
                    self._mode.skip_stage2()
                if self.state is WeightState.OFFLOADED:
                    self._fire("load_base")
                    self._fire("loaded")
                if kind is ApplyKind.MERGED:
                    req.mutated = True  # before the first write: the end-of-request check must run
                    self._fire("merge", plan=[(n, s) for n, s in strengths.items() if s != 0.0])
                    if self._costs is not None:  # the auto policy prices the next merge from this one
                        if not ahead:  # a merge ahead's switch is its tail: most of it ran in stage 1
                            self._costs.observe_merge(max(self.trace[-1].duration_ms, 1e-3))
                        self._costs.observe_records(self._stack.last_exception_fraction)
                    self._fire(f"merged_{phase.value}")
                elif kind is ApplyKind.DYNAMIC:
                    self._fire("attach", strengths=strengths)
                    self._fire(f"attached_{phase.value}")
                if phase is Phase.STAGE1:
                    self._mode.after_stage1()
        except BaseException as exc:
            req.failed = exc
            if self.state not in (WeightState.CLEAN, WeightState.OFFLOADED, WeightState.QUARANTINED):
                self._restore_or_quarantine()
            elif self.state is not WeightState.QUARANTINED:
                self._mode.settle()  # nothing applied to undo, but a prefetch may be in flight
            raise
        assert self.state is PHASE_TARGET[(phase, kind)], (self.state, phase, kind)
        req.phase = phase
        req.entered.append(phase)
        req.strengths[phase] = strengths
        return self._mode.active.module

    def _decide(self, phase: Phase, strengths: dict[str, float], stage1: Mapping[str, float],
                work: PhaseWork | None, ahead: bool = False) -> ApplyKind:
        costs = self._cost_model() if self.policy.name is MergePolicyName.AUTO else None
        return self.policy.decide(PhaseContext(self.mode, phase, strengths, stage1, self.native_ltx23, work, costs,
                                               ahead))

    def _prepare_phase(self, req: Request, phase: Phase, overrides: Mapping[str, float] | None,
                       work: PhaseWork | None, calls: int) -> bool:
        """Start ``phase``'s merge behind the current phase's last ``calls`` DiT calls, when the
        policy merges it into the shared DiT and nothing is applied now (see ``ops.ahead``)."""
        strengths = resolve_strengths(self.specs, phase, overrides)
        if not self.machine.can("premerge") or not hides_merge(req.work.get(Phase.STAGE1), self._mode.device.type):
            return False
        stage1 = req.strengths.get(Phase.STAGE1, {})
        if self._decide(phase, strengths, stage1, work, ahead=True) is not ApplyKind.MERGED:
            return False
        req.prepared = (phase, strengths)
        req.mutated = True
        try:
            self._fire("premerge", plan=[(n, s) for n, s in strengths.items() if s != 0.0], calls=calls)
        except BaseException as exc:
            req.failed = exc
            self._restore_or_quarantine(final=False)
            raise
        return True

    def _finish(self, req: Request) -> None:
        self._context = (req.id, None)
        try:
            if self._pending is not None:
                pass  # an overlapped undo is under way already (this exit runs a second time)
            elif self.state not in (WeightState.CLEAN, WeightState.OFFLOADED, WeightState.QUARANTINED):
                self._restore_or_quarantine(overlap=self._undo_stream is not None)
                restore = next((r for r in reversed(self.trace) if r.event == "restore"), None)
                if self._costs is not None and restore is not None and req.mutated:
                    self._costs.observe_undo(max(restore.duration_ms, 1e-3))  # the critical-path part
            elif self.state is not WeightState.QUARANTINED:
                self._mode.settle()  # no restore ran: release a stage-2 prefetch the request started
            verify = self.verify == "always" or (self.verify == "after_merge" and req.mutated)
            if self._pending is not None and verify:
                assert self._undo_stream is not None
                with self._undo_stream.running():  # queued behind the undo, read when it settles
                    self._pending.fingerprint = self._fingerprints.compute()
                    self._pending.event = self._undo_stream.mark()  # the settle waits for the sums too
            elif self.state in (WeightState.CLEAN, WeightState.OFFLOADED) and verify:
                self._check_clean()
        finally:
            self._context = (None, None)

    def _restore_or_quarantine(self, final: bool = True, overlap: bool = False) -> None:
        """Undo whatever the weights hold; if the undo itself fails, quarantine and raise.
        ``final=False``: only moving between phases (a prefetch for the next phase survives).
        ``overlap``: launch the undo of merged LoRAs on the side stream and leave the DiT
        ``restoring`` until its next user settles it."""
        try:
            self._fire("restore", final=final, overlap=overlap)
            if self._pending is None:
                self._fire("restored" if self._base_resident else "offloaded")
        except BaseException as exc:
            if self.machine.can("quarantine"):
                self._fire("quarantine")
            message = f"restoring the DiT failed ({exc!r}); it is quarantined. " + self._repair_hint()
            if not isinstance(exc, Exception):
                # Ctrl-C and SystemExit stay what they are, so `except Exception` cannot eat them
                exc.add_note(message)
                raise
            raise QuarantinedError(message) from exc

    def _cost_model(self) -> CostModel:
        """The auto policy's cost model (built at first use: it probes the device), free memory now."""
        if self._costs is None:
            self._costs = CostModel.for_targets([t for n in self.specs for t in self._adapters.targets(n)],
                                                self.dynamic_forward)
        self._costs.refresh_headroom()
        return self._costs

    def _settle(self, host: bool = False) -> None:
        """Between requests: an overlapped undo settled; a DiT left mid-undo (no undo pending) is
        quarantined, since nothing vouches for it."""
        self._settle_restore(host)
        if self.state not in REST_STATES and self.state is not WeightState.QUARANTINED and self._pending is None:
            if self.state is WeightState.RESTORING:
                self._fire("quarantine")
            else:
                self._restore_or_quarantine()

    def _settle_restore(self, host: bool = False) -> None:
        """End an overlapped undo: the caller's stream waits for it on the device (``host``: this
        thread too), its deferred verify is read, and the DiT becomes CLEAN (or is quarantined)."""
        pending = self._pending
        if pending is None:
            return
        assert self._undo_stream is not None
        self._undo_stream.join(pending.event, host=host)
        context, self._context = self._context, (pending.request_id, None)
        try:
            if pending.fingerprint is not None:
                self._check_clean(pending.fingerprint)
            if self.state is WeightState.RESTORING:  # kept until here: an interrupt above settles again
                self._fire(pending.settles_to)
        finally:
            self._context = context
            if self.state is not WeightState.RESTORING:
                self._pending = None

    def _check_clean(self, now: Fingerprint | None = None) -> None:
        now = now if now is not None else self._fingerprints.compute()
        differing = self._clean.differing(now)
        stage2 = self._mode.stage2_fingerprint()
        if stage2 is not None:
            differing += [f"stage2:{n}" for n in self._mode.clean_stage2.differing(stage2)]  # type: ignore[attr-defined]
        if differing:
            if self.machine.can("quarantine"):
                self._fire("quarantine")
            raise DirtyWeightsError(differing, len(self._clean))

    # ------------------------------------------------------------------ machine plumbing
    def _fire(self, event: str, **context: Any) -> None:
        source = self.state.value
        request_id, phase = self._context
        start = time.perf_counter()
        try:
            touched = self.machine.fire(event, **context)
        except BaseException as exc:
            self.trace.append(TransitionRecord(event, source, self.state.value,
                                               (time.perf_counter() - start) * 1e3, 0,
                                               request_id, phase, ok=False, error=repr(exc)))
            raise
        self.trace.append(TransitionRecord(event, source, self.state.value,
                                           (time.perf_counter() - start) * 1e3, touched,
                                           request_id, phase))

    def _effect_merge(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self.faults.hit("merge.before")
        ahead = self._ahead
        if ahead is not None:
            written = ahead.complete()
            self._ahead = None  # only once complete: until then a restore abandons it (its hooks removed)
        else:
            written = sum(self._stack.push(name, self._adapters.targets(name), strength)
                          for name, strength in ctx["plan"])
        self.faults.hit("merge.after")
        return written

    def _effect_premerge(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self._ahead = MergeAhead(self._mode.base.module, self._stack, [(n, s, self._adapters.targets(n)) for n, s in
                                 ctx["plan"]], ctx["calls"], self._undo_stream or UndoStream(self._mode.device))
        return 0

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.abandon()  # idempotent: an interrupt here is finished by the resumed restore
            self._ahead = None

    def _effect_attach(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self._adapters.activate(ctx["strengths"])
        return 0

    def _effect_restore(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self._drop_ahead()
        self.faults.hit("restore.before")
        self._adapters.deactivate()
        stream = self._undo_stream if ctx.get("overlap") and self._stack.frames else None
        if stream is not None:
            with stream.running():
                written = self._stack.pop_all(side_stream=True)
                event = stream.mark()
        else:
            written = self._stack.pop_all()
        self._base_resident = self._mode.deactivate(final=ctx.get("final", True))
        self.faults.hit("restore.after")
        if stream is not None:
            self._pending = PendingUndo(event, "restored" if self._base_resident else "offloaded",
                                        self._context[0])
        return written

    def _effect_load(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        self._mode.prepare_base()
        return self._mode.base.nbytes()

    def _effect_repair(self, edge: Edge, ctx: Mapping[str, Any]) -> int:
        if self._undo_stream is not None:
            self._undo_stream.join(host=True)  # a failed overlapped undo may have left work queued
        self._pending = None
        self._drop_ahead()
        self._adapters.deactivate()
        self._mode.reset()
        self._base_resident = True
        written = 0
        if self._clean_source is not None:
            written = self._clean_source.restore(self._weights, self.faults)
        differing = self._clean.differing(self._fingerprints.compute())
        if differing and self._clean_source is None:
            raise RepairError(f"no clean source and {len(differing)} weights differ from clean (e.g. "
                              f"{differing[0]!r}): the manager was built with clean_source=None; reload "
                              "the model from its checkpoint and build a new manager")
        if differing:
            raise RepairError(f"the clean source does not match the clean fingerprint "
                              f"({len(differing)} weights differ, e.g. {differing[0]!r})")
        self._stack.forget()
        return written + self._mode.repair_stage2(self._weights)
