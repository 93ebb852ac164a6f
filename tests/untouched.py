"""Proof that a refused call left a model exactly as it was: same parameter bits, same module
tree (no PEFT layer injected, nothing replaced), same hooks, same ``requires_grad`` flags.

    before = snapshot(model)
    ...                                  # the call that must be refused
    assert_model_untouched(before, model)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import nn


@dataclass(frozen=True)
class Snapshot:
    names: list[str]
    sizes: list[int]
    bits: torch.Tensor  # the bytes of every parameter, concatenated (one copy, one compare)
    tree: list[tuple[str, type]]
    hooks: int
    grads: list[bool]


def snapshot(model: nn.Module) -> Snapshot:
    params = list(model.named_parameters())
    raw = [p.detach().contiguous().reshape(-1).view(torch.uint8) for _, p in params]
    return Snapshot(
        names=[n for n, _ in params],
        sizes=[r.numel() for r in raw],
        bits=torch.cat(raw) if raw else torch.empty(0, dtype=torch.uint8),
        tree=[(n, type(m)) for n, m in model.named_modules()],
        hooks=sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        grads=[p.requires_grad for _, p in params],
    )


def assert_model_untouched(before: Snapshot, model: nn.Module, *, peft_free: bool = True) -> None:
    """Same bits, same module tree, same hooks; ``peft_free``: no PEFT layer anywhere."""
    after = snapshot(model)
    assert after.tree == before.tree, "the module tree changed (modules wrapped or replaced)"
    if peft_free:
        wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert not wrapped, f"PEFT layers were injected: {wrapped[:3]}"
    assert after.hooks == before.hooks, "a forward hook was left on the model"
    assert after.names == before.names and after.sizes == before.sizes
    assert after.grads == before.grads, "requires_grad flags changed"
    if not torch.equal(after.bits, before.bits):
        chunks = zip(before.names, before.bits.split(before.sizes), after.bits.split(after.sizes),
                     strict=True)
        differing = [n for n, b, a in chunks if not torch.equal(b, a)]
        raise AssertionError(f"{len(differing)} parameters changed bits, e.g. {differing[:3]}")


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, f"{len(bad)} weights differ, e.g. {bad[:3]}"
