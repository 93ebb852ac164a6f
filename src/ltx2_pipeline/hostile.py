"""A catalogue of hostile inputs: each must raise a typed error that says what was wrong,
where, and how to fix it, and leave the DiT bit-identical (checked against a host copy).

    python -m ltx2_pipeline.hostile            # prints the table docs/reliability.md carries
"""

from __future__ import annotations

import copy
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ltx2_residency import LoRASpec, ResidencyError, ResidencyManager
from ltx2_residency.testing import linear_names, synthetic_lora, weight_bits

from .tiny import tiny_inputs, tiny_transformer


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

    def manager(self, *specs: LoRASpec, **kw: object) -> ResidencyManager:
        return ResidencyManager(self.model, loras=list(specs) or [self.spec()], **kw)  # type: ignore[arg-type]

    def spec(self, **kw: object) -> LoRASpec:
        args: dict[str, object] = {"name": "distilled", "tensors": self.good}
        args.update(kw)
        if "path" in kw:
            args.pop("tensors")
        return LoRASpec(**args)  # type: ignore[arg-type]

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
    Case("wrong shape (LoRA for another model)", lambda e: e.manager(e.spec(tensors=synthetic_lora(
        tiny_transformer(seed=0, attention_head_dim=16), linear_names(e.model)[:4])))),
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
    Case("unknown restore strategy", lambda e: e.manager(restore="undo")),
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
        model = copy.deepcopy(base)
        env = Env(Path(tmp), model, good, tiny_inputs(base))
        before = weight_bits(dict(model.named_parameters()))
        try:
            with torch.no_grad():
                case.run(env)
            error, message, typed = "none", "(accepted!)", False
        except ResidencyError as exc:
            error, message, typed = type(exc).__name__, str(exc), True
        except Exception as exc:
            error, message, typed = type(exc).__name__, str(exc), False
        # parameter names gain '.base_layer.' once PEFT wraps a module: compare by tensor order
        after = weight_bits({n.replace(".base_layer", ""): p for n, p in model.named_parameters()
                             if ".lora_" not in n})
        untouched = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
        unpickled = list(Path(tmp).glob("*.unpickled"))
    # stable text for the docs: no temp paths, no request counters
    message = message.replace(tmp, "<tmp>").replace(str(Path.cwd()), "<cwd>")
    message = re.sub(r"request \d+", "request <n>", message)
    return Row(case.name, error, message, untouched and not unpickled, typed)


def catalogue() -> list[Row]:
    base = tiny_transformer(seed=0, num_layers=1)
    good = synthetic_lora(base, linear_names(base), rank=4, relative_norm=0.1, seed=1)
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

    from .reliability import replace_block

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
