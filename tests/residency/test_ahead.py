"""Merging ahead (``Request.prepare``): stage 2's merge launched block by block behind stage 1's
last DiT calls. It must give the very bits of the usual switch, leave stage 1's last call on the
base weights, refuse what would run on half-merged weights, and roll back from any failure.

On the CPU each block's group merges inline in the block's hook; the GPU test at the end runs the
real side stream at LTX-2 layer sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltx2_residency import (
    ConfigError,
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    LoRAValueError,
    PhaseOrderError,
    RequestStateError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.ops.ahead import OUTSIDE, block_of, by_block
from ltx2_residency.testing import synthetic_lora, weight_bits
from untouched import assert_same_bits

RESTORES = ["recompute", "fused"]
STRENGTHS = {"stage1": 0.0, "stage2": 1.0}  # the distilled recipe: stage 1 on the base weights


def device_for(restore: str) -> str:
    """``fused`` runs compiled on a GPU (with its real side stream), else in the CPU interpreter."""
    return "cuda" if restore == "fused" and torch.cuda.is_available() else "cpu"


def make(model: nn.Module, path: str, restore: str = "recompute", **kw) -> ResidencyManager:
    kw.setdefault("merge_policy", "merge")
    model.to(device_for(restore))
    return ResidencyManager(model, loras=[LoRASpec("distilled", path, STRENGTHS)], restore=restore, **kw)


def moved(inputs: dict, restore: str) -> dict:
    return {k: v.to(device_for(restore)) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def clean_bits(mgr: ResidencyManager) -> dict:
    mgr.synchronize()  # an overlapped undo (GPU) settles before the weights are read
    return weight_bits(mgr.managed_weights)


def usual(fresh_model, path, inputs, restore, strengths=None) -> tuple[dict, torch.Tensor]:
    """The merged stage-2 weights and stage-2 output of the usual switch."""
    mgr = make(fresh_model(), path, restore)
    inputs = moved(inputs, restore)
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        dit = req.enter("stage2", strengths=strengths)
        return weight_bits(mgr.managed_weights), dit(**inputs)[0]


def events(mgr: ResidencyManager) -> list[str]:
    return [r.event for r in mgr.trace]


def test_block_of_names_the_numbered_block() -> None:
    assert block_of("transformer_blocks.7.attn1.to_q") == "transformer_blocks.7"
    assert block_of("audio.blocks.12.ff.net.0.proj") == "audio.blocks.12"
    assert block_of("proj_out") == OUTSIDE
    assert block_of("7") == OUTSIDE  # a bare number names the layer, not a block

    class T:
        def __init__(self, name: str) -> None:
            self.name = name

    groups = by_block([T(n) for n in ("b.1.x", "b.0.x", "b.1.y", "out", "b.0.y")])  # type: ignore[misc]
    assert {k: [t.name for t in v] for k, v in groups.items()} == {
        "b.1": ["b.1.x", "b.1.y"], "b.0": ["b.0.x", "b.0.y"], OUTSIDE: ["out"]}


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.parametrize("calls", [1, 2])  # 2: checked behind the first (fused), written behind the last
def test_merge_ahead_gives_the_usual_bits_and_the_announced_calls_run_on_the_base(
        fresh_model, distilled_path, inputs, restore, calls) -> None:
    want_weights, want_out = usual(fresh_model, distilled_path, inputs, restore)
    mgr = make(fresh_model(), distilled_path, restore)
    inputs = moved(inputs, restore)
    clean = weight_bits(mgr.managed_weights)
    with torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        base_out = dit(**inputs)[0]
        assert req.calls == 1
        assert req.prepare("stage2", calls=calls) is True
        assert mgr.state is WeightState.MERGING_AHEAD
        ahead = mgr._executor.ahead
        assert ahead is not None and ahead.recorded_ahead is (restore == "fused" and calls > 1)
        for _ in range(calls):
            # nothing written before the last call (a check only reads the weights)
            assert_same_bits(clean, weight_bits(mgr.managed_weights))
            assert torch.equal(dit(**inputs)[0], base_out)  # each block merged after the last call had passed it
        with pytest.raises(ForwardGuardError, match="announced"):
            dit(**inputs)  # a call beyond those announced would see merged weights
        assert mgr.state is WeightState.MERGING_AHEAD
        out = req.enter("stage2")(**inputs)[0]
        assert mgr.state is WeightState.STAGE2_MERGED
        assert_same_bits(want_weights, weight_bits(mgr.managed_weights))
        assert torch.equal(out, want_out)
    assert_same_bits(clean, clean_bits(mgr))
    assert mgr.state is WeightState.CLEAN
    undo = "restore_behind" if mgr.overlap_restore else "restore"  # CUDA + fused: the undo on the side stream
    assert events(mgr) == ["merge_ahead", "merge", "merged_stage2", undo, "restored"]


@pytest.mark.parametrize(("calls", "at_switch", "trace"), [
    (3, None, ["merge_ahead", "merge", "merged_stage2"]),  # fewer calls than announced: the switch merges the rest
    (1, {"distilled": 0.5}, ["merge_ahead", "restore", "restored", "merge"]),  # other strengths: undone, then as usual
])
def test_the_switch_completes_or_replaces_what_was_started(fresh_model, distilled_path, inputs, calls, at_switch,
                                                           trace) -> None:
    want_weights, want_out = usual(fresh_model, distilled_path, inputs, "recompute", at_switch)
    mgr = make(fresh_model(), distilled_path)
    clean = weight_bits(mgr.managed_weights)
    with torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2", calls=calls)
        dit(**inputs)
        if calls > 1:
            assert_same_bits(clean, weight_bits(mgr.managed_weights))  # calls still to come
        out = req.enter("stage2", strengths=at_switch)(**inputs)[0]
        assert_same_bits(want_weights, weight_bits(mgr.managed_weights))
        assert torch.equal(out, want_out)
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    assert events(mgr)[:len(trace)] == trace


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.parametrize(("on_hit", "calls"), [(1, 1), (7, 1), (40, 1), (7, 2)])  # 2: checked ahead first
def test_a_fault_part_way_through_the_last_call_rolls_back_exactly(
        fresh_model, distilled_path, inputs, restore, on_hit, calls) -> None:
    faults = FaultInjector()
    mgr = make(fresh_model(), distilled_path, restore, faults=faults)
    inputs = moved(inputs, restore)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("merge.layer", lambda: RuntimeError("boom"), on_hit=on_hit)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2", calls=calls)
        for _ in range(calls):
            dit(**inputs)
        req.enter("stage2")  # reached only when the fault falls after the last call (the switch's part)
    assert_same_bits(clean, clean_bits(mgr))
    assert mgr.state is WeightState.CLEAN
    with torch.no_grad(), mgr.request() as req:  # the next request runs as usual
        req.enter("stage1")
        assert req.prepare("stage2")
        req.enter("stage2")
    assert_same_bits(clean, clean_bits(mgr))


def test_a_failure_between_the_last_call_and_the_switch_rolls_back(fresh_model, distilled_path, inputs) -> None:
    mgr = make(fresh_model(), distilled_path)
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(RuntimeError, match="upsampler"), torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2")
        dit(**inputs)
        assert clean.keys() == weight_bits(mgr.managed_weights).keys()
        raise RuntimeError("upsampler failed")
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy: on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("calls", [1, 2])
def test_a_non_finite_merge_ahead_is_a_lora_error_and_rolls_back(fresh_model, distilled_path, inputs,
                                                                  restore, calls) -> None:
    mgr = make(fresh_model(), distilled_path, restore)
    inputs = moved(inputs, restore)
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(LoRAValueError, match="non-finite"), torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2", strengths={"distilled": 1e300}, calls=calls)
        for _ in range(calls):  # recompute finds it in the block's hook; fused at the switch's one sync
            dit(**inputs)
        req.enter("stage2", strengths={"distilled": 1e300})
    assert_same_bits(clean, clean_bits(mgr))
    assert mgr.state is WeightState.CLEAN


def test_prepare_starts_nothing_where_no_merge_into_the_shared_dit_follows(fresh_model, distilled_path,
                                                                            inputs) -> None:
    for kw in ({"merge_policy": "dynamic"}, {"mode": "resident"}, {"mode": "snapshot", "low_vram": False}):
        mgr = make(fresh_model(), distilled_path, **kw)
        with torch.no_grad(), mgr.request() as req:
            dit = req.enter("stage1")
            assert req.prepare("stage2") is False, kw
            dit(**inputs)
            dit(**inputs)  # no call limit when nothing was started
            req.enter("stage2")(**inputs)
        assert "merge_ahead" not in events(mgr)
    hq = ResidencyManager(fresh_model(), loras=[LoRASpec("distilled", distilled_path, {"stage1": 0.25,
                                                                                       "stage2": 0.5})],
                          merge_policy="merge")
    with torch.no_grad(), hq.request() as req:
        req.enter("stage1")
        assert hq.state is WeightState.STAGE1_MERGED
        assert req.prepare("stage2") is False  # stage 1's own merge is on the weights
        req.enter("stage2")


def test_prepare_refuses_bad_calls_and_order_and_leaves_the_dit_alone(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    clean = weight_bits(mgr.managed_weights)
    with mgr.request() as req:
        with pytest.raises(PhaseOrderError, match="cannot prepare 'stage2'"):
            req.prepare("stage2")
        with pytest.raises(PhaseOrderError, match="only while the phase before it runs"):
            req.prepare("stage1")  # nothing runs before stage 1
        req.enter("stage1")
        with pytest.raises(PhaseOrderError, match="cannot prepare 'stage1'"):
            req.prepare("stage1")
        for bad in (0, -1, True, 1.5, "1"):
            with pytest.raises(ConfigError, match="calls must be a positive int"):
                req.prepare("stage2", calls=bad)  # type: ignore[arg-type]
        assert mgr.state is WeightState.CLEAN
        assert req.prepare("stage2")
        assert req.prepare("stage2") is False  # once per request
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


class _BlockTwice(nn.Module):
    """A toy DiT whose forward runs its first block twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.transformer_blocks[0]
        return self.transformer_blocks[1](first(first(x)))


def test_a_block_that_runs_twice_in_the_last_call_is_refused_before_it_runs_merged() -> None:
    model = _BlockTwice()
    names = ["transformer_blocks.0.0", "transformer_blocks.1.0"]
    spec = LoRASpec("distilled", tensors=synthetic_lora(model, names, rank=4, relative_norm=0.1), strengths=STRENGTHS)
    mgr = ResidencyManager(model, loras=[spec], merge_policy="merge")
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(ForwardGuardError, match="ran again"), torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2")
        dit(torch.ones(2, 16))
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


class _Deep(nn.Module):
    """A toy DiT of 12 blocks (names sort 0, 1, 10, 11, 2, ...: not the order they run in), run
    forwards or backwards."""

    def __init__(self, backwards: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
                                                for _ in range(12))
        self.backwards = backwards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (self.transformer_blocks[::-1] if self.backwards else self.transformer_blocks):
            x = x + block(x)
        return x


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.parametrize("backwards", [False, True])
def test_blocks_merge_in_the_order_they_run_whatever_their_names_sort_to(restore, backwards) -> None:
    device = device_for(restore)
    names = [n for n, m in _Deep().named_modules() if isinstance(m, nn.Linear)]
    tensors = synthetic_lora(_Deep().to(torch.bfloat16), names, rank=4, relative_norm=0.1)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    model = _Deep(backwards).to(device, torch.bfloat16)
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", tensors=tensors, strengths=STRENGTHS)],
                           merge_policy="merge", restore=restore)
    clean = weight_bits(mgr.managed_weights)
    results = []
    for ahead in (False, True, True, False):  # records sized by the merge before, in either order
        with torch.no_grad(), mgr.request() as req:
            dit = req.enter("stage1")
            base = dit(x)
            if ahead:
                assert req.prepare("stage2")
            assert torch.equal(dit(x), base)
            out = req.enter("stage2")(x)
            results.append((weight_bits(mgr.managed_weights), out))
        assert_same_bits(clean, clean_bits(mgr))
    for merged, out in results[1:]:
        assert_same_bits(results[0][0], merged)
        assert torch.equal(results[0][1], out)


@pytest.mark.parametrize("restore", RESTORES)
@pytest.mark.parametrize(("calls", "first_guess"), [(1, None), (1, 0.0), (2, None), (2, 0.0)])  # 0.0: no room
def test_with_two_loras_on_the_same_layers_the_undo_is_exact(monkeypatch, restore, calls, first_guess) -> None:
    if first_guess is not None:
        from ltx2_residency.ops import fused
        monkeypatch.setattr(fused, "FIRST_GUESS", first_guess)
    device = device_for(restore)
    names = [n for n, m in _Deep().named_modules() if isinstance(m, nn.Linear)]
    specs = [LoRASpec(name, tensors=synthetic_lora(_Deep().to(torch.bfloat16), names, rank=4, relative_norm=0.1,
                                                   seed=seed), strengths=STRENGTHS)
             for seed, name in enumerate(("distilled", "style"))]
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    mgr = ResidencyManager(_Deep().to(device, torch.bfloat16), loras=specs, merge_policy="merge", restore=restore)
    clean = weight_bits(mgr.managed_weights)
    results = []
    for ahead in (False, True):
        with torch.no_grad(), mgr.request() as req:
            dit = req.enter("stage1")
            if ahead:
                assert req.prepare("stage2", calls=calls)
            for _ in range(calls):
                dit(x)
            out = req.enter("stage2")(x)
            results.append((weight_bits(mgr.managed_weights), out))
        assert_same_bits(clean, clean_bits(mgr))  # the later LoRA's records are taken over the earlier's
    assert_same_bits(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.gpu
def test_merge_ahead_on_the_side_stream_gives_the_usual_bits_at_ltx2_layer_sizes() -> None:
    if not torch.cuda.is_available():
        pytest.skip("the side stream needs a GPU")

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(4096, 4096), nn.GELU(), nn.Linear(4096, 4096)) for _ in range(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.transformer_blocks:
                x = x + block(x)
            return x

    torch.manual_seed(0)
    base = Blocks().to("cuda", torch.bfloat16)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    tensors = synthetic_lora(base, names, rank=384, relative_norm=0.1)
    x = torch.randn(1536, 4096, device="cuda", dtype=torch.bfloat16)
    results = []
    for ahead in (0, 1, 2):  # calls announced (2: checked behind the first, written behind the second)
        model = Blocks().to("cuda", torch.bfloat16)
        model.load_state_dict(base.state_dict())
        mgr = ResidencyManager(model, loras=[LoRASpec("distilled", tensors=tensors, strengths=STRENGTHS)],
                               merge_policy="merge")
        assert mgr.exact_kernel == "fused" and mgr.overlap_restore
        clean = weight_bits(mgr.managed_weights)
        with torch.no_grad(), mgr.request() as req:
            dit = req.enter("stage1")
            first = dit(x)
            if ahead:
                assert req.prepare("stage2", calls=ahead)
            caller = torch.cuda.current_stream()
            for _ in range(max(1, ahead)):
                last = dit(x)  # announced calls run on the urgent stream, then hand back to the caller's
                assert torch.cuda.current_stream() == caller
            out = req.enter("stage2")(x)
            merged = weight_bits(mgr.managed_weights)
        mgr.synchronize()
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
        assert torch.equal(first, last)
        results.append((merged, out))
        mgr.close()
    for merged, out in results[1:]:
        assert_same_bits(results[0][0], merged)
        assert torch.equal(results[0][1], out)


@pytest.mark.gpu
def test_announced_calls_run_on_a_stream_ahead_of_the_merges_and_hand_back_the_callers() -> None:
    if not torch.cuda.is_available():
        pytest.skip("streams need a GPU")
    seen: list[torch.cuda.Stream] = []

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 256)) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.cuda.current_stream())
            for block in self.transformer_blocks:
                x = block(x)
            return x

    model = Blocks().to("cuda", torch.bfloat16)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    spec = LoRASpec("distilled", tensors=synthetic_lora(model, names, rank=16, relative_norm=0.1), strengths=STRENGTHS)
    mgr = ResidencyManager(model, loras=[spec], merge_policy="merge")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    high = torch.cuda.Stream(priority=-1)
    with torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2", calls=3)
        caller = torch.cuda.current_stream()
        dit(x)  # on the default stream (the lowest priority, like the side stream's): switched
        assert seen[-1] != caller and seen[-1].priority < mgr._executor.side_stream.stream.priority
        assert torch.cuda.current_stream() == caller
        with torch.cuda.stream(high):  # a caller already ahead of the side stream: left alone
            dit(x)
            assert seen[-1] == high and torch.cuda.current_stream() == high
        with pytest.raises(RuntimeError):
            dit(x.float())  # a failing call hands the caller's stream back too
        assert torch.cuda.current_stream() == caller
    mgr.synchronize()
    assert mgr.state is WeightState.CLEAN


def test_a_merge_ahead_is_declined_where_the_last_call_keeps_the_gpu_busy() -> None:
    from ltx2_residency import PhaseWork
    from ltx2_residency.ops.forward import HOST_BOUND_TOKENS
    from ltx2_residency.policy import hides_merge

    assert hides_merge(PhaseWork(4, HOST_BOUND_TOKENS, 3), "cuda")
    assert not hides_merge(PhaseWork(4, HOST_BOUND_TOKENS + 1, 3), "cuda")  # compute-bound: no idle time
    assert hides_merge(None, "cuda")  # the recipe's stage 1 (1536 tokens a call)
    assert hides_merge(PhaseWork(4, 10**6, 1), "cpu")  # inline on the CPU either way


@pytest.mark.parametrize("on_hit", [1, 5, 9])
def test_a_failure_in_a_block_hook_fails_the_request_even_when_the_engine_catches_it(
        fresh_model, distilled_path, inputs, on_hit) -> None:
    """An engine's loop that catches the failed stage-1 call and goes on: the merge started ahead
    is broken (blocks merged, one half done), so neither another call nor the switch may run on
    it; the request's exit undoes what was merged."""
    faults = FaultInjector()
    mgr = make(fresh_model(), distilled_path, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("merge.layer", lambda: RuntimeError("device lost"), on_hit=on_hit)
    with torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1")
        assert req.prepare("stage2", calls=1)
        with pytest.raises(RuntimeError, match="device lost"):
            dit(**inputs)  # the block hook's merge fails inside the announced call
        assert "merge.layer" in faults.fired
        with pytest.raises(ForwardGuardError, match="failed"):
            dit(**inputs)
        with pytest.raises(ForwardGuardError, match="failed"):
            req.enter("stage2")
        with pytest.raises(RequestStateError, match="failed while switching"):  # nothing more runs in it
            req.enter("stage2")
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mgr.transformer.modules())
    with torch.no_grad(), mgr.request() as req:  # the next request merges ahead as usual
        req.enter("stage1")
        assert req.prepare("stage2")
        req.enter("stage2")(**inputs)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mgr.transformer.modules()) == hooks
