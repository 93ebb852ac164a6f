"""The manager's options, checked before anything is built: a typed error naming the argument,
the model untouched.

:func:`manager_options` takes every keyword of ``ResidencyManager(...)`` (the transformer aside)
and returns them normalised in one frozen :class:`ManagerOptions`. Values are taken for what they
are, never for their truthiness: ``strict="no"`` is refused, not read as ``True``.
:func:`checked_timeout` checks the per-call ``timeout=`` of ``request()``, ``verify_clean()``,
``repair()`` and ``synchronize()``.

Timeouts: ``None`` waits without limit, and so does ``math.inf`` (or any wait of at least
``threading.TIMEOUT_MAX``, the longest a lock can wait): both are normalised to ``None``.
NaN, negative values, bools and non-numbers are refused.
"""

from __future__ import annotations

import math
import numbers
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .domain import MergePolicyName, ResidencyMode, parse_enum, shown
from .errors import ConfigError, OptionError
from .faults import FaultInjector
from .lora import LoRASpec
from .ops.forward import forward_named
from .ops.merge import RESTORE_STRATEGIES

Verify = Literal["always", "after_merge", "never"]
VERIFY_SETTINGS = ("always", "after_merge", "never")
AUTO: Literal["auto"] = "auto"
_GIB = 2**30


@dataclass(frozen=True)
class ManagerOptions:
    """``ResidencyManager``'s keywords, checked and normalised; fields are named after them.

    ``mode`` is a :class:`ResidencyMode` or ``"auto"`` (resolved when the device is known);
    ``request_timeout`` is ``None`` for no limit.
    """

    mode: ResidencyMode | Literal["auto"] = ResidencyMode.ORIGINAL
    loras: tuple[LoRASpec, ...] = ()
    merge_policy: MergePolicyName = MergePolicyName.SGLANG
    native_ltx23: bool = False
    restore: str = "auto"
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

    @property
    def auto(self) -> bool:
        """``mode="auto"``: the manager picks resident or original from the device's memory."""
        return self.mode == AUTO


_DEFAULTS = ManagerOptions()


def manager_options(
    *,
    mode: object = _DEFAULTS.mode,
    loras: object = _DEFAULTS.loras,
    merge_policy: object = _DEFAULTS.merge_policy.value,
    native_ltx23: object = _DEFAULTS.native_ltx23,
    restore: object = _DEFAULTS.restore,
    check_layers: object = _DEFAULTS.check_layers,
    strict: object = _DEFAULTS.strict,
    verify: object = _DEFAULTS.verify,
    clean_source: object = _DEFAULTS.clean_source,
    request_timeout: object = _DEFAULTS.request_timeout,
    trace_maxlen: object = _DEFAULTS.trace_maxlen,
    faults: object = _DEFAULTS.faults,
    low_vram: object = _DEFAULTS.low_vram,
    activation_reserve_gib: object = _DEFAULTS.activation_reserve_gib,
    overlap_restore: object = _DEFAULTS.overlap_restore,
    dynamic_forward: object = _DEFAULTS.dynamic_forward,
) -> ManagerOptions:
    """Every ``ResidencyManager`` keyword checked; raises :class:`OptionError` (a ``ConfigError``)
    naming the first bad one. Reads no file and touches no tensor."""
    return ManagerOptions(
        mode=_mode(mode),
        loras=_loras(loras),
        merge_policy=_merge_policy(merge_policy),
        native_ltx23=_flag(native_ltx23, "native_ltx23"),
        restore=_choice(restore, "restore", "restore strategy", (AUTO, *RESTORE_STRATEGIES)),
        check_layers=_flag(check_layers, "check_layers"),
        strict=_flag(strict, "strict"),
        verify=_choice(verify, "verify", "verify setting", VERIFY_SETTINGS),  # type: ignore[arg-type]
        clean_source=None if clean_source is None else _choice(  # type: ignore[arg-type]
            clean_source, "clean_source", "clean_source", ("host_copy",), none_ok=True),
        request_timeout=_seconds(request_timeout, "request_timeout", zero_ok=False),
        trace_maxlen=_count(trace_maxlen, "trace_maxlen"),
        faults=_faults(faults),
        low_vram=_flag(low_vram, "low_vram", none_ok=True),
        activation_reserve_gib=_gib(activation_reserve_gib, "activation_reserve_gib"),
        overlap_restore=_flag(overlap_restore, "overlap_restore", none_ok=True),
        dynamic_forward=_dynamic_forward(dynamic_forward),
    )


def checked_timeout(value: object, what: str) -> float | None:
    """A per-call ``timeout=`` in seconds: ``None`` (or ``math.inf``) waits without limit, ``0``
    takes the DiT only if it is free now. ``what`` names the argument, e.g. ``"request(timeout=)"``."""
    return _seconds(value, what, zero_ok=True)


# ----------------------------------------------------------------------------- one check per kind
def _kind(value: object) -> str:
    return type(value).__name__


def _flag(value: object, argument: str, *, none_ok: bool = False) -> bool:
    if isinstance(value, bool) or (none_ok and value is None):
        return value  # type: ignore[return-value]
    allowed = "True, False or None (auto)" if none_ok else "True or False"
    raise OptionError(f"{argument} must be {allowed}, got {shown(value)} (type {_kind(value)}); strings and "
                      f"numbers are not read as flags: pass {argument}=True or {argument}=False", argument)


def _choice(value: object, argument: str, what: str, choices: Sequence[str], *, none_ok: bool = False) -> str:
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


def _gib(value: object, argument: str) -> float:
    expected = "a finite number of GiB >= 0"
    gib = _real(value, argument, expected)
    if not (gib >= 0 and math.isfinite(gib * _GIB)):
        raise OptionError(f"{argument} must be {expected}, got {shown(value)}", argument)
    return gib
