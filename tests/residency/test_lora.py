"""LoRA loading and validation, and the input checks of manager construction and ``Request.enter``.

Contract under test (docs/architecture.md, "Validate fully, then mutate"): every bad input is
refused with a typed error whose message says what is wrong, where (file, key or module) and how
to fix it, and the DiT is left exactly as it was - same weight bits, same module tree (no PEFT
layer injected), no forward hook left behind. Real safetensors / torch.save files are written to
``tmp_path``; pickles carry a payload that would leave a marker on disk if anything unpickled them.
"""

from __future__ import annotations

import copy
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import (
    ConfigError,
    LoRAFormatError,
    LoRAKeyError,
    LoRAShapeError,
    LoRASpec,
    LoRAValidationError,
    LoRAValueError,
    MergePolicyName,
    Phase,
    PhaseOrderError,
    ResidencyManager,
    ResidencyMode,
    StrengthError,
    WeightState,
)
from ltx2_residency.testing import save_lora, synthetic_lora
from ltx2_tools.hostile import address_space_limit, sparse_safetensors
from strategies import bad_strengths, huge_ints, phase_values
from untouched import Snapshot, assert_model_untouched, snapshot

Tensors = dict[str, torch.Tensor]

RANK = 4
#: The module most cases damage: a square video-attention projection (128 -> 128 in the tiny DiT).
M = "transformer_blocks.0.attn1.to_q"
A_KEY = f"transformer.{M}.lora_A.weight"
B_KEY = f"transformer.{M}.lora_B.weight"
ALPHA_KEY = f"transformer.{M}.alpha"
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------- helpers
def assert_untouched(model: nn.Module, before: Snapshot, *, peft_free: bool = True) -> None:
    assert_model_untouched(before, model, peft_free=peft_free)


def assert_says(exc: pytest.ExceptionInfo[BaseException], *fragments: str) -> None:
    text = str(exc.value)
    missing = [f for f in fragments if f.lower() not in text.lower()]
    assert not missing, f"message lacks {missing}:\n{text}"


def header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def forward(dit: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return dit(**inputs)[0]


def stage2_output(model: nn.Module, spec: LoRASpec, inputs: dict[str, Any], policy: str) -> torch.Tensor:
    mgr = ResidencyManager(model, loras=[spec], merge_policy=policy)
    with mgr.request() as req:
        req.enter("stage1")
        out = forward(req.enter("stage2"), inputs)
    assert mgr.state is WeightState.CLEAN
    return out


class _Armed:
    """Unpickling this creates ``marker`` (a directory): proof that something ran the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (self.marker,))


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def targets(block_linears: list[str]) -> list[str]:
    picked = [n for n in block_linears
              if n.startswith(("transformer_blocks.0.attn1.", "transformer_blocks.0.ff."))]
    assert M in picked
    return picked


@pytest.fixture(scope="module")
def good(base_model: nn.Module, targets: list[str]) -> Tensors:
    """A valid rank-4 LoRA (‖ΔW‖ = 15 % of ‖W‖); tests copy the dict and replace tensors, never edit them."""
    return synthetic_lora(base_model, targets, rank=RANK, relative_norm=0.15, seed=5)


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., LoRASpec]:
    def make(tensors: Tensors, source: str = "file", name: str = "user", **kw: Any) -> LoRASpec:
        if source == "file":
            return LoRASpec(name=name, path=save_lora(tmp_path / f"{name}.safetensors", tensors), **kw)
        return LoRASpec(name=name, tensors=tensors, **kw)

    return make


@pytest.fixture
def managed(model: nn.Module, good: Tensors) -> Iterator[tuple[nn.Module, ResidencyManager]]:
    mgr = ResidencyManager(model, loras=[LoRASpec("user", tensors=good,
                                                  strengths={"stage1": 0.5, "stage2": 1.0})],
                           merge_policy="dynamic")
    yield model, mgr
    mgr.close()


@pytest.fixture(scope="module")
def other_variant_lora(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A LoRA trained for a sibling variant with another head dim (emulates LTX-2.3 on LTX-2)."""
    other = tiny_transformer(seed=0, attention_head_dim=16)
    names = [n for n, m in other.named_modules() if isinstance(m, nn.Linear) and "transformer_blocks." in n]
    tensors = synthetic_lora(other, names, rank=8, relative_norm=0.1, seed=3)
    return save_lora(tmp_path_factory.mktemp("variant") / "ltx23_lora.safetensors", tensors)


# ------------------------------------------------------------------- bad tensor sets (key/shape/value)
def _poke(t: torch.Tensor, value: float) -> torch.Tensor:
    out = t.clone()
    out[0, 0] = value
    return out


def _add_pair(module: str) -> Callable[[Tensors], None]:
    def mutate(t: Tensors) -> None:
        t[f"transformer.{module}.lora_A.weight"] = torch.randn(RANK, 128).bfloat16()
        t[f"transformer.{module}.lora_B.weight"] = torch.randn(128, RANK).bfloat16()

    return mutate


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Tensors], None]
    error: type[LoRAValidationError]
    says: tuple[str, ...] = field(default=())


def _not_a_module(case_id: str, module: str) -> Case:
    return Case(case_id, _add_pair(module), LoRAKeyError,
                (f"no Linear named {module!r}", f"module {module!r}", "keys must name Linear modules"))


def _not_a_key(case_id: str, key: str) -> Case:
    def mutate(t: Tensors) -> None:
        t[key] = torch.zeros(RANK, 128).bfloat16()

    return Case(case_id, mutate, LoRAKeyError,
                ("is not a PEFT/diffusers LoRA key", f"key {key!r}", "expected '<module>.lora_A.weight'"))


_MODULE = f"module {M!r}"
_NONFINITE = ("NaN/Inf values", _MODULE, "damaged or the LoRA diverged")
_DTYPE = ("LoRA tensors must be floating point", _MODULE)
_MATRIX = ("expected a matrix", _MODULE)
_INOUT = ("but the model's Linear is 128 -> 128", _MODULE, "trained for another model or variant")
_ALPHA_VALUE = ("alpha must be a finite positive number", _MODULE)

CASES = [
    # keys naming modules that are missing or not Linear
    _not_a_module("unknown-module", "transformer_blocks.7.attn1.to_q"),
    _not_a_module("norm", "transformer_blocks.0.attn1.norm_q"),
    _not_a_module("attention-block", "transformer_blocks.0.attn1"),
    _not_a_module("module-list", "transformer_blocks.0.attn1.to_out"),
    _not_a_module("dropout", "transformer_blocks.0.attn1.to_out.1"),
    _not_a_module("block-list", "transformer_blocks"),
    # keys that are not LoRA keys at all (the top level has no module name to put before lora_A)
    _not_a_key("top-level", "transformer.lora_A.weight"),
    _not_a_key("base-weight", f"transformer.{M}.weight"),
    _not_a_key("kohya-key", "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight"),
    _not_a_key("peft-in-model-key", f"{M}.lora_A.default.weight"),
    # incomplete pairs
    Case("missing-lora_B", lambda t: t.pop(B_KEY), LoRAKeyError,
         ("has no lora_B tensor", _MODULE, "needs both lora_A and lora_B")),
    Case("missing-lora_A", lambda t: t.pop(A_KEY), LoRAKeyError,
         ("has no lora_A tensor", _MODULE, "needs both lora_A and lora_B")),
    Case("alpha-without-pair",
         lambda t: (t.pop(A_KEY), t.pop(B_KEY), t.update({ALPHA_KEY: torch.tensor(8.0)})), LoRAKeyError,
         ("has no lora_A tensor", _MODULE, "needs both")),
    # shapes
    Case("rank-mismatch", lambda t: t.update({B_KEY: torch.randn(128, RANK + 1).bfloat16()}), LoRAShapeError,
         ("rank mismatch", _MODULE, f"({RANK}, 128) (rank first)", f"(128, {RANK + 1}) (rank last)")),
    Case("rank-zero", lambda t: t.update({A_KEY: torch.zeros(0, 128), B_KEY: torch.zeros(128, 0)}),
         LoRAShapeError, ("rank", _MODULE)),
    Case("in-features", lambda t: t.update({A_KEY: torch.randn(RANK, 96).bfloat16()}), LoRAShapeError,
         ("maps 96 -> 128 features", *_INOUT)),
    Case("out-features", lambda t: t.update({B_KEY: torch.randn(96, RANK).bfloat16()}), LoRAShapeError,
         ("maps 128 -> 96 features", *_INOUT)),
    Case("transposed", lambda t: t.update({A_KEY: t[A_KEY].T.contiguous(), B_KEY: t[B_KEY].T.contiguous()}),
         LoRAShapeError, _INOUT),
    Case("3d-lora_A", lambda t: t.update({A_KEY: t[A_KEY].unsqueeze(0)}), LoRAShapeError,
         ("lora_A has shape (1, 4, 128)", *_MATRIX)),
    Case("1d-lora_B", lambda t: t.update({B_KEY: t[B_KEY].flatten()}), LoRAShapeError,
         ("lora_B has shape (512,)", *_MATRIX)),
    # values and dtypes
    Case("nan-lora_A", lambda t: t.update({A_KEY: _poke(t[A_KEY], NAN)}), LoRAValueError,
         ("lora_A holds 1", *_NONFINITE)),
    Case("nan-lora_B", lambda t: t.update({B_KEY: _poke(t[B_KEY], NAN)}), LoRAValueError,
         ("lora_B holds 1", *_NONFINITE)),
    Case("inf-lora_A", lambda t: t.update({A_KEY: _poke(t[A_KEY], INF)}), LoRAValueError,
         ("lora_A holds 1", *_NONFINITE)),
    Case("neg-inf-lora_B", lambda t: t.update({B_KEY: _poke(t[B_KEY], -INF)}), LoRAValueError,
         ("lora_B holds 1", *_NONFINITE)),
    Case("int32-lora_A", lambda t: t.update({A_KEY: torch.ones(RANK, 128, dtype=torch.int32)}),
         LoRAValueError, ("lora_A has dtype torch.int32", *_DTYPE)),
    Case("int8-lora_B", lambda t: t.update({B_KEY: torch.ones(128, RANK, dtype=torch.int8)}),
         LoRAValueError, ("lora_B has dtype torch.int8", *_DTYPE)),
    Case("bool-lora_A", lambda t: t.update({A_KEY: torch.ones(RANK, 128, dtype=torch.bool)}),
         LoRAValueError, ("lora_A has dtype torch.bool", *_DTYPE)),
    Case("float8-lora_A", lambda t: t.update({A_KEY: t[A_KEY].to(torch.float8_e4m3fn)}),
         LoRAValueError, ("lora_A has dtype torch.float8_e4m3fn", *_DTYPE)),
    Case("float8-lora_B", lambda t: t.update({B_KEY: t[B_KEY].to(torch.float8_e5m2)}),
         LoRAValueError, ("lora_B has dtype torch.float8_e5m2", *_DTYPE)),
    Case("alpha-zero", lambda t: t.update({ALPHA_KEY: torch.tensor(0.0)}), LoRAValueError, _ALPHA_VALUE),
    Case("alpha-negative", lambda t: t.update({ALPHA_KEY: torch.tensor(-8.0)}), LoRAValueError, _ALPHA_VALUE),
    Case("alpha-nan", lambda t: t.update({ALPHA_KEY: torch.tensor(NAN)}), LoRAValueError, _ALPHA_VALUE),
    Case("alpha-inf", lambda t: t.update({ALPHA_KEY: torch.tensor(INF)}), LoRAValueError, _ALPHA_VALUE),
    Case("alpha-vector", lambda t: t.update({ALPHA_KEY: torch.tensor([8.0, 8.0])}), LoRAShapeError,
         ("alpha must be a single number", "shape (2,)", _MODULE)),
]


@pytest.mark.parametrize("source", ["file", "memory"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_lora_is_refused_before_any_mutation(
    case: Case, source: str, model: nn.Module, good: Tensors, make_spec: Callable[..., LoRASpec]
) -> None:
    tensors = dict(good)
    case.mutate(tensors)
    spec = make_spec(tensors, source)
    before = snapshot(model)
    with pytest.raises(case.error) as exc:
        ResidencyManager(model, loras=[spec], merge_policy="dynamic")
    assert_says(exc, "LoRA 'user'", spec.source, *case.says)
    assert_untouched(model, before)


def test_lora_for_another_variant_is_refused(model: nn.Module, other_variant_lora: str) -> None:
    before = snapshot(model)
    with pytest.raises(LoRAShapeError) as exc:
        ResidencyManager(model, loras=[LoRASpec("distilled", path=other_variant_lora)])
    assert_says(exc, other_variant_lora, "module 'transformer_blocks.", "features but the model's Linear is",
                "LTX-2.3 on LTX-2")
    assert_untouched(model, before)


def test_every_lora_is_validated_before_any_is_injected(
    model: nn.Module, good: Tensors, make_spec: Callable[..., LoRASpec]
) -> None:
    bad = dict(good)
    bad[B_KEY] = _poke(good[B_KEY], NAN)
    loras = [make_spec(good, name="distilled"), make_spec(bad, name="user")]
    before = snapshot(model)
    with pytest.raises(LoRAValueError) as exc:
        ResidencyManager(model, loras=loras)
    assert_says(exc, "LoRA 'user'", _MODULE)
    assert_untouched(model, before)


def test_conflicting_tensors_for_one_module_are_refused(model: nn.Module, good: Tensors,
                                                         make_spec: Callable[..., LoRASpec]) -> None:
    # 'transformer.X' and 'X' name the same module once the prefix is stripped; keeping either
    # one silently would apply a LoRA nobody can tell apart from the file.
    tensors = dict(good)
    tensors[f"{M}.lora_A.weight"] = good[A_KEY] * 3
    spec = make_spec(tensors)
    before = snapshot(model)
    with pytest.raises(LoRAKeyError) as exc:
        ResidencyManager(model, loras=[spec])
    assert_says(exc, spec.source, M)
    assert_untouched(model, before)


def test_original_ltx2_keys_point_to_the_converter(model: nn.Module, good: Tensors,
                                                  make_spec: Callable[..., LoRASpec]) -> None:
    # Original LTX-2 LoRA files name modules 'diffusion_model.transformer_blocks...'; the
    # message promises a converter hint for exactly these files.
    tensors = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in good.items()}
    spec = make_spec(tensors)
    before = snapshot(model)
    with pytest.raises(LoRAKeyError) as exc:
        ResidencyManager(model, loras=[spec])
    assert_says(exc, spec.source, "diffusion_model.", "convert")
    assert_untouched(model, before)


def test_non_tensor_value_is_refused(model: nn.Module, good: Tensors) -> None:
    tensors: dict[str, Any] = {**good, A_KEY: good[A_KEY].tolist()}
    before = snapshot(model)
    with pytest.raises(LoRAValueError) as exc:
        ResidencyManager(model, loras=[LoRASpec("user", tensors=tensors)])
    assert_says(exc, "<in-memory tensors>", f"key {A_KEY!r}", "holds a list, not a tensor")
    assert_untouched(model, before)


@pytest.mark.parametrize("source", ["file", "memory"])
def test_lora_without_tensors_is_refused(source: str, model: nn.Module, tmp_path: Path) -> None:
    if source == "file":
        save_file({}, str(tmp_path / "empty.safetensors"))
        spec = LoRASpec("user", path=tmp_path / "empty.safetensors")
    else:
        spec = LoRASpec("user", tensors={})
    before = snapshot(model)
    with pytest.raises(LoRAKeyError) as exc:
        ResidencyManager(model, loras=[spec])
    assert_says(exc, spec.source, "holds no tensors", "expected keys like")
    assert_untouched(model, before)


def test_peft_wraps_only_the_validated_modules() -> None:
    # Any nn.Module is supported, and PEFT matches target names by suffix: a target 'a.lin' must
    # not also wrap 'b.a.lin', a module validation never looked at.
    net = nn.Module()
    net.a = nn.Module()
    net.a.lin = nn.Linear(8, 8)
    net.b = nn.Module()
    net.b.a = nn.Module()
    net.b.a.lin = nn.Linear(8, 8)
    gen = torch.Generator().manual_seed(1)
    tensors = {"a.lin.lora_A.weight": torch.randn(2, 8, generator=gen),
               "a.lin.lora_B.weight": torch.randn(8, 2, generator=gen)}
    mgr = ResidencyManager(net, loras=[LoRASpec("user", tensors=tensors)], merge_policy="dynamic")
    assert set(mgr.managed_weights) == {"a.lin"}
    assert not isinstance(net.b.a.lin, LoraLayer)


# ------------------------------------------------------------------------------- file format refusals
def _good_file(tmp_path: Path, tensors: Tensors, name: str = "lora.safetensors") -> Path:
    return Path(save_lora(tmp_path / name, tensors))


def _refused(model: nn.Module, path: Path | str) -> pytest.ExceptionInfo[LoRAFormatError]:
    before = snapshot(model)
    with pytest.raises(LoRAFormatError) as exc:
        ResidencyManager(model, loras=[LoRASpec("user", path=path)])
    assert_untouched(model, before)
    assert_says(exc, "LoRA 'user'", str(path))
    return exc


def test_missing_file(model: nn.Module, tmp_path: Path) -> None:
    assert_says(_refused(model, tmp_path / "nope.safetensors"), "does not exist")


def test_directory_instead_of_file(model: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "lora.safetensors").mkdir()
    assert_says(_refused(model, tmp_path / "lora.safetensors"), "is not a file")


def test_empty_file(model: nn.Module, tmp_path: Path) -> None:
    (tmp_path / "lora.safetensors").touch()
    assert_says(_refused(model, tmp_path / "lora.safetensors"), "is empty (0 bytes)", "re-download")


@pytest.mark.parametrize("cut", ["in-length-prefix", "in-header", "after-header", "last-byte"])
def test_truncated_file(cut: str, model: nn.Module, tmp_path: Path, good: Tensors) -> None:
    path = _good_file(tmp_path, good)
    data = path.read_bytes()
    hl = header_len(path)
    size = {"in-length-prefix": 5, "in-header": 8 + hl // 2, "after-header": 8 + hl,
            "last-byte": len(data) - 1}[cut]
    path.write_bytes(data[:size])
    assert_says(_refused(model, path), f"({size} bytes)", "not a readable safetensors file", "truncated")


@pytest.mark.parametrize("damage", ["json-garbage", "length-huge", "length-past-eof", "bad-offsets"])
def test_corrupt_header(damage: str, model: nn.Module, tmp_path: Path, good: Tensors) -> None:
    path = _good_file(tmp_path, good)
    data = path.read_bytes()
    hl = header_len(path)
    header, body = data[8:8 + hl], data[8 + hl:]
    if damage == "json-garbage":
        data = data[:8] + b"\x07" * hl + body
    elif damage == "length-huge":
        data = struct.pack("<Q", 2**40) + header + body
    elif damage == "length-past-eof":
        data = struct.pack("<Q", len(data)) + header + body
    else:
        assert b'"data_offsets":[0,' in header
        data = data[:8] + header.replace(b'"data_offsets":[0,', b'"data_offsets":[9,') + body
    path.write_bytes(data)
    assert_says(_refused(model, path), "not a readable safetensors file")


PICKLES = [
    # (file name, writer, says "pickle")
    ("lora.pt", "torch-zip", True),
    ("lora.bin", "torch-zip", True),
    ("lora.pth", "torch-legacy", True),
    ("lora.pkl", "pickle-0", True),
    ("renamed-zip.safetensors", "torch-zip", True),
    ("renamed-legacy.safetensors", "torch-legacy", True),
    ("renamed-p2.safetensors", "pickle-2", True),
    ("renamed-p5.safetensors", "pickle-5", True),
    # protocol 0 has no magic number; it must still never be unpickled
    ("renamed-p0.safetensors", "pickle-0", False),
]


def _write_armed(path: Path, writer: str, marker: Path, tensors: Tensors) -> None:
    payload = {**tensors, "payload": _Armed(marker)}
    if writer == "torch-zip":
        torch.save(payload, path)
    elif writer == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(_Armed(marker), protocol=int(writer.split("-")[1])))


@pytest.mark.parametrize(("name", "writer", "says_pickle"), PICKLES, ids=[p[0] for p in PICKLES])
def test_pickles_are_refused_unread(
    name: str, writer: str, says_pickle: bool, model: nn.Module, tmp_path: Path, good: Tensors,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control: the same kind of file does run its payload when something unpickles it.
    # (named .ckpt: torch.load itself hands a '.safetensors' name to safetensors)
    control, control_marker = tmp_path / "control.ckpt", tmp_path / "control-ran"
    _write_armed(control, writer, control_marker, good)
    if writer.startswith("torch"):
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert control_marker.exists()

    marker = tmp_path / "payload-ran"
    path = tmp_path / name
    _write_armed(path, writer, marker, good)
    calls: list[str] = []

    def forbidden(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(what)
            raise AssertionError(f"{what} called on a refused file")
        return call

    for mod, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, attr, forbidden(f"{mod.__name__}.{attr}"))
    exc = _refused(model, path)
    assert not marker.exists(), "the pickle payload ran"
    assert not calls
    if says_pickle:
        assert_says(exc, "pickle", "refused unread", "convert it to .safetensors")


@pytest.mark.parametrize(("modulus", "residue"), [(256, 0x80), (65536, 0x4B50)], ids=["0x80", "PK"])
def test_valid_file_whose_header_length_looks_like_pickle_magic_loads(
    modulus: int, residue: int, model: nn.Module, tmp_path: Path, good: Tensors, targets: list[str]
) -> None:
    # The first 8 bytes of a safetensors file are its header length (little endian); kohya-style
    # training metadata makes that length arbitrary, so 1 in 256 valid files starts with 0x80
    # (pickle's PROTO opcode) and some start with b"PK" (zip). Only a magic check that looks
    # past the length (byte 8 is '{' in safetensors) tells them apart.
    path = tmp_path / "lora.safetensors"
    save_file(good, str(path), metadata={"ss_pad": ""})
    hl0 = header_len(path)
    want = hl0 + (residue - hl0) % modulus
    for n in range(max(0, want - hl0 - 8), want - hl0 + 9):
        save_file(good, str(path), metadata={"ss_pad": "x" * n})
        if header_len(path) == want:
            break
    assert header_len(path) % modulus == residue
    mgr = ResidencyManager(model, loras=[LoRASpec("user", path=path)], merge_policy="dynamic")
    assert set(mgr.managed_weights) == set(targets)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated", "pickle"])
def test_format_errors_name_a_remedy(kind: str, model: nn.Module, tmp_path: Path, good: Tensors) -> None:
    path = tmp_path / ("lora.pt" if kind == "pickle" else "lora.safetensors")
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.touch()
    elif kind == "truncated":
        path.write_bytes(_good_file(tmp_path, good, "full.safetensors").read_bytes()[:100])
    elif kind == "pickle":
        torch.save(good, path)
    text = str(_refused(model, path).value).lower()
    remedies = ("re-download", "re-export", "convert", "check the path", "pass the path", "point ")
    assert any(r in text for r in remedies), f"no remedy in: {text}"


# ------------------------------------------------------------------------ accepted key/value variants
@pytest.fixture(scope="module")
def reference(base_model: nn.Module, good: Tensors) -> dict[str, torch.Tensor]:
    """Stage-2 outputs of the base model and of ``good`` in its canonical ('transformer.') form."""
    inputs = tiny_inputs(base_model, seed=0)
    base = forward(copy.deepcopy(base_model), inputs)
    lora = stage2_output(copy.deepcopy(base_model), LoRASpec("user", tensors=good), inputs, "dynamic")
    assert not torch.allclose(base.float(), lora.float(), rtol=0, atol=5e-3), "the LoRA must matter"
    return {"base": base, "lora": lora}


def _reprefix(tensors: Tensors, prefix: str) -> Tensors:
    return {prefix + k.removeprefix("transformer."): v for k, v in tensors.items()}


@pytest.mark.parametrize("prefix", ["", "transformer.", "base_model.model.", "mixed"])
def test_key_prefixes_are_equivalent(
    prefix: str, model: nn.Module, good: Tensors, make_spec: Callable[..., LoRASpec],
    inputs: dict[str, Any], reference: dict[str, torch.Tensor], targets: list[str],
) -> None:
    if prefix == "mixed":
        cycle = ("", "transformer.", "base_model.model.")
        tensors = {cycle[i % 3] + k.removeprefix("transformer."): v
                   for i, (k, v) in enumerate(sorted(good.items()))}
    else:
        tensors = _reprefix(good, prefix)
    mgr = ResidencyManager(model, loras=[make_spec(tensors)], merge_policy="dynamic")
    assert set(mgr.managed_weights) == set(targets)
    with mgr.request() as req:
        req.enter("stage1")
        out = forward(req.enter("stage2"), inputs)
    assert torch.equal(out, reference["lora"])


@pytest.mark.parametrize(("alpha_key", "factor", "policy"), [
    ("alpha", 2.0, "dynamic"), ("lora_alpha", 2.0, "dynamic"), ("alpha", 0.5, "dynamic"),
    ("alpha", 2.0, "merge"),
])
def test_alpha_scales_by_alpha_over_rank(
    alpha_key: str, factor: float, policy: str, fresh_model: Callable[[], nn.Module], good: Tensors,
    targets: list[str], make_spec: Callable[..., LoRASpec], inputs: dict[str, Any],
    reference: dict[str, torch.Tensor],
) -> None:
    with_alpha = {**good, **{f"transformer.{m}.{alpha_key}": torch.tensor(factor * RANK) for m in targets}}
    scaled_b = {k: (v * factor if ".lora_B." in k else v) for k, v in good.items()}
    out_alpha = stage2_output(fresh_model(), make_spec(with_alpha, name="alpha"), inputs, policy)
    out_scaled = stage2_output(fresh_model(), make_spec(scaled_b, name="scaled"), inputs, policy)
    torch.testing.assert_close(out_alpha, out_scaled)
    # alpha must not be ignored: without it the output is the unscaled LoRA's
    assert not torch.allclose(out_alpha.float(), reference["lora"].float(), rtol=0, atol=5e-3)


def test_path_may_be_str_or_pathlike(model: nn.Module, good: Tensors, tmp_path: Path,
                                     targets: list[str]) -> None:
    path = _good_file(tmp_path, good)
    for p in (path, str(path)):
        spec = LoRASpec("user", path=p)
        assert spec.source == str(path)
        mgr = ResidencyManager(copy.deepcopy(model), loras=[spec])
        assert set(mgr.managed_weights) == set(targets)


# ------------------------------------------------------------------------------- LoRASpec arguments
@pytest.mark.parametrize("name", ["user.v2", "", "2user", "user lora", "user/v2", 3, None])
def test_invalid_lora_name(name: Any, good: Tensors) -> None:
    with pytest.raises(ConfigError) as exc:
        LoRASpec(name=name, tensors=good)
    assert_says(exc, repr(name), "not usable as an adapter name", "use letters, digits")


@pytest.mark.parametrize("name", ["update", "training", "forward"])
def test_lora_name_that_peft_cannot_use_is_refused_untouched(
    name: str, model: nn.Module, good: Tensors
) -> None:
    # PEFT keeps adapters in nn.ModuleDicts: a name that is already an attribute of one
    # ('update', 'forward', 'training', ...) cannot be added, so it must be refused up front.
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        ResidencyManager(model, loras=[LoRASpec("distilled", tensors=good), LoRASpec(name, tensors=good)])
    assert_says(exc, repr(name))
    assert_untouched(model, before)


@pytest.mark.parametrize("given_args", ["both", "neither"])
def test_exactly_one_of_path_and_tensors(given_args: str, good: Tensors, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"path": tmp_path / "x.safetensors", "tensors": good} if given_args == "both" else {}
    with pytest.raises(ConfigError) as exc:
        LoRASpec("user", **kw)
    assert_says(exc, "LoRA 'user'", "give exactly one of path= or tensors=")


@pytest.mark.parametrize("value", [NAN, INF, -INF, -0.5, True, False, "1.0", None, 1j],
                         ids=["nan", "inf", "-inf", "negative", "True", "False", "str", "None", "complex"])
def test_spec_refuses_bad_strength(value: Any, good: Tensors) -> None:
    with pytest.raises(StrengthError) as exc:
        LoRASpec("user", tensors=good, strengths={"stage1": 0.0, "stage2": value})
    assert_says(exc, "LoRA 'user' stage2", "strength must be")


@given(value=bad_strengths, phase=phase_values)
def test_spec_refuses_bad_strengths_property(value: object, phase: Phase | str) -> None:
    with pytest.raises(StrengthError) as exc:
        LoRASpec("user", tensors={}, strengths={phase: value})  # type: ignore[dict-item]
    assert_says(exc, f"LoRA 'user' {Phase(phase).value}", "strength must be")


@pytest.mark.parametrize("key", ["stage3", 2], ids=["stage3", "int"])
def test_spec_refuses_unknown_phase_key(key: Any, good: Tensors) -> None:
    with pytest.raises(StrengthError) as exc:
        LoRASpec("user", tensors=good, strengths={key: 1.0})
    assert_says(exc, "LoRA 'user'", "unknown phase", repr(key), "'stage1', 'stage2'")


def test_spec_refuses_strengths_that_are_not_a_mapping(good: Tensors) -> None:
    with pytest.raises(StrengthError) as exc:
        LoRASpec("user", tensors=good, strengths=0.5)  # type: ignore[arg-type]
    assert_says(exc, "LoRA 'user'", "mapping")


@pytest.mark.parametrize("key", [Phase.STAGE2, "stage2", " Stage2 ", "STAGE2"], ids=repr)
def test_spec_accepts_phase_enum_and_strings(key: Phase | str, good: Tensors) -> None:
    spec = LoRASpec("user", tensors=good, strengths={key: 0.5})
    assert spec.strength(Phase.STAGE2) == 0.5
    assert spec.strength(Phase.STAGE1) == 0.0
    assert LoRASpec("user", tensors=good).strengths == {Phase.STAGE1: 0.0, Phase.STAGE2: 1.0}


# ---------------------------------------------------------------------- ResidencyManager arguments
def test_duplicate_lora_names(model: nn.Module, good: Tensors, make_spec: Callable[..., LoRASpec]) -> None:
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        ResidencyManager(model, loras=[make_spec(good), LoRASpec("user", tensors=good)])
    assert_says(exc, "LoRA names must be unique", "repeated: user")
    assert_untouched(model, before)


@pytest.mark.parametrize("transformer", [None, "transformer", {}, "state_dict", nn.Linear],
                         ids=["None", "str", "dict", "state_dict", "class"])
def test_transformer_must_be_a_module(transformer: Any, model: nn.Module, good: Tensors) -> None:
    if transformer == "state_dict":
        transformer = model.state_dict()
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        ResidencyManager(transformer, loras=[LoRASpec("user", tensors=good)])
    assert_says(exc, "transformer must be a torch.nn.Module", f"got {type(transformer).__name__}")
    assert_untouched(model, before)


@pytest.mark.parametrize("item", ["user.safetensors", {"name": "user"}, None], ids=["str", "dict", "None"])
def test_loras_must_be_specs(item: Any, model: nn.Module, good: Tensors) -> None:
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        ResidencyManager(model, loras=[LoRASpec("distilled", tensors=good), item])
    assert_says(exc, "loras must be LoRASpec objects", f"got {type(item).__name__}")
    assert_untouched(model, before)


def test_single_spec_instead_of_a_list(model: nn.Module, good: Tensors) -> None:
    before = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        ResidencyManager(model, loras=LoRASpec("user", tensors=good))  # type: ignore[arg-type]
    assert_says(exc, "LoRASpec")
    assert_untouched(model, before)


BAD_SETTINGS = [
    ("mode", "originals", ConfigError, ("unknown residency mode", "'original'")),
    ("mode", 1, ConfigError, ("unknown residency mode", "'original'")),
    ("mode", "automatic", ConfigError, ("unknown residency mode", "'snapshot', 'resident'")),
    ("merge_policy", "merged", ConfigError,
     ("unknown merge policy: 'merged'", "'sglang', 'dynamic', 'merge'")),
    ("merge_policy", None, ConfigError, ("unknown merge policy: None", "'sglang'")),
    ("exact_kernel", "undo", ConfigError, ("unknown exact-merge kernel 'undo'", "'recompute', 'copy', 'copy_host'")),
    ("exact_kernel", None, ConfigError, ("unknown exact-merge kernel None", "'recompute'")),
    ("verify", "sometimes", ConfigError, ("unknown verify setting 'sometimes'", "'after_merge'")),
    ("verify", True, ConfigError, ("unknown verify setting True", "'always'")),
    ("clean_source", "host", ConfigError, ("unknown clean_source 'host'", "'host_copy' or None")),
    ("clean_source", False, ConfigError, ("unknown clean_source False", "'host_copy' or None")),
    ("request_timeout", 0, ConfigError, ("request_timeout must be positive seconds or None",)),
    ("request_timeout", -1.0, ConfigError, ("request_timeout must be positive seconds or None",)),
    ("request_timeout", NAN, ConfigError, ("request_timeout must be positive seconds or None",)),
    ("request_timeout", "5", ConfigError, ("request_timeout must be positive seconds or None",)),
]


@pytest.mark.parametrize(("arg", "value", "error", "says"), BAD_SETTINGS,
                         ids=[f"{a}={v!r}" for a, v, _, _ in BAD_SETTINGS])
def test_bad_manager_setting(arg: str, value: Any, error: type[ConfigError], says: tuple[str, ...],
                             model: nn.Module, good: Tensors) -> None:
    before = snapshot(model)
    with pytest.raises(error) as exc:
        ResidencyManager(model, loras=[LoRASpec("user", tensors=good)], **{arg: value})
    assert isinstance(exc.value, ConfigError)
    assert_says(exc, *says)
    assert_untouched(model, before)


@pytest.mark.parametrize(("mode", "policy"), [
    (ResidencyMode.ORIGINAL, MergePolicyName.MERGE), ("original", "merge"), (" Original ", " MERGE "),
])
def test_manager_accepts_enum_and_string_settings(mode: Any, policy: Any, model: nn.Module,
                                                  good: Tensors) -> None:
    mgr = ResidencyManager(model, mode=mode, loras=[LoRASpec("user", tensors=good)], merge_policy=policy)
    assert mgr.mode is ResidencyMode.ORIGINAL
    assert mgr.policy.name is MergePolicyName.MERGE
    with mgr.request() as req:
        req.enter(Phase.STAGE1)
        req.enter(Phase.STAGE2)
        assert mgr.state is WeightState.STAGE2_MERGED
    assert mgr.state is WeightState.CLEAN


# ------------------------------------------------------------------------ Request.enter arguments
BAD_OVERRIDES = [
    # (override, message fragments, also compare a forward pass with a request that never saw it)
    ({"nope": 1.0}, ("unknown LoRA 'nope'", "managed LoRAs: 'user'"), True),
    ({"user": NAN}, ("override for LoRA 'user'", "must be finite"), True),
    ({"user": INF}, ("override for LoRA 'user'", "must be finite"), False),
    ({"user": 10**400}, ("override for LoRA 'user'", "must be finite"), False),
    ({"user": -0.5}, ("override for LoRA 'user'", "must be >= 0"), False),
    ({"user": True}, ("override for LoRA 'user'", "must be a real number"), False),
    ({"user": "0.5"}, ("override for LoRA 'user'", "must be a real number"), False),
    (0.5, ("strengths must be a mapping of LoRA name to strength",), False),
]


# stage 1 runs dynamic, stage 2 merged (the harder case: the weights already hold stage 1's merge);
# the property test below covers the other combinations without forward passes.
@pytest.mark.parametrize(("phase", "policy"), [("stage1", "dynamic"), ("stage2", "merge")])
@pytest.mark.parametrize(("override", "says", "compare"), BAD_OVERRIDES,
                         ids=[repr(o) for o, _, _ in BAD_OVERRIDES])
def test_bad_override_leaves_request_usable(
    override: Any, says: tuple[str, ...], compare: bool, phase: str, policy: str, model: nn.Module,
    good: Tensors, inputs: dict[str, Any],
) -> None:
    mgr = ResidencyManager(model, loras=[LoRASpec("user", tensors=good, strengths={"stage1": 0.5})],
                           merge_policy=policy)
    clean = snapshot(model)
    with mgr.request() as req:
        if phase == "stage2":
            req.enter("stage1")  # live stage-1 LoRA: the weights are merged or adapters attached
        state, entered, before = mgr.state, list(req.entered), snapshot(model)
        with pytest.raises(StrengthError) as exc:
            req.enter(phase, strengths=override)
        assert_says(exc, *says)
        assert mgr.state is state
        assert req.entered == entered
        assert_untouched(model, before, peft_free=False)
        dit = req.enter(phase, strengths={"user": 0.25})
        assert mgr.state is not WeightState.CLEAN  # the valid strength is live
        out = forward(dit, inputs) if compare else None
        if phase == "stage1":
            req.enter("stage2")
    assert mgr.state is WeightState.CLEAN
    mgr.verify_clean()
    assert_untouched(model, clean, peft_free=False)
    if out is not None:
        # the refused call left nothing behind: a request that never saw it gives the same output
        with mgr.request() as req:
            if phase == "stage2":
                req.enter("stage1")
            assert torch.equal(forward(req.enter(phase, strengths={"user": 0.25}), inputs), out)


@pytest.fixture(scope="module")
def shared_manager(base_model: nn.Module, good: Tensors) -> tuple[nn.Module, ResidencyManager, Snapshot]:
    model = copy.deepcopy(base_model)
    mgr = ResidencyManager(model, loras=[LoRASpec("user", tensors=good, strengths={"stage1": 0.5})],
                           merge_policy="merge")
    return model, mgr, snapshot(model)


@given(value=bad_strengths, phase=st.sampled_from(["stage1", "stage2"]))
def test_bad_override_strengths_property(
    value: object, phase: str, shared_manager: tuple[nn.Module, ResidencyManager, Snapshot]
) -> None:
    model, mgr, clean = shared_manager
    with mgr.request() as req:
        if phase == "stage2":
            req.enter("stage1")
        before = snapshot(model)
        with pytest.raises(StrengthError):
            req.enter(phase, strengths={"user": value})  # type: ignore[dict-item]
        assert_untouched(model, before, peft_free=False)
        req.enter(phase, strengths={"user": 1.0})
    assert mgr.state is WeightState.CLEAN
    assert_untouched(model, clean, peft_free=False)


@pytest.mark.parametrize("phase", [Phase.STAGE2, "stage2", " Stage2 ", "STAGE2"], ids=repr)
def test_enter_accepts_phase_enum_and_strings(
    phase: Phase | str, managed: tuple[nn.Module, ResidencyManager]
) -> None:
    model, mgr = managed
    with mgr.request() as req:
        req.enter("stage1")
        assert req.enter(phase) is model
        assert req.phase is Phase.STAGE2
        assert mgr.state is WeightState.STAGE2_DYNAMIC
    assert mgr.state is WeightState.CLEAN


@pytest.mark.parametrize("phase", ["stage3", "", None, 2], ids=repr)
def test_enter_refuses_unknown_phase(phase: Any, managed: tuple[nn.Module, ResidencyManager]) -> None:
    model, mgr = managed
    before = snapshot(model)
    with mgr.request() as req:
        with pytest.raises(ConfigError) as exc:
            req.enter(phase)
        assert_says(exc, "unknown phase", repr(phase), "'stage1', 'stage2'")
        assert_untouched(model, before, peft_free=False)
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state is WeightState.CLEAN


@pytest.mark.parametrize(("done", "attempt", "says"), [
    ((), "stage2", ("cannot enter 'stage2'", "phases entered so far: none", "next legal phase: stage1")),
    (("stage1",), "stage1", ("cannot enter 'stage1'", "phases entered so far: stage1",
                             "next legal phase: stage2")),
    (("stage1", "stage2"), "stage2", ("cannot enter 'stage2'", "none (the request is complete)",
                                      "open a new request")),
    (("stage1", "stage2"), "stage1", ("cannot enter 'stage1'", "stage1, stage2", "open a new request")),
], ids=["stage2-first", "stage1-twice", "stage2-twice", "stage1-after-stage2"])
def test_phase_order(done: tuple[str, ...], attempt: str, says: tuple[str, ...],
                     managed: tuple[nn.Module, ResidencyManager]) -> None:
    model, mgr = managed
    with mgr.request() as req:
        for p in done:
            req.enter(p)
        state, before = mgr.state, snapshot(model)
        with pytest.raises(PhaseOrderError) as exc:
            req.enter(attempt)
        assert_says(exc, f"request {req.id}", *says)
        assert mgr.state is state
        assert_untouched(model, before, peft_free=False)
        for p in ("stage1", "stage2")[len(done):]:
            req.enter(p)
    assert mgr.state is WeightState.CLEAN
    mgr.verify_clean()



# ------------------------------------------------------- what the manager applies is its own copy
def _two_phase_manager(model: nn.Module, **source: Any) -> ResidencyManager:
    # sglang on the native LTX-2.3 variant in original mode: HQ's stage 1 merges, stage 2 runs dynamic
    spec = LoRASpec("user", strengths={"stage1": 0.5, "stage2": 1.0}, **source)
    return ResidencyManager(model, loras=[spec], merge_policy="sglang", native_ltx23=True)


def _merge_then_dynamic(mgr: ResidencyManager, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    with mgr.request() as req:
        merged = forward(req.enter("stage1"), inputs)
        assert mgr.state is WeightState.STAGE1_MERGED
        dynamic = forward(req.enter("stage2"), inputs)
        assert mgr.state is WeightState.STAGE2_DYNAMIC
    assert mgr.state is WeightState.CLEAN
    return merged, dynamic


def _assert_same_outputs(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    for phase, g, e in zip(("stage 1 (merged)", "stage 2 (dynamic)"), got, expected, strict=True):
        assert torch.equal(g, e), f"{phase} output changed"


def _overwrite_in_place(path: Path, tensors: Tensors) -> None:
    """New values written over ``path``'s bytes (same file, same length), as a training run saving
    over its output does."""
    fresh = Path(save_lora(path.with_suffix(".new"), tensors))
    data = fresh.read_bytes()
    assert len(data) == path.stat().st_size, "same shapes and dtypes: the same header"
    with path.open("r+b") as fh:
        fh.write(data)


def test_a_lora_file_rewritten_after_loading_changes_nothing(
    model: nn.Module, base_model: nn.Module, good: Tensors, tmp_path: Path, inputs: dict[str, Any]
) -> None:
    path = _good_file(tmp_path, good)
    mgr = _two_phase_manager(model, path=path)
    expected = _merge_then_dynamic(mgr, inputs)
    _overwrite_in_place(path, {k: v * 3 if k.endswith("lora_B.weight") else v for k, v in good.items()})
    _assert_same_outputs(_merge_then_dynamic(mgr, inputs), expected)
    mgr.verify_clean()
    # the rewrite matters: a manager built from the file now applies other values
    rewritten = _merge_then_dynamic(_two_phase_manager(copy.deepcopy(base_model), path=path), inputs)
    assert not torch.equal(rewritten[1], expected[1])


def test_caller_tensors_changed_after_construction_change_nothing(
    model: nn.Module, good: Tensors, inputs: dict[str, Any]
) -> None:
    tensors = {k: v.clone() for k, v in good.items()}  # already in the model's dtype and on its device
    mgr = _two_phase_manager(model, tensors=tensors)
    expected = _merge_then_dynamic(mgr, inputs)
    with torch.no_grad():
        for t in tensors.values():
            t.mul_(3)
    _assert_same_outputs(_merge_then_dynamic(mgr, inputs), expected)
    mgr.verify_clean()


_TRUNCATE_AFTER_LOADING = """
import os, sys, torch
from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import LoRASpec, ResidencyManager
path = sys.argv[1]
model = tiny_transformer(seed=0, num_layers=1)
inputs = tiny_inputs(model, seed=0)
spec = LoRASpec("user", path=path, strengths={"stage1": 0.5, "stage2": 1.0})
mgr = ResidencyManager(model, loras=[spec], merge_policy="sglang", native_ltx23=True)
def run():
    with torch.no_grad(), mgr.request() as req:
        return req.enter("stage1")(**inputs)[0], req.enter("stage2")(**inputs)[0]
before = run()
os.truncate(path, 0)
after = run()
print("same" if all(torch.equal(a, b) for a, b in zip(before, after)) else "changed")
"""


def test_a_lora_file_truncated_after_loading_neither_crashes_nor_changes_anything(
    base_model: nn.Module, targets: list[str], tmp_path: Path
) -> None:
    # in a child process: reading a truncated memory-mapped file kills the reader with SIGBUS
    one_block = [t for t in targets if t.startswith("transformer_blocks.0.")]
    path = save_lora(tmp_path / "lora.safetensors", synthetic_lora(base_model, one_block, rank=RANK, seed=5))
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_AFTER_LOADING, path], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit status {proc.returncode} (-7: SIGBUS)\n{proc.stderr[-3000:]}"
    assert proc.stdout.split()[-1] == "same"


# ------------------------------------------------------------------ inputs no builtin error may escape
@given(value=huge_ints)
def test_strength_beyond_float_range_is_refused(value: int) -> None:
    with pytest.raises(StrengthError) as exc:
        LoRASpec("user", tensors={}, strengths={"stage2": value})
    assert_says(exc, "LoRA 'user' stage2", "strength must be finite")


def test_strength_too_long_to_print_is_refused() -> None:
    with pytest.raises(StrengthError) as exc:  # Python refuses to print an int of over 4300 digits
        LoRASpec("user", tensors={}, strengths={"stage2": 10**5000})
    assert_says(exc, "strength must be finite", "an integer of")


def test_a_path_too_long_for_the_file_system_is_refused(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / ("x" * 5000 + ".safetensors")
    before = snapshot(model)
    with pytest.raises(LoRAFormatError) as exc:
        ResidencyManager(model, loras=[LoRASpec("user", path=path)])
    assert_says(exc, "LoRA 'user'", "cannot read", str(tmp_path / "xxx"), "check the path")
    assert len(str(exc.value)) < 1000, "the message shows the path shortened"
    assert_untouched(model, before)


class _BytesPath:
    def __fspath__(self) -> bytes:
        return b"lora.safetensors"


@pytest.mark.parametrize("path", [b"lora.safetensors", bytearray(b"lora.safetensors"), _BytesPath(), 5, ["x"]],
                         ids=["bytes", "bytearray", "pathlike-of-bytes", "int", "list"])
def test_a_path_that_is_not_text_is_refused(path: Any) -> None:
    with pytest.raises(ConfigError) as exc:
        LoRASpec("user", path=path)
    assert_says(exc, "LoRA 'user'", "path must be a str or a pathlib.Path", f"got {type(path).__name__}",
                "os.fsdecode")


def test_tensors_that_are_not_a_mapping_are_refused(good: Tensors) -> None:
    with pytest.raises(ConfigError) as exc:
        LoRASpec("user", tensors=list(good.items()))  # type: ignore[arg-type]
    assert_says(exc, "LoRA 'user'", "tensors must be a mapping", "got list")


OVERFLOWS = [
    # (model dtype, factor dtype, value): finite in the factor's dtype, Inf in the model's
    (torch.float16, torch.float32, 1e30),
    (torch.float16, torch.float32, 7e4),  # just past float16's largest, 65504
    (torch.bfloat16, torch.float32, 3.4e38),  # rounds past bfloat16's largest
    (torch.bfloat16, torch.float64, 1e300),
    (torch.float32, torch.float64, 1e39),
]


@pytest.mark.parametrize("source", ["file", "memory"])
@pytest.mark.parametrize(("model_dtype", "factor_dtype", "value"), OVERFLOWS,
                         ids=[f"{f}-{v:g}-in-{m}".replace("torch.", "") for m, f, v in OVERFLOWS])
def test_factors_are_checked_in_the_dtype_they_are_applied_in(
    model_dtype: torch.dtype, factor_dtype: torch.dtype, value: float, source: str, base_model: nn.Module,
    good: Tensors, make_spec: Callable[..., LoRASpec],
) -> None:
    model = copy.deepcopy(base_model).to(model_dtype)
    label = "lora_A" if value < 1e38 else "lora_B"
    key = A_KEY if label == "lora_A" else B_KEY
    tensors = {k: v.to(factor_dtype) for k, v in good.items()}
    tensors[key] = _poke(tensors[key], value)
    assert bool(torch.isfinite(tensors[key]).all())
    before = snapshot(model)
    with pytest.raises(LoRAValueError) as exc:
        ResidencyManager(model, loras=[make_spec(tensors, source)], merge_policy="dynamic")
    assert_says(exc, _MODULE, f"{label} holds 1 values that are finite in {factor_dtype}",
                f"overflow to Inf in {model_dtype}", "rescale")
    assert_untouched(model, before)


def test_a_huge_tensor_of_the_wrong_shape_is_refused_from_the_header_alone(model: nn.Module, tmp_path: Path) -> None:
    # a sparse file: a valid header declaring a 12 GiB lora_A, no data on disk. Under a cap of
    # 2 GiB of address space more than now, reading or mapping the tensor fails at once.
    wide = 3 * 2**30 // RANK
    path = sparse_safetensors(tmp_path / "huge.safetensors", {A_KEY: ("F32", (RANK, wide)),
                                                              B_KEY: ("BF16", (128, RANK))})
    assert os.path.getsize(path) > 12 * 2**30
    before = snapshot(model)
    with address_space_limit(2 * 2**30), pytest.raises(LoRAShapeError) as exc:
        ResidencyManager(model, loras=[LoRASpec("user", path=path)])
    assert_says(exc, f"maps {wide} -> 128 features", *_INOUT)
    assert_untouched(model, before)


class _AttentionThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def _pair(module: str, seed: int) -> Tensors:
    gen = torch.Generator().manual_seed(seed)
    return {f"{module}.lora_A.weight": torch.randn(2, 16, generator=gen),
            f"{module}.lora_B.weight": torch.randn(16, 2, generator=gen)}


def test_a_linear_that_its_parent_uses_without_calling_is_refused() -> None:
    # MultiheadAttention reads out_proj.weight in its functional forward, never calling out_proj:
    # a dynamic adapter there would run nowhere
    torch.manual_seed(0)
    net = _AttentionThenLinear()
    before = snapshot(net)
    with pytest.raises(LoRAKeyError) as exc:
        ResidencyManager(net, loras=[LoRASpec("user", tensors=_pair("attn.out_proj", 1))], merge_policy="dynamic")
    assert_says(exc, "module 'attn.out_proj'", "NonDynamicallyQuantizableLinear", "only plain nn.Linear",
                "silently skipped")
    assert_untouched(net, before)


def test_a_plain_linear_next_to_an_attention_takes_a_lora() -> None:
    torch.manual_seed(0)
    net = _AttentionThenLinear()
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = net(x)
    mgr = ResidencyManager(net, loras=[LoRASpec("user", tensors=_pair("proj", 1))], merge_policy="dynamic")
    with mgr.request() as req, torch.no_grad():
        req.enter("stage1")
        adapted = req.enter("stage2")(x)
    assert not torch.allclose(adapted, base)
