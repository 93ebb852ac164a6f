"""LoRA specs, safetensors loading and validation.

Everything here runs before any weight moves: a LoRA that fails validation raises a
:class:`~ltx2_residency.errors.LoRAValidationError` subclass and the model is untouched.
Pickle-based checkpoints are refused without being opened by an unpickler.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .domain import Phase, check_strength, parse_enum, shown
from .errors import (
    ConfigError,
    LoRAFormatError,
    LoRAKeyError,
    LoRAShapeError,
    LoRAValueError,
    StrengthError,
)
from .linears import is_linear, tensor_parallel_size

_MODULE_DICT = nn.ModuleDict()
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
# Prefixes that wrap module names in the files users have: diffusers' pipeline-level
# `transformer.`, PEFT's `base_model.model.`.
_PREFIXES = ("base_model.model.", "transformer.")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha|lora_alpha)$")


def _fspath(path: object) -> str | bytes | None:
    try:
        return os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        return None


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
        if self.path is not None and not isinstance(_fspath(self.path), str):
            raise ConfigError(f"LoRA {self.name!r}: path must be a str or a pathlib.Path, got "
                              f"{type(self.path).__name__} ({shown(self.path)}); decode a bytes path with "
                              "os.fsdecode(path)")
        if self.tensors is not None and not isinstance(self.tensors, Mapping):
            raise ConfigError(f"LoRA {self.name!r}: tensors must be a mapping of key to tensor (e.g. what "
                              f"safetensors.torch.load_file returns), got {type(self.tensors).__name__}")
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


#: safetensors' dtype names, for those this torch build has.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("I64", "int64"), ("I32", "int32"),
        ("I16", "int16"), ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
        ("U8", "uint8"), ("BOOL", "bool"), ("C64", "complex64"),
    ) if hasattr(torch, attr)
}
#: What a LoRA factor may hold, and what a target weight must hold: the dtypes the adapters and the
#: merge compute in.
FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER_LIMIT = 100_000_000  # safetensors' own cap on the JSON header


class _Corrupt(Exception):
    """A header that is not a well-formed safetensors header (reworded for the user by the caller)."""


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


class SafetensorsFile:
    """An open safetensors file: its header parsed with plain reads, tensor data read only when asked,
    into memory the caller then owns (never mapped: a file rewritten or truncated later cannot change
    or crash what was read)."""

    def __init__(self, fh: BinaryIO, path: Path, size: int, what: str) -> None:
        self._fh = fh
        self.path = path
        self.size = size
        self.what = what
        try:
            self.entries = self._parse()
        except _Corrupt as exc:
            raise self._unreadable(str(exc)) from None

    def _unreadable(self, reason: str) -> LoRAFormatError:
        return LoRAFormatError(
            f"{self.what}: {str(self.path)!r} ({self.size} bytes) is not a readable safetensors file "
            f"(truncated or corrupt?): {reason}. Re-download it, or re-export it with "
            "safetensors.torch.save_file."
        )

    def _parse(self) -> dict[str, _Entry]:
        """The checks safetensors makes when it opens a file (and the data's extent against the file's
        size): an entry the rest of the code trusts cannot point outside the file."""
        prefix = self._fh.read(8)
        if len(prefix) < 8:
            raise _Corrupt("shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(_HEADER_LIMIT, self.size - 8):
            raise _Corrupt(f"header length {length} runs past the end of the file or over "
                           f"{_HEADER_LIMIT} bytes")
        raw = self._fh.read(length)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Corrupt(f"header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise _Corrupt("header is not a JSON object")
        start, data = 8 + length, self.size - 8 - length
        entries: dict[str, _Entry] = {}
        spans = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise _Corrupt(f"entry {key!r} lacks dtype, shape or data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise _Corrupt(f"entry {key!r} has shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1] <= data):
                raise _Corrupt(f"entry {key!r} has data_offsets {offsets!r} outside the {data} data bytes")
            if dtype not in _DTYPES:
                known = ", ".join(_DTYPES)
                raise LoRAValueError(f"{self.what}: key {key!r} holds dtype {dtype!r}, which this reader does "
                                     f"not know ({known}); LoRA tensors must be floating point (float32, "
                                     "bfloat16, float16 or float64): convert the file")
            torch_dtype = _DTYPES[dtype]
            nbytes = math.prod(shape) * torch_dtype.itemsize
            if offsets[1] - offsets[0] != nbytes:
                raise _Corrupt(f"entry {key!r} spans {offsets[1] - offsets[0]} bytes, its shape {shape} of "
                               f"{dtype} needs {nbytes}")
            spans.append((offsets[0], offsets[1]))
            entries[key] = _Entry(torch_dtype, tuple(shape), start + offsets[0], nbytes)
        covered = 0
        for begin, end in sorted(spans):
            if begin != covered:
                raise _Corrupt("tensor data overlaps or leaves gaps (data_offsets do not tile the data)")
            covered = end
        if covered != data:
            raise _Corrupt(f"the header describes {covered} data bytes, the file holds {data}")
        return entries

    def placeholders(self) -> dict[str, torch.Tensor]:
        """Every tensor's dtype and shape as a meta tensor: what structural checks look at, no data read."""
        return {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.entries.items()}

    def read(self, key: str) -> torch.Tensor:
        """``key``'s tensor in fresh host memory."""
        entry = self.entries[key]
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=entry.dtype)
        buffer = bytearray(entry.nbytes)
        view = memoryview(buffer)
        self._fh.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            n = self._fh.readinto(view[done:])
            if not n:
                raise self._unreadable(f"the file ended inside {key!r}; was it changed while being read?")
            done += n
        # the tensor keeps the bytearray alive: no copy, and nothing else refers to it
        return torch.frombuffer(buffer, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike[str], what: str) -> Iterator[SafetensorsFile]:
    """Open and check a safetensors file; refuse pickles unread, explain unreadable files.

    The content decides, not the name: a valid safetensors header is read whatever the suffix;
    a zip container, a pickle protocol header or a pickle suffix is refused without opening it.
    """
    p = Path(path)
    try:
        exists, is_file = p.exists(), p.is_file()
        if not exists:
            raise LoRAFormatError(f"{what}: file {str(p)!r} does not exist (resolved against "
                                  f"{str(Path.cwd())!r}); check the path or download the LoRA first")
        if not is_file:
            inside = sorted(c.name for c in p.glob("*.safetensors"))[:3] if p.is_dir() else []
            hint = (f"pass one of the .safetensors files inside it: {', '.join(inside)}" if inside
                    else "pass the path of a .safetensors file")
            raise LoRAFormatError(f"{what}: {str(p)!r} is not a file; {hint}")
        with p.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size  # of the file opened, whatever the path names later
            if size == 0:
                raise LoRAFormatError(f"{what}: {str(p)!r} is empty (0 bytes); re-download or re-export it")
            head = fh.read(9)
            if not _looks_like_safetensors(head, size) and _looks_like_pickle(head, p.suffix.lower()):
                raise LoRAFormatError(
                    f"{what}: {str(p)!r} looks like a pickle checkpoint (torch.save / zip); pickles can run "
                    "code when loaded and are refused unread. Convert it to .safetensors "
                    "(safetensors.torch.save_file) and pass that file."
                )
            fh.seek(0)
            yield SafetensorsFile(fh, p, size, what)
    except OSError as exc:
        # a name too long for the file system, a permission, an I/O error
        raise LoRAFormatError(f"{what}: cannot read {shown(str(p), 200)}: {exc.strerror or exc}; check the "
                              "path and the file's permissions") from None


def read_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in fresh host memory (see :func:`open_safetensors`)."""
    with open_safetensors(path, what) as f:
        return {k: f.read(k) for k in f.entries}


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _linear_of(model: nn.Module, name: str) -> nn.Module | None:
    """The module a key targets; looks through a PEFT wrapper to its base layer."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    # through PEFT's wrappers only: an engine's own LoRA wrapper (sglang's) has its own weight logic
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return base if isinstance(base, nn.Linear) or is_linear(base) else None


def _check_factor(where: str, label: str, t: torch.Tensor) -> None:
    if not t.is_floating_point() or t.dtype not in FACTOR_DTYPES:
        raise LoRAValueError(f"{where}: {label} has dtype {t.dtype}; LoRA tensors must be floating point "
                             "(float32, bfloat16, float16 or float64); convert it, e.g. with "
                             "tensor.to(torch.bfloat16)")
    if t.dim() != 2:
        raise LoRAShapeError(f"{where}: {label} has shape {tuple(t.shape)}; expected a matrix")


@dataclass(frozen=True)
class _Plan:
    module: str
    keys: Mapping[str, str]  # "lora_A" / "lora_B" / "alpha" -> the key holding it
    weight: torch.Tensor  # the target's weight: the dtype and device the adapter computes in


def _structure(what: str, shapes: Mapping[str, torch.Tensor], model: nn.Module) -> list[_Plan]:
    """Keys, pairs, targets, dtypes and shapes, from ``shapes`` (meta tensors or the caller's; no
    value is read): everything that decides whether a tensor is worth reading."""
    if not shapes:
        raise LoRAKeyError(f"{what}: holds no tensors; expected keys like "
                           "'transformer_blocks.0.attn1.to_q.lora_A.weight'")
    parts: dict[str, dict[str, str]] = {}
    for key, tensor in shapes.items():
        if not isinstance(key, str):
            raise LoRAKeyError(f"{what}: key {shown(key)} is a {type(key).__name__}; keys are strings like "
                               "'transformer_blocks.0.attn1.to_q.lora_A.weight'")
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
        group[part] = key

    plans: list[_Plan] = []
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
        if tensor_parallel_size(linear) > 1:
            raise LoRAKeyError(
                f"{where}: {module_name!r} is a {type(linear).__name__} sharded over "
                f"{tensor_parallel_size(linear)} tensor-parallel ranks; the manager takes whole weights "
                "(tp_size=1) for now"
            )
        if not is_linear(linear):
            # a subclass's owner may use its weight without calling its forward (MultiheadAttention
            # does with out_proj): a dynamic adapter there would be skipped without a word
            raise LoRAKeyError(
                f"{where}: {module_name!r} is a {type(linear).__name__}, a subclass of torch.nn.Linear; "
                "only plain nn.Linear modules can take a LoRA, because a subclass's parent may use its "
                "weight without calling its forward (MultiheadAttention does so with out_proj) and the "
                "adapter would be silently skipped. Drop this module's keys from the LoRA."
            )
        if linear.weight.dtype not in FACTOR_DTYPES:
            raise LoRAValueError(f"{where}: the model's weight is {linear.weight.dtype}; a LoRA can only be "
                                 "applied to float32, bfloat16, float16 or float64 weights")
        a, b = shapes[group["lora_A"]], shapes[group["lora_B"]]
        _check_factor(where, "lora_A", a)
        _check_factor(where, "lora_B", b)
        rank = a.shape[0]
        if rank == 0 or b.shape[1] != rank:
            raise LoRAShapeError(
                f"{where}: rank mismatch, lora_A {tuple(a.shape)} (rank first) and lora_B "
                f"{tuple(b.shape)} (rank last) disagree"
            )
        out_features, in_features = linear.weight.shape  # (out, in), nn.Linear's and any registered type's
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise LoRAShapeError(
                f"{where}: the LoRA maps {a.shape[1]} -> {b.shape[0]} features but the model's "
                f"Linear is {in_features} -> {out_features}; was this LoRA trained "
                "for another model or variant (e.g. LTX-2.3 on LTX-2)?"
            )
        if "alpha" in group:
            at = shapes[group["alpha"]]
            if at.dtype.is_complex or at.dtype == torch.bool:
                raise LoRAValueError(f"{where}: alpha must be a real number, got dtype {at.dtype}")
            if at.numel() != 1:
                raise LoRAShapeError(f"{where}: alpha must be a single number, got shape {tuple(at.shape)}")
        plans.append(_Plan(module_name, group, linear.weight))
    return plans


def _owned_factor(where: str, label: str, source: torch.Tensor, owned: bool, weight: torch.Tensor,
                  shape: torch.Size, place: torch.device | None = None) -> torch.Tensor:
    """The factor as the adapter and the merge will hold it: in the weight's dtype, on its device,
    in memory nobody else holds, its values checked in that dtype (a value finite in float32 may be
    Inf in float16)."""
    source = source.detach()
    if source.is_meta:
        raise LoRAValueError(f"{where}: {label} is a meta tensor (a shape without values); pass real tensors")
    if tuple(source.shape) != tuple(shape):
        raise LoRAShapeError(f"{where}: {label} changed shape to {tuple(source.shape)} while being copied")
    if owned and source.dtype == weight.dtype and source.is_contiguous():
        copy = source
    else:
        copy = torch.empty(source.shape, dtype=weight.dtype, device=source.device)
        copy.copy_(source)
    if not bool(torch.isfinite(copy).all()):
        bad_source = int((~torch.isfinite(source)).sum())
        if bad_source:
            raise LoRAValueError(f"{where}: {label} holds {bad_source} NaN/Inf values; the file is "
                                 "damaged or the LoRA diverged in training")
        bad = int((~torch.isfinite(copy)).sum())
        raise LoRAValueError(
            f"{where}: {label} holds {bad} values that are finite in {source.dtype} but overflow to Inf in "
            f"{weight.dtype}, the dtype of the model's weight that the adapter and the merge compute in; "
            "rescale the factors (divide lora_A and multiply lora_B by the same number, or the reverse) "
            "or load the model in a wider dtype"
        )
    return copy.to(weight.device if place is None else place)


def validate_lora(spec: LoRASpec, model: nn.Module, place: torch.device | None = None) -> LoadedLoRA:
    """Check ``spec``'s tensors against ``model`` and return the manager's own copies; mutate nothing.

    The copies are what gets applied (the PEFT adapters and the merge use them): a file rewritten
    or caller tensors changed afterwards make no difference. From a file, the header is checked
    against the model before any tensor data is read. ``place``: where the copies live (default:
    each on its target weight's device; the LoRA cache keeps added LoRAs on the host)."""
    source = spec.source if len(spec.source) <= 200 else f"{spec.source[:97]}...{spec.source[-100:]}"
    what = f"LoRA {spec.name!r} ({source})"
    if spec.path is not None:
        with open_safetensors(spec.path, what) as f:
            return _loaded(spec, what, f.placeholders(), lambda key: (f.read(key), True), model, place)
    tensors = dict(spec.tensors or {})  # the mapping as it is now
    return _loaded(spec, what, tensors, lambda key: (tensors[key], False), model, place)


def _loaded(spec: LoRASpec, what: str, shapes: Mapping[str, torch.Tensor],
            fetch: Callable[[str], tuple[torch.Tensor, bool]], model: nn.Module,
            place: torch.device | None) -> LoadedLoRA:
    plans = _structure(what, shapes, model)
    targets: dict[str, TargetLoRA] = {}
    for plan in plans:
        where = f"{what}, module {plan.module!r}"
        alpha: float | None = None
        if "alpha" in plan.keys:
            value, _ = fetch(plan.keys["alpha"])
            if value.is_meta:
                raise LoRAValueError(f"{where}: alpha is a meta tensor (a shape without values); pass a real one")
            alpha = float(value.detach().reshape(()).item())
            if not (alpha > 0 and alpha < float("inf")):
                raise LoRAValueError(f"{where}: alpha must be a finite positive number, got {alpha}")
        factors = {}
        for label in ("lora_A", "lora_B"):
            key = plan.keys[label]
            factors[label] = _owned_factor(where, label, *fetch(key), plan.weight, shapes[key].shape, place)
        targets[plan.module] = TargetLoRA(plan.module, factors["lora_A"], factors["lora_B"], alpha)
    return LoadedLoRA(spec, targets)


def validate_all(specs: list[LoRASpec], model: nn.Module) -> list[LoadedLoRA]:
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"LoRA names must be unique; repeated: {', '.join(dupes)}")
    return [validate_lora(s, model) for s in specs]
