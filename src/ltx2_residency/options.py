"""The manager's scalar options, checked before anything is built (a typed error, the model untouched)."""

from __future__ import annotations

from typing import Literal

from .errors import ConfigError
from .ops.forward import forward_named
from .ops.merge import RESTORE_STRATEGIES

Verify = Literal["always", "after_merge", "never"]
VERIFY_SETTINGS = ("always", "after_merge", "never")


def checked_options(*, restore: object, verify: object, clean_source: object, request_timeout: object,
                    overlap_restore: object, dynamic_forward: object) -> tuple[str, Verify, str]:
    """Normalised ``(restore, verify, dynamic_forward)``; raises :class:`ConfigError` on any bad value."""
    restore = restore.strip().lower() if isinstance(restore, str) else restore
    verify = verify.strip().lower() if isinstance(verify, str) else verify
    if restore not in RESTORE_STRATEGIES and restore != "auto":
        raise ConfigError(f"unknown restore strategy {restore!r}; expected 'auto' or one of "
                          f"{', '.join(map(repr, RESTORE_STRATEGIES))}")
    if verify not in VERIFY_SETTINGS:
        raise ConfigError(f"unknown verify setting {verify!r}; expected one of {VERIFY_SETTINGS}")
    if clean_source not in ("host_copy", None):
        raise ConfigError(f"unknown clean_source {clean_source!r}; expected 'host_copy' or None")
    if request_timeout is not None and (
        isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float))
        or not request_timeout > 0
    ):
        raise ConfigError(f"request_timeout must be positive seconds or None, got {request_timeout!r}")
    if overlap_restore not in (None, True, False):
        raise ConfigError(f"overlap_restore must be True, False or None (auto), got {overlap_restore!r}")
    return restore, verify, forward_named(dynamic_forward)  # type: ignore[return-value]
