"""LoRA specs, safetensors loading and validation.

Everything here runs before any weight moves: a LoRA that fails validation raises a
:class:`~ltx2_residency.errors.LoRAValidationError` subclass and the model is untouched.
Pickle-based checkpoints are refused without being opened by an unpickler.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .domain import Phase, check_strength, parse_enum
from .errors import (
    ConfigError,
    LoRAFormatError,
    LoRAKeyError,
    LoRAShapeError,
    LoRAValueError,
    StrengthError,
)

_MODULE_DICT = nn.ModuleDict()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
# Prefixes that wrap module names in the files users have: diffusers' pipeline-level
# `transformer.`, PEFT's `base_model.model.`.
_PREFIXES = ("base_model.model.", "transformer.")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha|lora_alpha)$")


def _default_strengths() -> dict[Phase, float]:
    return {Phase.STAGE1: 0.0, Phase.STAGE2: 1.0}


@dataclass(frozen=True)
class LoRASpec:
    """A LoRA to manage: where its tensors come from and how strong it is in each phase.

    ``path`` names a ``.safetensors`` file in PEFT/diffusers key format; ``tensors`` gives the
    same keys in memory instead (converters and tests). Strengths default to the distilled
    LoRA's normal variant: 0 in stage 1, 1.0 in stage 2; a phase missing from a given mapping
    has strength 0.
    """

    name: str
    path: str | os.PathLike[str] | None = None
    strengths: Mapping[Phase | str, float] = field(default_factory=_default_strengths)
    tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(
                f"LoRA name {self.name!r} is not usable as an adapter name; use letters, digits, "
                "'_' or '-', starting with a letter or '_' (e.g. 'distilled')"
            )
        if hasattr(_MODULE_DICT, self.name):
            # PEFT keeps adapters in nn.ModuleDicts keyed by name: a name that is an attribute
            # of ModuleDict ("update", "training", ...) breaks PEFT mid-injection
            raise ConfigError(f"LoRA name {self.name!r} clashes with a torch ModuleDict attribute "
                              "that PEFT relies on; pick another name (e.g. 'user_lora')")
        if (self.path is None) == (self.tensors is None):
            raise ConfigError(f"LoRA {self.name!r}: give exactly one of path= or tensors=")
        if not isinstance(self.strengths, Mapping):
            raise StrengthError(
                f"LoRA {self.name!r}: strengths must be a mapping of phase to strength, e.g. "
                f"{{'stage1': 0.0, 'stage2': 1.0}}; got {self.strengths!r}"
            )
        parsed: dict[Phase, float] = {Phase.STAGE1: 0.0, Phase.STAGE2: 0.0}
        for key, value in dict(self.strengths).items():
            try:
                phase = parse_enum(Phase, key, f"phase in strengths of LoRA {self.name!r}")
            except ConfigError as exc:
                raise StrengthError(str(exc)) from None
            parsed[phase] = check_strength(value, f"LoRA {self.name!r} {phase.value}")
        object.__setattr__(self, "strengths", parsed)

    def strength(self, phase: Phase) -> float:
        return self.strengths[phase]  # type: ignore[index]

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory tensors>"


@dataclass(frozen=True)
class TargetLoRA:
    """The A/B pair for one Linear, and its alpha (``None``: alpha = rank, scale 1)."""

    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass(frozen=True)
class LoadedLoRA:
    spec: LoRASpec
    targets: Mapping[str, TargetLoRA]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return sum(
            t.lora_A.numel() * t.lora_A.element_size() + t.lora_B.numel() * t.lora_B.element_size()
            for t in self.targets.values()
        )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= size - 8


def _looks_like_pickle(head: bytes, suffix: str) -> bool:
    zipped = head[:4] == b"PK\x03\x04"  # torch.save's zip container
    protocol = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return zipped or protocol or suffix in _PICKLE_SUFFIXES


def read_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file; refuse pickles unread, explain unreadable files.

    The content decides, not the name: a valid safetensors header is read whatever the suffix;
    a zip container, a pickle protocol header or a pickle suffix is refused without opening it.
    """
    p = Path(path)
    if not p.exists():
        raise LoRAFormatError(f"{what}: file {str(p)!r} does not exist (resolved against "
                              f"{str(Path.cwd())!r}); check the path or download the LoRA first")
    if not p.is_file():
        inside = sorted(c.name for c in p.glob("*.safetensors"))[:3] if p.is_dir() else []
        hint = (f"pass one of the .safetensors files inside it: {', '.join(inside)}" if inside
                else "pass the path of a .safetensors file")
        raise LoRAFormatError(f"{what}: {str(p)!r} is not a file; {hint}")
    size = p.stat().st_size
    if size == 0:
        raise LoRAFormatError(f"{what}: {str(p)!r} is empty (0 bytes); re-download or re-export it")
    with p.open("rb") as fh:
        head = fh.read(9)
    if not _looks_like_safetensors(head, size) and _looks_like_pickle(head, p.suffix.lower()):
        raise LoRAFormatError(
            f"{what}: {str(p)!r} looks like a pickle checkpoint (torch.save / zip); pickles can run "
            "code when loaded and are refused unread. Convert it to .safetensors "
            "(safetensors.torch.save_file) and pass that file."
        )
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoRAFormatError(
            f"{what}: {str(p)!r} ({size} bytes) is not a readable safetensors file "
            f"(truncated or corrupt?): {exc}. Re-download it, or re-export it with "
            "safetensors.torch.save_file."
        ) from exc


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _linear_of(model: nn.Module, name: str) -> nn.Linear | None:
    """The Linear a key targets; looks through a PEFT wrapper to its base layer."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    base = getattr(module, "base_layer", module)
    return base if isinstance(base, nn.Linear) else None


def validate_lora(spec: LoRASpec, model: nn.Module) -> LoadedLoRA:
    """Load ``spec``'s tensors and check all of them against ``model``; mutate nothing."""
    what = f"LoRA {spec.name!r} ({spec.source})"
    raw = (
        read_safetensors(spec.path, what)
        if spec.path is not None
        else dict(spec.tensors or {})
    )
    if not raw:
        raise LoRAKeyError(f"{what}: holds no tensors; expected keys like "
                           "'transformer_blocks.0.attn1.to_q.lora_A.weight'")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        if not isinstance(tensor, torch.Tensor):
            raise LoRAValueError(f"{what}: key {key!r} holds a {type(tensor).__name__}, not a tensor")
        if key.startswith(("diffusion_model.", "model.diffusion_model.")):
            raise LoRAKeyError(
                f"{what}: key {key!r} is in the original LTX-2 format ('diffusion_model.*'); "
                "convert the file to the diffusers/PEFT format first (diffusers' LTX-2 LoRA "
                "conversion, used by ltx2_pipeline's loader) and pass the converted tensors"
            )
        m = _KEY.match(_strip_prefix(key))
        if m is None:
            raise LoRAKeyError(
                f"{what}: key {key!r} is not a PEFT/diffusers LoRA key; expected "
                "'<module>.lora_A.weight', '<module>.lora_B.weight' or '<module>.alpha' "
                "(optionally prefixed 'transformer.'). For original LTX-2 'diffusion_model.*' "
                "files, convert them with ltx2_pipeline's converter first."
            )
        part = "alpha" if m["part"] in ("alpha", "lora_alpha") else m["part"].split(".")[0]
        group = parts.setdefault(m["module"], {})
        if part in group:
            raise LoRAKeyError(
                f"{what}: module {m['module']!r} has its {part} twice (key {key!r} repeats another "
                "key once prefixes like 'transformer.' are stripped, or gives both alpha and "
                "lora_alpha); keep one"
            )
        group[part] = tensor

    targets: dict[str, TargetLoRA] = {}
    for module_name, group in sorted(parts.items()):
        where = f"{what}, module {module_name!r}"
        for needed in ("lora_A", "lora_B"):
            if needed not in group:
                raise LoRAKeyError(f"{where}: has no {needed} tensor; a LoRA needs both lora_A "
                                   "and lora_B for every module it targets (was the file cut short?)")
        linear = _linear_of(model, module_name)
        if linear is None:
            raise LoRAKeyError(
                f"{where}: no Linear named {module_name!r} in the model; keys must name Linear "
                "modules such as 'transformer_blocks.0.attn1.to_q' (is this a LoRA for another model?)"
            )
        a, b = group["lora_A"], group["lora_B"]
        for label, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise LoRAValueError(f"{where}: {label} has dtype {t.dtype}; LoRA tensors must be "
                                     "floating point (float32, bfloat16 or float16)")
            if t.dim() != 2:
                raise LoRAShapeError(f"{where}: {label} has shape {tuple(t.shape)}; expected a matrix")
        rank = a.shape[0]
        if rank == 0 or b.shape[1] != rank:
            raise LoRAShapeError(
                f"{where}: rank mismatch, lora_A {tuple(a.shape)} (rank first) and lora_B "
                f"{tuple(b.shape)} (rank last) disagree"
            )
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise LoRAShapeError(
                f"{where}: the LoRA maps {a.shape[1]} -> {b.shape[0]} features but the model's "
                f"Linear is {linear.in_features} -> {linear.out_features}; was this LoRA trained "
                "for another model or variant (e.g. LTX-2.3 on LTX-2)?"
            )
        alpha: float | None = None
        if "alpha" in group:
            at = group["alpha"]
            if at.dtype.is_complex or at.dtype == torch.bool:
                raise LoRAValueError(f"{where}: alpha must be a real number, got dtype {at.dtype}")
            if at.numel() != 1:
                raise LoRAShapeError(f"{where}: alpha must be a single number, got shape {tuple(at.shape)}")
            alpha = float(at.reshape(()).item())
            if not (alpha > 0 and alpha < float("inf")):
                raise LoRAValueError(f"{where}: alpha must be a finite positive number, got {alpha}")
        for label, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise LoRAValueError(f"{where}: {label} holds {bad} NaN/Inf values; the file is "
                                     "damaged or the LoRA diverged in training")
        targets[module_name] = TargetLoRA(module_name, a, b, alpha)
    return LoadedLoRA(spec, targets)


def validate_all(specs: list[LoRASpec], model: nn.Module) -> list[LoadedLoRA]:
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"LoRA names must be unique; repeated: {', '.join(dupes)}")
    return [validate_lora(s, model) for s in specs]


def checked_specs(loras: object) -> list[LoRASpec]:
    """The manager's ``loras`` argument as a list of specs, or a :class:`ConfigError`."""
    if isinstance(loras, LoRASpec) or not isinstance(loras, (list, tuple)):
        raise ConfigError(f"loras must be a list of LoRASpec (wrap a single spec in a list: "
                          f"loras=[spec]); got {type(loras).__name__}")
    for s in loras:
        if not isinstance(s, LoRASpec):
            raise ConfigError(f"loras must be LoRASpec objects, got {type(s).__name__}")
    return list(loras)


def resolve_strengths(specs: Mapping[str, LoRASpec], phase: Phase,
                      overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Every managed LoRA's strength in ``phase``: its spec's, or a request's checked override."""
    strengths = {name: spec.strength(phase) for name, spec in specs.items()}
    if overrides is None:
        return strengths
    if not isinstance(overrides, Mapping):
        raise StrengthError(f"strengths must be a mapping of LoRA name to strength, got "
                            f"{type(overrides).__name__}")
    for name, value in overrides.items():
        if name not in strengths:
            known = ", ".join(map(repr, strengths)) or "none"
            raise StrengthError(f"strength override for unknown LoRA {name!r}; managed LoRAs: {known}")
        strengths[name] = check_strength(value, f"override for LoRA {name!r} in {phase.value}")
    return strengths
