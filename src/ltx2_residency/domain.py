"""The vocabulary of the domain: phases, weight states, residency modes, how a LoRA is applied.

Every enum is a ``str`` enum so its members compare equal to, and parse from, their values:
``Phase("stage1") is Phase.STAGE1`` and ``WeightState.CLEAN == "clean"``.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

from .errors import ConfigError, StrengthError


class Phase(str, Enum):
    """A denoising phase of the LTX-2 two-stage pipeline."""

    STAGE1 = "stage1"
    STAGE2 = "stage2"


class WeightState(str, Enum):
    """What the managed DiT's weights are right now. Stored, never inferred from tensors."""

    CLEAN = "clean"
    MERGING_AHEAD = "merging_ahead"  # stage 1's last calls run while stage 2's merge starts behind them
    PREMERGING = "merging_ahead"  # deprecated 0.1 name of MERGING_AHEAD (the same member), removed in 0.3
    MERGING = "merging"
    STAGE1_MERGED = "stage1_merged"
    STAGE2_MERGED = "stage2_merged"
    ATTACHING = "attaching"
    STAGE1_DYNAMIC = "stage1_dynamic"
    STAGE2_DYNAMIC = "stage2_dynamic"
    RESTORING = "restoring"
    UNDO_PENDING = "undo_pending"  # the exact undo runs on a side stream; the DiT's next user settles it
    OFFLOADED = "offloaded"
    PREFETCHING = "prefetching"
    QUARANTINED = "quarantined"


class Residency(str, Enum):
    """Where one DiT's weights are. Stored per DiT, never inferred from ``param.device``."""

    RESIDENT = "resident"  # on the compute device, ready to run
    OFFLOADED = "offloaded"  # bound to the pinned host snapshot; the device copy is freed
    PREFETCHING = "prefetching"  # a host-to-device copy is in flight on the side stream


class ResidencyMode(str, Enum):
    """How a serving engine holds the DiT (see docs/architecture.md)."""

    ORIGINAL = "original"
    SNAPSHOT = "snapshot"
    RESIDENT = "resident"


class ApplyKind(str, Enum):
    """How a phase's LoRAs reach the forward pass."""

    NONE = "none"  # every strength is zero: run the base weights
    DYNAMIC = "dynamic"  # PEFT adapters add B(A(x)) at run time; weights untouched
    MERGED = "merged"  # W += s * B @ A in place, undone exactly afterwards


class MergePolicyName(str, Enum):
    SGLANG = "sglang"
    DYNAMIC = "dynamic"
    MERGE = "merge"
    AUTO = "auto"


E = TypeVar("E", bound=Enum)


def parse_enum(kind: type[E], value: object, what: str) -> E:
    """Accept an enum member or its string value; anything else is a ConfigError naming the choices."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(repr(m.value) for m in kind)  # type: ignore[attr-defined]
    raise ConfigError(f"unknown {what}: {shown(value)}; expected one of {choices}")


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about arbitrary input: an
    integer of thousands of digits has no repr (Python refuses the conversion), a path of
    thousands of characters would bury the message."""
    try:
        text = repr(value)
    except Exception:  # a failing __repr__ of user input must not hide the real error
        text = (f"an integer of {value.bit_length()} bits" if isinstance(value, int)
                else f"a {type(value).__name__}")
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def check_strength(value: object, where: str) -> float:
    """A strength must be a finite, non-negative real number (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StrengthError(f"{where}: strength must be a real number, got {shown(value)}")
    try:
        strength = float(value)
    except OverflowError:  # an int beyond float range: as infinite as float('inf')
        strength = math.inf
    if not math.isfinite(strength):
        raise StrengthError(f"{where}: strength must be finite, got {shown(value)}")
    if strength < 0:
        raise StrengthError(
            f"{where}: strength must be >= 0, got {shown(value)} (to subtract a LoRA, train one that does)"
        )
    return strength
