"""LoRA files as users have them, turned into :class:`~ltx2_residency.LoRASpec` objects.

Two key formats are accepted: PEFT/diffusers (``transformer.<module>.lora_A.weight``, what
``ltx2_residency`` reads directly) and the original LTX-2 format (``diffusion_model.*``, as the
Lightricks checkpoints ship), converted with diffusers' own LTX-2 converter
(``LTX2Pipeline.lora_state_dict``). The file is read with ``ltx2_residency``'s safetensors
reader first, so a pickle is refused unread before diffusers sees anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import LTX2Pipeline
from diffusers.utils import logging as dlogging

from ltx2_residency import LoRAKeyError, LoRASpec, StrengthError, read_safetensors
from ltx2_residency import check_strength as _check_finite_strength

#: The distilled LoRA's strengths per variant: (stage 1, stage 2).
VARIANT_STRENGTHS: dict[str, dict[str, float]] = {
    "normal": {"stage1": 0.0, "stage2": 1.0},
    "hq": {"stage1": 0.25, "stage2": 0.5},
}
_ORIGINAL_PREFIX = "diffusion_model."
#: The largest strength a generation takes. LoRAs are trained around 1; far beyond that their
#: update swamps the weights (noise at best, in bf16 an overflow to inf), so such a value is
#: refused as a typo rather than run.
MAX_STRENGTH = 10.0


def check_strength(value: object, where: str) -> float:
    """A LoRA strength a generation takes: a finite real in [0, :data:`MAX_STRENGTH`]
    (:class:`~ltx2_residency.StrengthError` otherwise, naming ``where``)."""
    strength = _check_finite_strength(value, where)
    if strength > MAX_STRENGTH:
        raise StrengthError(f"{where}: strength {value!r} is above {MAX_STRENGTH:g}; a LoRA far beyond the "
                            f"strength it was trained for gives noise or non-finite values: use 0 to "
                            f"{MAX_STRENGTH:g} (1 is the LoRA as trained)")
    return strength


@dataclass(frozen=True)
class FileLoRASpec(LoRASpec):
    """A LoRA read (and converted) from a file: the manager's validation errors name the file."""

    file: str = ""

    @property
    def source(self) -> str:
        return self.file


def key_format(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"original"`` (LTX-2 ``diffusion_model.*`` keys) or ``"diffusers"``."""
    return "original" if any(k.startswith(_ORIGINAL_PREFIX) for k in tensors) else "diffusers"


def to_diffusers_format(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Convert original-format keys with diffusers' LTX-2 converter; diffusers keys pass through.

    Only DiT keys can be managed: a LoRA that also adapts the text connectors is refused with a
    typed error rather than silently applied in part.
    """
    state = dict(tensors)
    if key_format(state) == "original":
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            state = LTX2Pipeline.lora_state_dict(state)
        finally:
            dlogging.set_verbosity(verbosity)
    connectors = sorted(k for k in state if k.startswith("connectors.") or k.startswith("text_embedding_projection."))
    if connectors:
        raise LoRAKeyError(
            f"{what}: {len(connectors)} keys adapt the text connectors (e.g. {connectors[0]!r}); the residency "
            "manager applies LoRAs to the DiT only. Drop those keys or merge them into the connectors offline."
        )
    return state


def load_lora(path: str | os.PathLike[str], name: str, strengths: Mapping[str, float]) -> LoRASpec:
    """A :class:`LoRASpec` from a safetensors file in either key format; every error it raises,
    here or when the manager validates it against the DiT, names the file."""
    what = f"LoRA {name!r} ({os.fspath(path)})"
    tensors = read_safetensors(path, what)
    return FileLoRASpec(name=name, tensors=to_diffusers_format(tensors, what), strengths=dict(strengths),
                        file=os.fspath(path))


def to_original_format(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys back to the LTX-2 ``diffusion_model.*`` layout (tests, exports).

    For the block linears LoRAs target only the prefix differs between the two layouts
    (diffusers' renames touch the patchify projections, AdaLN and the q/k norms); the result is
    checked by running diffusers' converter on it.
    """
    out = {}
    for key, value in tensors.items():
        bare = key.removeprefix("transformer.")
        out[_ORIGINAL_PREFIX + bare] = value
    if to_diffusers_format(out, "round trip").keys() != {f"transformer.{k.removeprefix('transformer.')}"
                                                          for k in tensors}:
        raise LoRAKeyError("these keys do not survive diffusers' LTX-2 conversion unchanged")
    return out
