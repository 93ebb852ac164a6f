"""ltx2_pipeline: the LTX-2 two-stage flow on diffusers components, weights managed by
ltx2_residency."""

from .tiny import TINY_TRANSFORMER_CONFIG, tiny_inputs, tiny_transformer

__all__ = ["TINY_TRANSFORMER_CONFIG", "tiny_inputs", "tiny_transformer"]
