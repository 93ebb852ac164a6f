"""A catalogue of hostile inputs: each must raise a typed error that says what was wrong,
where, and how to fix it, and leave the DiT bit-identical (checked against a host copy).

    python -m ltx2_tools.hostile            # prints the table docs/reliability.md carries
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency import CompileSpec, LoRASpec, ManagerOptions, ResidencyError, ResidencyManager, testing


class _Marker:
    """Unpickling this creates a file: proof that a refused pickle was never unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.path).touch, ())


@dataclass
class Case:
    name: str
    run: Callable[[Env], object]
    #: the model the case runs against, built from the tiny DiT (default: a copy of it)
    model: Callable[[torch.nn.Module], torch.nn.Module] = copy.deepcopy


class _AttentionPool(nn.Module):
    """A module with ``nn.MultiheadAttention``, as text and audio encoders have: its ``out_proj``
    is a Linear subclass whose weight the attention reads without calling its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.proj = nn.Linear(32, 32)


def _attention_pool(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return _AttentionPool().to(torch.bfloat16)


def _float16(base: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(base).to(torch.float16)


_SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


def sparse_safetensors(path: Path, declared: dict[str, tuple[str, tuple[int, ...]]]) -> str:
    """A safetensors file whose valid header declares ``declared`` (key: (dtype, shape)), its data
    a hole of the declared size (a sparse file: nothing on disk, nothing worth reading)."""
    header, offset = {}, 0
    for key, (dtype, shape) in declared.items():
        n = math.prod(shape) * _SAFETENSORS_DTYPES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        fh.truncate(8 + len(blob) + offset)
    return str(path)


@contextlib.contextmanager
def address_space_limit(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes`` (Linux): inside
    the block, reading or mapping a huge file fails at once instead of filling the machine's memory.
    Elsewhere it limits nothing."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
    except (ImportError, OSError):
        yield
        return
    size_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:")))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _huge_sparse_lora(env: Env) -> None:
    # a 12 GiB lora_A of the wrong width: the header alone must refuse it
    module = _first(env, "lora_A.weight").removesuffix(".lora_A.weight")
    rank, out = env.good[f"{module}.lora_B.weight"].shape[1], env.good[f"{module}.lora_B.weight"].shape[0]
    path = sparse_safetensors(env.dir / "huge.safetensors", {
        f"{module}.lora_A.weight": ("F32", (rank, 3 * 2**30 // rank)),
        f"{module}.lora_B.weight": ("BF16", (out, rank)),
    })
    with address_space_limit(2 * 2**30):
        env.manager(env.spec(path=path))


def _with_value(env: Env, key_part: str, dtype: torch.dtype, value: float) -> dict[str, torch.Tensor]:
    def poke(t: torch.Tensor) -> torch.Tensor:
        out = t.to(dtype)
        out[0, 0] = value
        return out
    return env.edited(key_part, poke)


def _attention_lora() -> dict[str, torch.Tensor]:
    return {"attn.out_proj.lora_A.weight": torch.zeros(4, 32), "attn.out_proj.lora_B.weight": torch.zeros(32, 4)}


@dataclass
class Env:
    dir: Path
    model: torch.nn.Module
    good: dict[str, torch.Tensor]
    inputs: dict

    def file(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        path = self.dir / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return str(path)

    def raw(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def manager(self, *specs: LoRASpec, mode: object = "original", merge_policy: object = "sglang",
                **options: Any) -> ResidencyManager:
        """A manager on the model; ``options`` are :class:`ManagerOptions` fields (checked first)."""
        return ResidencyManager(self.model, mode, list(specs) or [self.spec()], merge_policy,  # type: ignore[arg-type]
                                options=ManagerOptions(**options))

    def spec(self, **kw: object) -> LoRASpec:
        args: dict[str, object] = {"name": "distilled", "tensors": self.good}
        args.update(kw)
        if "path" in kw:
            args.pop("tensors")
        return LoRASpec(**args)  # type: ignore[arg-type]

    def only(self, key_part: str) -> dict[str, torch.Tensor]:
        """The good LoRA on the modules whose keys contain ``key_part`` only."""
        return {k: v for k, v in self.good.items() if key_part in k}

    def edited(self, key_part: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(self.good)
        key = next(k for k in out if key_part in k)
        out[key] = fn(out[key])
        return out


def _first(env: Env, suffix: str) -> str:
    return next(k for k in env.good if k.endswith(suffix))


def _pickle_file(env: Env, name: str) -> str:
    marker = env.dir / f"{name}.unpickled"
    return env.raw(name, pickle.dumps({"x": _Marker(str(marker))}, protocol=4))


def _request(env: Env, mgr: ResidencyManager, body: Callable[[object], object]) -> object:
    with mgr.request() as req:
        return body(req)


def _request_timeout_nan(env: Env) -> None:
    with env.manager().request(timeout=float("nan")):
        pass


def _nested(env: Env) -> None:
    mgr = env.manager()
    with mgr.request(), mgr.request():
        pass


CASES: list[Case] = [
    Case("file does not exist", lambda e: e.manager(e.spec(path=e.dir / "nope.safetensors"))),
    Case("directory instead of file", lambda e: e.manager(e.spec(path=e.dir))),
    Case("empty file", lambda e: e.manager(e.spec(path=e.raw("empty.safetensors", b"")))),
    Case("truncated safetensors", lambda e: e.manager(e.spec(
        path=e.raw("cut.safetensors", Path(e.file("full.safetensors", e.good)).read_bytes()[:-100])))),
    Case("corrupt header", lambda e: e.manager(e.spec(
        path=e.raw("bad.safetensors", (64).to_bytes(8, "little") + b"{not json" + b" " * 60)))),
    Case("pickle .bin refused unread", lambda e: e.manager(e.spec(path=_pickle_file(e, "lora.bin")))),
    Case("pickle .pt refused unread", lambda e: e.manager(e.spec(path=_pickle_file(e, "lora.pt")))),
    Case("pickle renamed .safetensors", lambda e: e.manager(e.spec(path=_pickle_file(e, "evil.safetensors")))),
    Case("file with no tensors", lambda e: e.manager(e.spec(path=e.file("none.safetensors", {})))),
    Case("key for a module that does not exist", lambda e: e.manager(e.spec(tensors={
        k.replace("transformer_blocks.0.", "transformer_blocks.9."): v for k, v in e.good.items()}))),
    Case("key targets a norm, not a Linear", lambda e: e.manager(e.spec(tensors={
        "norm_out.lora_A.weight": torch.zeros(4, 128), "norm_out.lora_B.weight": torch.zeros(128, 4)}))),
    Case("not a LoRA key", lambda e: e.manager(e.spec(tensors={**e.good, "proj_in.weight": torch.zeros(2, 2)}))),
    Case("original LTX-2 'diffusion_model.*' keys", lambda e: e.manager(e.spec(tensors={
        "diffusion_model." + k.removeprefix("transformer."): v for k, v in e.good.items()}))),
    Case("missing lora_B", lambda e: e.manager(e.spec(tensors={
        k: v for k, v in e.good.items() if k != _first(e, "lora_B.weight")}))),
    Case("rank mismatch between A and B", lambda e: e.manager(e.spec(
        tensors=e.edited("lora_A", lambda t: t[:-1])))),
    Case("wrong shape (LoRA for another model)", lambda e: e.manager(e.spec(tensors=testing.synthetic_lora(
        tiny_transformer(seed=0, attention_head_dim=16), testing.linear_names(e.model)[:4])))),
    Case("NaN in lora_A", lambda e: e.manager(e.spec(tensors=e.edited(
        "lora_A", lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("nan")))))),
    Case("Inf in lora_B", lambda e: e.manager(e.spec(tensors=e.edited(
        "lora_B", lambda t: t.clone().index_fill_(0, torch.tensor([0]), float("inf")))))),
    Case("integer dtype", lambda e: e.manager(e.spec(tensors=e.edited("lora_A", lambda t: t.to(torch.int32))))),
    Case("duplicate key after prefix strip", lambda e: e.manager(e.spec(tensors={
        **e.good, _first(e, "lora_A.weight").removeprefix("transformer."): e.good[_first(e, "lora_A.weight")]}))),
    Case("negative alpha", lambda e: e.manager(e.spec(tensors={
        **e.good, _first(e, "lora_A.weight").replace("lora_A.weight", "alpha"): torch.tensor(-4.0)}))),
    Case("NaN strength", lambda e: e.spec(strengths={"stage2": float("nan")})),
    Case("Inf strength", lambda e: e.spec(strengths={"stage2": float("inf")})),
    Case("negative strength", lambda e: e.spec(strengths={"stage2": -0.5})),
    Case("unknown phase in strengths", lambda e: e.spec(strengths={"stage3": 1.0})),
    Case("unknown mode", lambda e: e.manager(mode="turbo")),
    Case("unknown merge policy", lambda e: e.manager(merge_policy="sometimes")),
    Case("unknown exact-merge kernel", lambda e: e.manager(exact_kernel="undo")),
    Case("misspelt mode", lambda e: e.manager(mode="snap-shot")),
    Case("one spec instead of a list", lambda e: ResidencyManager(e.model, loras=e.spec())),  # type: ignore[arg-type]
    Case("LoRA name PEFT cannot use", lambda e: e.spec(name="update")),
    Case("unknown phase in enter()", lambda e: _request(e, e.manager(), lambda r: r.enter("stage3"))),
    Case("stage 2 before stage 1", lambda e: _request(e, e.manager(), lambda r: r.enter("stage2"))),
    Case("re-entering a phase", lambda e: _request(e, e.manager(), lambda r: (r.enter("stage1"), r.enter("stage1")))),
    Case("override for an unknown LoRA", lambda e: _request(
        e, e.manager(), lambda r: r.enter("stage1", strengths={"other": 1.0}))),
    Case("NaN override", lambda e: _request(
        e, e.manager(), lambda r: r.enter("stage1", strengths={"distilled": float("nan")}))),
    Case("nested request", _nested),
    Case("DiT run outside a request", lambda e: (e.manager(), e.model(**e.inputs))),
    Case("DiT run before entering a phase", lambda e: _request(e, e.manager(), lambda r: e.model(**e.inputs))),
    # the manager owns what it applies: files and tensors are read into its own checked copies
    Case("strength beyond float range (10**400)", lambda e: e.spec(strengths={"stage2": 10**400})),
    Case("override beyond float range (10**400)", lambda e: _request(
        e, e.manager(), lambda r: r.enter("stage1", strengths={"distilled": 10**400}))),
    Case("float8 factors", lambda e: e.manager(e.spec(tensors=e.edited(
        "lora_A", lambda t: t.to(torch.float8_e4m3fn))))),
    Case("path of 5,000 characters", lambda e: e.manager(e.spec(path="x" * 5000 + ".safetensors"))),
    Case("bytes path", lambda e: e.spec(path=str(e.dir / "lora.safetensors").encode())),
    Case("float32 factor that is Inf in the float16 model", lambda e: e.manager(e.spec(
        tensors=_with_value(e, "lora_A", torch.float32, 1e30))), model=_float16),
    Case("float32 factor that is Inf in the bfloat16 model", lambda e: e.manager(e.spec(
        tensors=_with_value(e, "lora_B", torch.float32, 3.4e38)))),
    Case("float64 factor beyond every model dtype", lambda e: e.manager(e.spec(
        tensors=_with_value(e, "lora_A", torch.float64, 1e300)))),
    Case("sparse 12 GiB file, wrong shape in its header", _huge_sparse_lora),
    Case("LoRA on MultiheadAttention.out_proj", lambda e: e.manager(e.spec(tensors=_attention_lora())),
         model=_attention_pool),
    # manager options: a value of the wrong type is refused, never taken for its truthiness
    Case("strict='no'", lambda e: e.manager(strict="no")),
    Case("low_vram='yes'", lambda e: e.manager(low_vram="yes")),
    Case("native_ltx23=1.0", lambda e: e.manager(native_ltx23=1.0)),
    Case("check_layers='false'", lambda e: e.manager(check_layers="false")),
    Case("activation_reserve_gib=-1", lambda e: e.manager(activation_reserve_gib=-1)),
    Case("activation_reserve_gib=inf", lambda e: e.manager(mode="auto", activation_reserve_gib=float("inf"))),
    Case("trace_maxlen=0", lambda e: e.manager(trace_maxlen=0)),
    Case("trace_maxlen=True", lambda e: e.manager(trace_maxlen=True)),
    Case("request_timeout=nan", lambda e: e.manager(request_timeout=float("nan"))),
    Case("faults that are not a FaultInjector", lambda e: e.manager(faults=object())),
    Case("loras as a generator", lambda e: ResidencyManager(e.model, loras=(s for s in [e.spec()]))),  # type: ignore[arg-type]
    Case("merge_policy that is not a str", lambda e: e.manager(merge_policy=1)),
    Case("request(timeout=nan)", _request_timeout_nan),
    # a compiled DiT: the wrapper torch.compile returns, what torch cannot compile with
    Case("torch.compile(transformer)'s wrapper", lambda e: ResidencyManager(
        torch.compile(e.model, backend="aot_eager"), loras=[e.spec()])),
    Case("compile backend this torch lacks", lambda e: e.manager().compile(CompileSpec(backend="nosuch"))),
    Case("compile mode that does not exist", lambda e: e.manager().compile("fastest")),
    Case("resident copy of a DiT compiled by other means", lambda e: (
        e.model.compile(backend="aot_eager"), e.manager(mode="resident"))),
    # LoRAs added and chosen per request
    Case("add_lora(a dict)", lambda e: e.manager().add_lora({"name": "style"})),  # type: ignore[arg-type]
    Case("add_lora under a registered name", lambda e: e.manager().add_lora(e.spec())),
    Case("add_lora above the slots' rank", lambda e: e.manager(lora_slot_rank=2).add_lora(e.spec(name="style"))),
    Case("add_lora on layers not managed", lambda e: e.manager(e.spec(tensors=e.only("attn1"))).add_lora(
        e.spec(name="style"))),
    Case("request(loras=) naming no registered LoRA", lambda e: e.manager().request(loras={"style": 1.0})),
    Case("request(loras=) with a negative strength", lambda e: e.manager().request(loras={"distilled": -1.0})),
    Case("request(loras=) with an unknown phase", lambda e: e.manager().request(
        loras={"distilled": {"stage3": 1.0}})),
    Case("remove_lora of no registered LoRA", lambda e: e.manager().remove_lora("style")),
]


@dataclass
class Row:
    case: str
    error: str
    message: str
    untouched: bool
    typed: bool


def run_case(case: Case, base: torch.nn.Module, good: dict[str, torch.Tensor]) -> Row:
    with tempfile.TemporaryDirectory() as tmp:
        model = case.model(base)
        env = Env(Path(tmp), model, good, tiny_inputs(base))
        before = testing.weight_bits(dict(model.named_parameters()))
        try:
            with torch.no_grad():
                case.run(env)
            error, message, typed = "none", "(accepted!)", False
        except ResidencyError as exc:
            error, message, typed = type(exc).__name__, str(exc), True
        except Exception as exc:
            error, message, typed = type(exc).__name__, str(exc), False
        # parameter names gain '.base_layer.' once PEFT wraps a module: compare by tensor order
        after = testing.weight_bits({n.replace(".base_layer", ""): p for n, p in model.named_parameters()
                             if ".lora_" not in n})
        untouched = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
        unpickled = list(Path(tmp).glob("*.unpickled"))
    # stable text for the docs: no temp paths, no request counters
    message = message.replace(tmp, "<tmp>").replace(str(Path.cwd()), "<cwd>")
    message = re.sub(r"request \d+", "request <n>", message)
    return Row(case.name, error, message, untouched and not unpickled, typed)


def catalogue() -> list[Row]:
    base = tiny_transformer(seed=0, num_layers=1)
    good = testing.synthetic_lora(base, testing.linear_names(base), rank=4, relative_norm=0.1, seed=1)
    return [run_case(c, base, good) for c in CASES]


def render(rows: list[Row]) -> str:
    lines = ["| # | hostile input | error | untouched | message (start) |", "| --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows, 1):
        msg = r.message.replace("|", "\\|").replace("\n", " ")
        msg = msg if len(msg) <= 140 else msg[:137] + "..."
        lines.append(f"| {i} | {r.case} | `{r.error}` | {'yes' if r.untouched else 'NO'} | {msg} |")
    ok = sum(r.typed and r.untouched for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} hostile inputs tried: {ok} raised a typed `ResidencyError` with the "
                 f"model bit-identical afterwards.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .docblock import replace_block

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, help="replace the hostile block of this markdown file")
    args = ap.parse_args(argv)
    rows = catalogue()
    table = render(rows)
    print(table)
    if args.write:
        args.write.write_text(replace_block(args.write.read_text(), "hostile", table))
    return 0 if all(r.typed and r.untouched for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
