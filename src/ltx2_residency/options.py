"""The manager's options, checked before anything is built: a typed error naming the argument,
the model untouched.

:class:`ManagerOptions` is one frozen dataclass of everything that tunes a manager (timeouts, the
exact-merge kernel, the side-stream undo, the dynamic forward, ...); it checks and normalises its
fields when it is built. The model, the mode, the LoRAs and the merge policy are the manager's own
arguments, checked by :func:`checked_arguments`. Values are taken for what they are, never for
their truthiness: ``strict="no"`` is refused, not read as ``True``. :func:`checked_timeout` checks
the per-call ``timeout=`` of ``request()``, ``verify_clean()``, ``repair()`` and ``synchronize()``.

Timeouts: ``None`` waits without limit, and so does ``math.inf`` (or any wait of at least
``threading.TIMEOUT_MAX``, the longest a lock can wait): both are normalised to ``None``.
NaN, negative values, bools and non-numbers are refused.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .domain import MergePolicyName, ResidencyMode, parse_enum, shown
from .errors import ConfigError, OptionError
from .faults import FaultInjector
from .lora import LoRASpec
from .ops.exact import EXACT_KERNELS
from .ops.forward import forward_named

Verify = Literal["always", "after_merge", "never"]
VERIFY_SETTINGS = ("always", "after_merge", "never")
AUTO: Literal["auto"] = "auto"
_GIB = 2**30


@dataclass(frozen=True)
class ManagerOptions:
    """How a :class:`~ltx2_residency.ResidencyManager` runs; checked and normalised when built
    (:class:`OptionError` naming the field). Change one with ``dataclasses.replace``.

    Args:
        native_ltx23: the model is the native LTX-2.3 variant (the sglang policy merges then).
        exact_kernel: the kernel that merges a LoRA into the weights and undoes it bit for bit:
            ``"auto"`` (``"fused"`` for bf16 weights on a CUDA device with Triton, else
            ``"recompute"``), ``"fused"`` (Triton, one launch per LoRA), ``"recompute"`` (least
            memory, pure torch), ``"copy"`` (a same-device copy) or ``"copy_host"``.
        check_layers: also check every undone layer against its pre-merge digest.
        strict: the forward guard also refuses runs outside a request's phase.
        verify: fingerprint the DiT when a request ends: ``"after_merge"``, ``"always"`` or ``"never"``.
        clean_source: ``"host_copy"`` keeps a host copy of the managed weights for ``repair()``;
            ``None`` keeps none.
        request_timeout: seconds a request waits for the DiT (``None`` or ``inf``: forever).
        trace_maxlen: transitions kept in ``manager.trace``.
        faults: a :class:`~ltx2_residency.FaultInjector` for tests and drills.
        low_vram: snapshot mode: evict the base before prefetching stage 2 (``None``: below 130 GiB).
        activation_reserve_gib: ``mode="auto"`` keeps this much device memory for activations.
        overlap_restore: undo merged LoRAs on a side stream when a request ends (``None``: with the
            ``fused`` kernel on a CUDA device); the DiT stays ``undo_pending`` until its next user.
        dynamic_forward: dynamic phases run ``"fused"`` (our forward over PEFT's adapter tensors) or
            ``"peft"`` (PEFT's own forward).
        lora_slot_rank: the largest rank of a LoRA added with ``add_lora()``: the rank of the LoRA
            slots that hold added LoRAs on the device.
        device_lora_cache_bytes: device bytes for LoRA slots (``None``: two slots); a request runs at
            most this many added LoRAs at once.
        host_lora_cache_bytes: host bytes for added LoRAs' copies (pinned where there is a GPU);
            beyond it the least recently used are read from disk again when needed.
        collective_timeout: with ``process_group=``, seconds a rank waits for the others at each
            step before a ``CollectiveTimeoutError`` (``None`` or ``inf``: forever).
    """

    native_ltx23: bool = False
    exact_kernel: str = AUTO
    check_layers: bool = False
    strict: bool = True
    verify: Verify = "after_merge"
    clean_source: Literal["host_copy"] | None = "host_copy"
    request_timeout: float | None = 300.0
    trace_maxlen: int = 10_000
    faults: FaultInjector | None = None
    low_vram: bool | None = None
    activation_reserve_gib: float = 16.0
    overlap_restore: bool | None = None
    dynamic_forward: str = "fused"
    lora_slot_rank: int = 128
    device_lora_cache_bytes: int | None = None
    host_lora_cache_bytes: int = 8 * _GIB
    collective_timeout: float | None = 300.0

    def __post_init__(self) -> None:
        checked = {
            "native_ltx23": _flag(self.native_ltx23, "native_ltx23"),
            "exact_kernel": _choice(self.exact_kernel, "exact_kernel", "exact-merge kernel", (AUTO, *EXACT_KERNELS)),
            "check_layers": _flag(self.check_layers, "check_layers"),
            "strict": _flag(self.strict, "strict"),
            "verify": _choice(self.verify, "verify", "verify setting", VERIFY_SETTINGS),
            "clean_source": None if self.clean_source is None else _choice(
                self.clean_source, "clean_source", "clean_source", ("host_copy",), none_ok=True),
            "request_timeout": _seconds(self.request_timeout, "request_timeout", zero_ok=False),
            "trace_maxlen": _count(self.trace_maxlen, "trace_maxlen"),
            "faults": _faults(self.faults),
            "low_vram": _flag(self.low_vram, "low_vram", none_ok=True),
            "activation_reserve_gib": _gib(self.activation_reserve_gib, "activation_reserve_gib"),
            "overlap_restore": _flag(self.overlap_restore, "overlap_restore", none_ok=True),
            "dynamic_forward": _dynamic_forward(self.dynamic_forward),
            "lora_slot_rank": _count(self.lora_slot_rank, "lora_slot_rank"),
            "device_lora_cache_bytes": None if self.device_lora_cache_bytes is None else _bytes(
                self.device_lora_cache_bytes, "device_lora_cache_bytes"),
            "host_lora_cache_bytes": _bytes(self.host_lora_cache_bytes, "host_lora_cache_bytes"),
            "collective_timeout": _seconds(self.collective_timeout, "collective_timeout", zero_ok=False),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)


#: keywords ``ResidencyManager`` took before :class:`ManagerOptions` (0.1), by option field
LEGACY_KEYWORDS: Mapping[str, str] = {
    **{f.name: f.name for f in dataclasses.fields(ManagerOptions)},
    "restore": "exact_kernel",
}


def with_legacy_keywords(options: object, keywords: Mapping[str, Any]) -> ManagerOptions:
    """``options`` with the 0.1 keywords of ``ResidencyManager(...)`` applied on top (deprecated)."""
    if options is None:
        options = ManagerOptions()
    if not isinstance(options, ManagerOptions):
        raise OptionError(f"options must be a ManagerOptions, got {type(options).__name__}; build one with "
                          "ltx2_residency.ManagerOptions(...)", "options")
    unknown = sorted(set(keywords) - set(LEGACY_KEYWORDS))
    if unknown:
        raise OptionError(f"ResidencyManager got an unknown argument {unknown[0]!r}; the options are the fields "
                          f"of ManagerOptions: {', '.join(LEGACY_KEYWORDS)}", unknown[0])
    if not keywords:
        return options
    if "restore" in keywords and "exact_kernel" in keywords:
        raise OptionError("restore= is the old name of exact_kernel=; pass only exact_kernel", "restore")
    fields = {LEGACY_KEYWORDS[k]: v for k, v in keywords.items()}
    warnings.warn(f"ResidencyManager({', '.join(f'{k}=' for k in keywords)}) is deprecated; pass "
                  f"options=ManagerOptions({', '.join(f'{f}=...' for f in fields)})", DeprecationWarning,
                  stacklevel=3)
    return dataclasses.replace(options, **fields)


def checked_arguments(mode: object, loras: object, merge_policy: object
                      ) -> tuple[ResidencyMode | Literal["auto"], tuple[LoRASpec, ...], MergePolicyName]:
    """The manager's own arguments checked: ``mode`` (a :class:`ResidencyMode` or ``"auto"``),
    ``loras`` (unique :class:`LoRASpec` objects), ``merge_policy``."""
    return _mode(mode), _loras(loras), _merge_policy(merge_policy)


def checked_timeout(value: object, what: str) -> float | None:
    """A per-call ``timeout=`` in seconds: ``None`` (or ``math.inf``) waits without limit, ``0``
    takes the DiT only if it is free now. ``what`` names the argument, e.g. ``"request(timeout=)"``."""
    return _seconds(value, what, zero_ok=True)


# ----------------------------------------------------------------------------- one check per kind
def _kind(value: object) -> str:
    return type(value).__name__


def _flag(value: object, argument: str, *, none_ok: bool = False) -> Any:
    if isinstance(value, bool) or (none_ok and value is None):
        return value  # type: ignore[return-value]
    allowed = "True, False or None (auto)" if none_ok else "True or False"
    raise OptionError(f"{argument} must be {allowed}, got {shown(value)} (type {_kind(value)}); strings and "
                      f"numbers are not read as flags: pass {argument}=True or {argument}=False", argument)


def _choice(value: object, argument: str, what: str, choices: Sequence[str], *, none_ok: bool = False) -> Any:
    name = value.strip().lower() if isinstance(value, str) else value
    if isinstance(name, str) and name in choices:
        return name
    expected = ", ".join(map(repr, choices)) + (" or None" if none_ok else "")
    raise OptionError(f"{argument}: unknown {what} {shown(value)}; expected one of {expected}", argument)


def _mode(value: object) -> ResidencyMode | Literal["auto"]:
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            return parse_enum(ResidencyMode, value, "residency mode")
        except ConfigError:
            pass
    choices = ", ".join(repr(m.value) for m in ResidencyMode)
    raise OptionError(f"mode: unknown residency mode {shown(value)}; expected one of {choices} or 'auto'", "mode")


def _merge_policy(value: object) -> MergePolicyName:
    try:
        return parse_enum(MergePolicyName, value, "merge policy")
    except ConfigError as exc:
        raise OptionError(f"merge_policy: {exc}", "merge_policy") from None


def _dynamic_forward(value: object) -> str:
    try:
        return forward_named(value)
    except ConfigError as exc:
        raise OptionError(f"dynamic_forward: {exc}", "dynamic_forward") from None


def _loras(value: object) -> tuple[LoRASpec, ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
        raise OptionError(f"loras must be a list of LoRASpec (wrap a single spec in a list: loras=[spec]); "
                          f"got {_kind(value)}", "loras")
    specs = tuple(value)
    for spec in specs:
        if not isinstance(spec, LoRASpec):
            raise OptionError(f"loras must be LoRASpec objects, got {_kind(spec)} ({shown(spec)}); build each "
                              "with LoRASpec(name=..., path=...)", "loras")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise OptionError(f"loras: LoRA names must be unique; repeated: {', '.join(dupes)}", "loras")
    return specs


def _faults(value: object) -> FaultInjector | None:
    if value is None or isinstance(value, FaultInjector):
        return value
    raise OptionError(f"faults must be a FaultInjector or None, got {_kind(value)}; build one with "
                      "ltx2_residency.faults.FaultInjector()", "faults")


def _real(value: object, argument: str, expected: str) -> float:
    """``value`` as a float (an int beyond float range becomes +-inf), or an OptionError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{argument} must be {expected}, got {shown(value)} (type {_kind(value)})", argument)
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _seconds(value: object, argument: str, *, zero_ok: bool) -> float | None:
    expected = ("seconds >= 0 or None" if zero_ok else "positive seconds or None") + " (None: no limit)"
    if value is None:
        return None
    seconds = _real(value, argument, expected)
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        raise OptionError(f"{argument} must be {expected}, got {shown(value)}", argument)
    # a longer wait than any lock can do (inf included) is no limit at all
    return None if seconds >= threading.TIMEOUT_MAX else seconds


def _count(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= sys.maxsize:
        raise OptionError(f"{argument} must be a whole number from 1 to {sys.maxsize}, got {shown(value)} "
                          f"(type {_kind(value)})", argument)
    return int(value)


def _bytes(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= sys.maxsize:
        raise OptionError(f"{argument} must be a whole number of bytes from 0 to {sys.maxsize} (None for the "
                          f"default where allowed), got {shown(value)} (type {_kind(value)})", argument)
    return int(value)


def _gib(value: object, argument: str) -> float:
    expected = "a finite number of GiB >= 0"
    gib = _real(value, argument, expected)
    if not (gib >= 0 and math.isfinite(gib * _GIB)):
        raise OptionError(f"{argument} must be {expected}, got {shown(value)}", argument)
    return gib
