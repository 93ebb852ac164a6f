"""The pipeline's own error: bad generation arguments, caught before any work starts."""

from __future__ import annotations


class GenerationInputError(ValueError):
    """A generation argument the two-stage flow cannot take (size, frame count, path, ...).

    Raised before the DiT is touched; the message names the argument, the value and a fix.
    """
