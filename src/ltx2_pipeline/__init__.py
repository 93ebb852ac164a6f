"""ltx2_pipeline: the LTX-2 two-stage flow on diffusers components, weights managed by
ltx2_residency."""

from typing import Any

__all__ = ["TINY_TRANSFORMER_CONFIG", "STGSkippedWarning", "tiny_inputs", "tiny_transformer"]


def __getattr__(name: str) -> Any:
    # loaded on first use: the package itself imports without the pipeline extra (diffusers), so the
    # console scripts can name what to install instead of failing inside this import
    if name == "STGSkippedWarning":
        from .errors import STGSkippedWarning

        return STGSkippedWarning
    if name in __all__:
        from . import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
