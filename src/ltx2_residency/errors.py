"""One exception family for everything the manager refuses or detects.

Every error is a :class:`ResidencyError`, so a serving engine can catch the family with one
``except``; each also derives from the builtin a caller would guess (``ValueError`` for bad
input, ``TimeoutError`` for a lock wait, ``RuntimeError`` for a refused run) so generic code
keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ResidencyError(Exception):
    """Base class of every error raised by ltx2_residency."""


class IllegalTransitionError(ResidencyError, RuntimeError):
    """An event that the residency mode's transition table does not allow from this state."""

    def __init__(self, mode: str, state: str, event: str, legal: Iterable[str]) -> None:
        self.mode = mode
        self.state = state
        self.event = event
        self.legal = tuple(sorted(legal))
        legal_text = ", ".join(self.legal) if self.legal else "none"
        super().__init__(
            f"illegal transition in residency mode {mode!r}: event {event!r} is not allowed "
            f"from state {state!r}; legal events from {state!r}: {legal_text}"
        )


class PhaseOrderError(ResidencyError, RuntimeError):
    """A request entered phases out of order (stage 2 before stage 1, or a phase twice)."""


class ConfigError(ResidencyError, ValueError):
    """A constructor or call argument the manager cannot accept (unknown mode, policy, ...)."""


class OptionError(ConfigError):
    """A manager option or call argument of the wrong type or out of range.

    ``argument`` names it as the caller wrote it (``"strict"``, ``"request(timeout=)"``).
    """

    def __init__(self, message: str, argument: str = "") -> None:
        # a keyword with a default: an exception pickled across processes is rebuilt from its
        # message alone, then its attributes are set back from __dict__
        super().__init__(message)
        self.argument = argument


class StrengthError(ConfigError):
    """A LoRA strength that is not a finite real number, or names an unknown LoRA or phase."""


class LoRAValidationError(ResidencyError, ValueError):
    """A LoRA file or tensor set that cannot be applied to this model.

    Raised before any weight is touched: the model is left exactly as it was.
    """


class LoRAFormatError(LoRAValidationError):
    """The file is missing, not safetensors (pickles are refused unread), or unreadable."""


class LoRAKeyError(LoRAValidationError):
    """Keys that do not name Linear modules of the model, or an incomplete A/B pair."""


class LoRAShapeError(LoRAValidationError):
    """A/B shapes that disagree with each other or with the target Linear."""


class LoRAValueError(LoRAValidationError):
    """Non-finite values, or a dtype that is not floating point."""


class ForwardGuardError(ResidencyError, RuntimeError):
    """The managed DiT was run in a state where running it is illegal."""


class RequestTimeoutError(ResidencyError, TimeoutError):
    """A request waited longer than its timeout for the shared DiT."""


class RequestStateError(ResidencyError, RuntimeError):
    """A request handle used after it closed, from a nested request, or re-entered."""


class QuarantinedError(ResidencyError, RuntimeError):
    """The DiT is quarantined after a failed restore; call ``manager.repair()``."""


class DirtyWeightsError(ResidencyError, RuntimeError):
    """``verify_clean()`` found managed weights whose bits differ from the clean fingerprint."""

    def __init__(self, differing: list[str], total: int) -> None:
        self.differing = differing
        shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
        super().__init__(
            f"{len(differing)} of {total} managed weights differ from clean: {shown}"
        )


class RepairError(ResidencyError, RuntimeError):
    """``repair()`` could not bring the DiT back to clean (no clean source, or it is wrong)."""


class ModeNotAvailableError(ConfigError):
    """A residency mode whose weight mechanics are not available in this manager yet."""


class CompiledModuleError(ConfigError):
    """The wrapper ``torch.compile(module)`` returns, where the module itself is needed (compile it
    in place instead), or a compiled DiT the manager cannot copy as it was compiled."""


class ModelInUseError(ConfigError):
    """The model (or a module of it) already has a live manager: one model, one manager."""


class ManagerClosedError(RequestStateError):
    """The manager was closed: it gave the model back and refuses every further use."""


class LoRANameClashError(ConfigError):
    """``add_lora()`` with the name of a LoRA already registered (remove it first)."""


class UnknownLoRAError(ConfigError):
    """A request or ``remove_lora()`` names a LoRA that is not registered."""


class LoRAChangedError(LoRAValidationError):
    """A LoRA file's content differs from what was registered (its hash was taken at ``add_lora()``)."""


class LoRAFitError(LoRAValidationError):
    """A LoRA the manager cannot hold: it targets layers the manager does not manage, its rank is
    above the LoRA slots' rank, or it is larger than the host LoRA cache."""


class EmbeddingError(ConfigError):
    """A serving engine's pipeline cannot take the manager as given (``integrations.*.install()``):
    it is not the pipeline the adapter is for, or it does not run the manager's DiT."""


class LoRACacheError(ConfigError):
    """A request needs more added LoRAs on the device at once than the device LoRA cache has slots for."""


class CollectiveError(ResidencyError, RuntimeError):
    """The ranks of the manager's process group could not act together (``process_group=``)."""


class PeerFailedError(CollectiveError):
    """Another rank failed or refused a step, and this rank did the same (refused, rolled back or
    quarantined) so that every rank stays in step. ``ranks``: the ranks that failed; ``kind`` and
    ``reason``: the first one's error. Also an instance of that error's class when it is one of
    ``ltx2_residency``'s (``except LoRAValidationError`` catches a peer's refusal on every rank)."""

    def __init__(self, message: str, ranks: list[int] | None = None, kind: str = "", reason: str = "") -> None:
        Exception.__init__(self, message)
        self.ranks = list(ranks or [])
        self.kind = kind
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.ranks, self.kind, self.reason)


class CollectiveTimeoutError(CollectiveError, TimeoutError):
    """Another rank did not answer a step within ``ManagerOptions.collective_timeout``."""


class RankMismatchError(CollectiveError):
    """Ranks that must agree do not: built with other LoRAs or modes, out of step (different manager
    calls), or their replicated weights' fingerprints differ."""
