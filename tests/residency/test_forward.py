"""Our dynamic forward (ops/forward): both forms against a float64 reference, the crossover at
LTX-2's shapes, which layers it may stand in for, and the manager running it on the tiny DiT
next to PEFT's forward and diffusers' ``set_adapters``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from peft.tuners.lora import LoraLayer
from torch import nn

from ltx2_residency import ConfigError, FaultInjector, LoRASpec, RequestStateError, ResidencyManager, WeightState
from ltx2_residency.ops.forward import (
    CallSize,
    FusedForward,
    FusedLoRALinear,
    LoRADelta,
    eager_forward,
    fusable,
    has_fused,
    merge_above_tokens,
)
from ltx2_residency.testing import weight_bits
from strategies import fused_linear_cases
from untouched import assert_same_bits

# One bf16 rounding of a value v is |v|·2^-9 at most; the reference is float64 on the same bf16
# inputs, and each form rounds a few intermediates (the product, h, W', the output).
BF16_RTOL = 2.0**-6


def _reference(x: torch.Tensor, base: nn.Linear, deltas: list[LoRADelta]) -> torch.Tensor:
    w = base.weight.double()
    for d in deltas:
        w = w + d.scale * d.lora_B.double() @ d.lora_A.double()
    y = x.double() @ w.t()
    return y + base.bias.double() if base.bias is not None else y


def _layer(out: int, inp: int, ranks: list[int], bias: bool, seed: int) -> tuple[nn.Linear, list[LoRADelta]]:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(inp, out, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out, inp, generator=g) / inp**0.5)
        if bias:
            base.bias.copy_(torch.randn(out, generator=g))
    deltas = [LoRADelta(torch.randn(r, inp, generator=g).bfloat16() / inp**0.5,
                        torch.randn(out, r, generator=g).bfloat16() * 0.1, scale=0.5 + i)
              for i, r in enumerate(ranks)]
    return base, deltas


@pytest.mark.parametrize("merge_above", [0.0, float("inf")], ids=["transient-merge", "factored"])
@given(case=fused_linear_cases)
def test_both_forms_match_float64_and_only_read_the_weight(case: dict[str, Any], merge_above: float) -> None:
    base, deltas = _layer(case["out"], case["inp"], case["ranks"], case["bias"], case["seed"])
    x = torch.randn(*case["lead"], case["inp"], generator=torch.Generator().manual_seed(case["seed"])).bfloat16()
    before = weight_bits({"w": base.weight})
    y = FusedLoRALinear(base, deltas, merge_above=merge_above)(x)
    assert y.shape == (*case["lead"], case["out"]) and y.dtype == torch.bfloat16
    ref = _reference(x, base, deltas)
    plain = torch.nn.functional.linear(x.double(), base.weight.double(),
                                       None if base.bias is None else base.bias.double())
    # roundings are relative to the intermediates: the base product and the LoRA term
    scale = plain.abs().max().item() + (ref - plain).abs().max().item() + 1e-3
    assert (y.double() - ref).abs().max().item() <= BF16_RTOL * scale
    assert_same_bits(before, weight_bits({"w": base.weight}))


def _count_rebuilds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every transient merge (the one ``torch.addmm`` of our forward) appends to the list returned."""
    calls: list[str] = []
    real_addmm = torch.addmm

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append("merge")
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy)
    return calls


def test_the_form_follows_the_token_count(monkeypatch: pytest.MonkeyPatch) -> None:
    base, deltas = _layer(64, 48, [8], True, seed=3)
    fwd = FusedLoRALinear(base, deltas, merge_above=10)
    calls = _count_rebuilds(monkeypatch)
    fwd(torch.randn(2, 5, 48).bfloat16())  # 10 tokens: not above the crossover
    assert calls == []
    fwd(torch.randn(11, 48).bfloat16())
    assert calls == ["merge"]


def test_a_host_bound_small_call_rebuilds_every_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    base, deltas = _layer(64, 48, [8], True, seed=4)
    call = CallSize(limit=1536)
    fwd = FusedLoRALinear(base, deltas, merge_above=float("inf"), call=call)  # the roofline: never rebuild
    stage1, stage2 = torch.zeros(1, 1536, 128), torch.zeros(2, 6144, 128)
    call.note(nn.Identity(), (), {"hidden_states": stage1})
    assert call.small
    call.note(nn.Identity(), (stage2,), {})
    assert not call.small
    call.note(nn.Identity(), (), {"timestep": 3})
    assert not call.small
    calls = _count_rebuilds(monkeypatch)
    x = torch.randn(3, 48).bfloat16()
    fwd(x)
    assert calls == []
    call.small = True  # the DiT call is small: even a 3-token layer rebuilds (one launch, not two)
    y = fwd(x)
    assert calls == ["merge"]
    monkeypatch.undo()
    assert torch.equal(y, FusedLoRALinear(base, deltas, merge_above=0.0)(x))  # the transient-merge form


def test_the_call_size_hook_is_registered_once_and_only_steers_gpu_layers(
        fresh_model: Callable[[], nn.Module], distilled_path: str, inputs: dict[str, Any]) -> None:
    model = fresh_model()
    mgr = _manager(model, distilled_path, "fused")
    hooks = len(model._forward_pre_hooks)
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        dit = req.enter("stage2")
        assert len(model._forward_pre_hooks) == hooks
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert all(eager_forward(m).call is None for m in layers)  # on the CPU the roofline alone decides
        dit(**inputs)
    # registered with the adapters and kept: a hook added or removed on a compiled DiT is a new graph
    assert len(model._forward_pre_hooks) == hooks
    mgr.close()
    assert len(model._forward_pre_hooks) == hooks - 2  # the guard's own hook goes too
    strategy = FusedForward(host_bound_tokens=10)
    strategy.begin(model)
    strategy.begin(model)  # idempotent: one hook
    assert len(model._forward_pre_hooks) == hooks - 1
    strategy.end()
    assert len(model._forward_pre_hooks) == hooks - 1 and not strategy.call.small
    strategy.release()
    assert len(model._forward_pre_hooks) == hooks - 2


def test_crossover_at_ltx2_shapes_sits_between_the_two_stages() -> None:
    # Stage 1 runs 1536 video tokens, stage 2 6144: the video layers rebuild their weight in
    # stage 2 only; the audio layers (~126 tokens) and prompt projections (1024) stay factored.
    for out, inp in ((4096, 4096), (16384, 4096), (4096, 16384)):
        assert 1536 < merge_above_tokens(out, inp, [384]) < 6144
    for out, inp in ((2048, 2048), (8192, 2048)):
        assert merge_above_tokens(out, inp, [384]) > 1024
    assert merge_above_tokens(64, 64, []) == float("inf")
    # a second LoRA on the layer rebuilds W' once more but doubles the factored work too
    one, two = merge_above_tokens(4096, 4096, [384]), merge_above_tokens(4096, 4096, [384, 384])
    assert two == pytest.approx(one, rel=0.2)


def test_fusable_refuses_what_it_would_skip(model: nn.Module, distilled_path: str) -> None:
    spec = LoRASpec("distilled", path=distilled_path, strengths={"stage1": 0.0, "stage2": 1.0})
    ResidencyManager(model, loras=[spec], merge_policy="dynamic")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(fusable(m, ["distilled"]) for m in layers)
    hooked, patched, dropout = layers[:3]
    hooked.get_base_layer().register_forward_hook(lambda *a: None)
    patched.get_base_layer().forward = lambda x: x  # type: ignore[method-assign]
    dropout.lora_dropout["distilled"] = nn.Dropout(0.1)
    assert not any(fusable(m, ["distilled"]) for m in (hooked, patched, dropout))


# ---------------------------------------------------------------------------- through the manager
def _manager(model: nn.Module, path: str, forward: str, **kw: Any) -> ResidencyManager:
    spec = LoRASpec("distilled", path=path, strengths={"stage1": 0.0, "stage2": 1.0})
    return ResidencyManager(model, loras=[spec], merge_policy="dynamic", dynamic_forward=forward, **kw)


def _stage2(mgr: ResidencyManager, inputs: dict[str, Any], strength: float = 1.0) -> torch.Tensor:
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        dit = req.enter("stage2", strengths={"distilled": strength})
        assert mgr.state is WeightState.STAGE2_DYNAMIC
        return dit(**inputs)[0]


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_fused_matches_peft_forward_and_leaves_nothing_behind(
    fresh_model: Callable[[], nn.Module], base_model: nn.Module, distilled_path: str, inputs: dict[str, Any],
    strength: float,
) -> None:
    model = fresh_model()
    mgr = _manager(model, distilled_path, "fused")
    clean = weight_bits(mgr.managed_weights)
    ours = _stage2(mgr, inputs, strength)
    peft = _stage2(_manager(fresh_model(), distilled_path, "peft"), inputs, strength)
    with torch.no_grad():
        base = base_model(**inputs)[0]
    # merged vs dynamic tolerance of test_equivalence: bf16 roundings differ, nothing else
    # (measured: max 0.016, mean 0.0026 against a LoRA effect of mean 0.024 at strength 0.5)
    torch.testing.assert_close(ours, peft, atol=2**-5, rtol=0)
    gap, effect = (ours - peft).float().abs().mean(), (peft - base).float().abs().mean()
    assert gap < effect / 5, "ours and PEFT's differ by more than rounding, or the LoRA had no effect"
    assert mgr.state is WeightState.CLEAN
    assert not any(has_fused(m) for m in model.modules() if isinstance(m, LoraLayer))
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()  # lifts the forward guard: the bare model runs the base path again, bit for bit
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], base)


def test_fused_runs_without_enabling_peft_adapters(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                                   inputs: dict[str, Any]) -> None:
    model = fresh_model()
    mgr = _manager(model, distilled_path, "fused")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
        assert all(has_fused(m) and m.disable_adapters for m in layers)


@pytest.mark.parametrize(("point", "on_hit"), [("attach.layer", 3), ("attach.after", 1), ("detach.layer", 3)])
def test_a_fault_part_way_is_swept(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                   inputs: dict[str, Any], point: str, on_hit: int) -> None:
    faults = FaultInjector()
    model = fresh_model()
    mgr = _manager(model, distilled_path, "fused", faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm(point, lambda: RuntimeError("device lost"), on_hit=on_hit)
    with pytest.raises(RuntimeError, match="device lost"):
        _stage2(mgr, inputs)
    if mgr.state is WeightState.QUARANTINED:
        mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert not any(has_fused(m) for m in model.modules() if isinstance(m, LoraLayer))
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    torch.testing.assert_close(_stage2(mgr, inputs), _stage2(_manager(fresh_model(), distilled_path, "peft"), inputs),
                               atol=2**-5, rtol=0)


def test_set_dynamic_forward(fresh_model: Callable[[], nn.Module], distilled_path: str) -> None:
    mgr = _manager(fresh_model(), distilled_path, "fused")
    assert mgr.dynamic_forward == "fused"
    with pytest.raises(ConfigError, match="dynamic_forward"):
        mgr.set_dynamic_forward("triton")
    with pytest.raises(ConfigError, match="dynamic_forward"):
        _manager(fresh_model(), distilled_path, "fast")
    with mgr.request(), pytest.raises(RequestStateError, match="between requests"):
        mgr.set_dynamic_forward("peft")
    assert mgr.dynamic_forward == "fused"
    mgr.set_dynamic_forward(" PEFT ")
    assert mgr.dynamic_forward == "peft"


@pytest.mark.gpu
@pytest.mark.parametrize("merge_above", [0.0, float("inf")], ids=["transient-merge", "factored"])
def test_both_forms_at_ltx2_size_on_the_gpu(merge_above: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(4096, 16384, device="cuda", dtype=torch.bfloat16)
    delta = LoRADelta(torch.randn(384, 4096, device="cuda").bfloat16() / 64,
                      torch.randn(16384, 384, device="cuda").bfloat16() / 200, scale=1.0)
    x = torch.randn(1, 6144, 4096, device="cuda").bfloat16()
    before = weight_bits({"w": base.weight})
    with torch.no_grad():
        y = FusedLoRALinear(base, [delta], merge_above=merge_above)(x).float()
        w = base.weight.float() + delta.lora_B.float() @ delta.lora_A.float()
        ref = torch.nn.functional.linear(x.float(), w, base.bias.float())
        plain = torch.nn.functional.linear(x.float(), base.weight.float(), base.bias.float())
    gap, effect = (y - ref).abs().mean().item(), (plain - ref).abs().mean().item()
    assert gap < effect / 20, (gap, effect)  # bf16 rounding only, against a LoRA effect it would hide
    assert_same_bits(before, weight_bits({"w": base.weight}))


def test_a_layers_forward_is_kept_across_phases_while_it_is_still_valid(model: nn.Module,
                                                                        distilled_path: str) -> None:
    spec = LoRASpec("distilled", path=distilled_path, strengths={"stage1": 0.0, "stage2": 1.0})
    ResidencyManager(model, loras=[spec], merge_policy="dynamic")
    first, second = [m for m in model.modules() if isinstance(m, LoraLayer)][:2]
    strategy = FusedForward()

    def attach(layer: LoraLayer, strength: float) -> FusedLoRALinear:
        assert strategy.attach(layer, {"distilled": strength}) is False  # ours, not PEFT's
        assert has_fused(layer)
        fwd = eager_forward(layer)
        FusedForward.detach(layer)
        assert isinstance(fwd, FusedLoRALinear) and not has_fused(layer)
        return fwd

    kept = attach(first, 1.0)
    assert attach(first, 1.0) is kept  # the next phase at the same strength: no rebuild
    assert attach(first, 0.5) is not kept and attach(first, 0.5).deltas[0].scale == pytest.approx(
        kept.deltas[0].scale / 2)
    again = attach(second, 1.0)
    lora_a = second.lora_A["distilled"].weight
    lora_a.data = lora_a.detach().clone()  # a move rebinds .data: the kept transposed view is stale
    fresh = attach(second, 1.0)
    assert fresh is not again and fresh.factors[0][0].data_ptr() == lora_a.data_ptr()
    second.get_base_layer().register_forward_pre_hook(lambda *a: None)  # a hook now: PEFT's forward
    assert strategy.attach(second, {"distilled": 1.0}) is True and not has_fused(second)
