"""The pipeline's own errors: bad generation arguments (caught before any work starts), a
machine too small for what was asked, and a stage whose output is not finite; and its warning
that stage 1 skipped an STG pass the DiT could not perturb."""

from __future__ import annotations

from typing import Any

from ltx2_residency import ResidencyError


class GenerationInputError(ValueError):
    """A generation argument the two-stage flow cannot take (size, frame count, path, ...).

    Raised before the DiT is touched; the message names the argument, the value and a fix.
    """


class InsufficientMemoryError(GenerationInputError):
    """The device (or the host, for a CPU run) has less memory than the command needs.

    Raised before anything is built: the message gives what is needed and what is available.
    """


class NonFiniteOutputError(ResidencyError, RuntimeError):
    """A stage produced NaN or infinite values.

    Raised by the stage that made them, so no later stage runs on them; the shared DiT is back
    to clean as after any failed request. ``stage`` names the stage; ``report`` is the
    generation report up to the failure (stage times, the transition trace, the failure under
    ``"error"``), for the caller to keep.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.report: dict[str, Any] | None = None


class STGSkippedWarning(UserWarning):
    """Stage 1 was asked for spatio-temporal guidance (STG) on a DiT that cannot perturb.

    A DiT built with ``perturbed_attn=False`` (LTX-2.0's configuration) ignores the STG blocks, so
    the STG pass would only compute the conditional prediction again: the pipeline skips it (one
    DiT call less per stage-1 step) and warns once. STG runs on a DiT built with
    ``perturbed_attn=True`` (LTX-2.3's configuration).
    """
