"""Snapshot and resident mode on the CPU: the same answers as original mode, residency stored
and moved explicitly, no DiT left half moved when a request or a prefetch fails."""

from __future__ import annotations

import pytest
import torch

from ltx2_residency import (
    DirtyWeightsError,
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    QuarantinedError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

HQ = {"stage1": 0.25, "stage2": 1.0}
MODES = [("resident", None), ("snapshot", False), ("snapshot", True)]


def make(model, path, mode, low_vram=None, policy="merge", strengths=HQ, **kw) -> ResidencyManager:
    return ResidencyManager(model, mode=mode, loras=[LoRASpec("distilled", path, strengths)],
                            merge_policy=policy, low_vram=low_vram, **kw)


def outputs(mgr, inputs, stage2=None):
    with torch.no_grad(), mgr.request() as req:
        o1 = req.enter("stage1")(**inputs)[0]
        o2 = req.enter("stage2", strengths=stage2)(**inputs)[0]
    return o1, o2


@pytest.mark.parametrize(("mode", "low_vram"), MODES)
@pytest.mark.parametrize("policy", ["merge", "dynamic"])
def test_same_answers_as_original_mode(fresh_model, distilled_path, inputs, mode, low_vram, policy) -> None:
    ref1, ref2 = outputs(make(fresh_model(), distilled_path, "original", policy=policy), inputs)
    merged_ref = outputs(make(fresh_model(), distilled_path, "original", policy="merge"), inputs)[1]
    mgr = make(fresh_model(), distilled_path, mode, low_vram, policy)
    for _ in range(2):  # the second request starts from the state the first left
        o1, o2 = outputs(mgr, inputs)
        assert torch.equal(o1, ref1), "stage 1 runs the same arithmetic on the base DiT"
        # stage 2 runs the pre-merged copy: the bits of an in-place merge at the same strength
        assert torch.equal(o2, merged_ref)
        if policy == "dynamic":
            torch.testing.assert_close(o2, ref2, atol=2**-5, rtol=0)  # merged vs dynamic: bf16 noise
    mgr.verify_clean()


@pytest.mark.parametrize(("mode", "low_vram"), MODES)
def test_override_falls_back_to_dynamic_on_the_base(fresh_model, distilled_path, inputs, mode, low_vram) -> None:
    ref = outputs(make(fresh_model(), distilled_path, "original", policy="dynamic"), inputs, {"distilled": 0.5})
    mgr = make(fresh_model(), distilled_path, mode, low_vram)
    clean = weight_bits(mgr.managed_weights)
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        dit = req.enter("stage2", strengths={"distilled": 0.5})
        assert mgr.state is WeightState.STAGE2_DYNAMIC
        assert dit is mgr._executor.mode.base.module
        assert torch.equal(dit(**inputs)[0], ref[1])
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_resident_switch_is_a_pointer_swap(fresh_model, distilled_path) -> None:
    model = fresh_model()
    mgr = make(model, distilled_path, "resident", strengths={"stage1": 0.0, "stage2": 1.0})
    with mgr.request() as req:
        assert req.enter("stage1") is model
        stage2 = req.enter("stage2")
        assert stage2 is not model and mgr.state is WeightState.STAGE2_MERGED
        assert mgr.residency() == {"base": "resident", "stage2": "resident"}
    rec = [r for r in mgr.trace if r.event == "activate_stage2"]
    assert rec and rec[-1].bytes_touched == 0  # nothing moved, nothing merged


def test_snapshot_prefetches_stage2_one_stage_early(fresh_model, distilled_path) -> None:
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram=False)
    assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
    with mgr.request() as req:
        req.enter("stage1")
        assert mgr.residency()["stage2"] == "prefetching"  # overlaps stage 1
        req.enter("stage2")
        assert mgr.residency() == {"base": "resident", "stage2": "resident"}
    assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
    assert mgr.memory()["stage2_in_flight_bytes"] == 0


def test_low_vram_never_holds_both_dits(fresh_model, distilled_path, inputs) -> None:
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram=True)
    seen = []
    for _ in range(3):
        with torch.no_grad(), mgr.request() as req:
            req.enter("stage1")(**inputs)
            seen.append(mgr.residency())
            req.enter("stage2")(**inputs)
            seen.append(mgr.residency())
        seen.append(mgr.residency())
        assert mgr.state is WeightState.OFFLOADED  # the base comes back with the next request
    assert all(not (r["base"] == "resident" and r["stage2"] == "resident") for r in seen), seen
    assert {"base": "offloaded", "stage2": "resident"} in seen
    mem = mgr.memory()
    assert mem["expected_peak_device_bytes"] < 2 * mem["base_host_snapshot_bytes"]
    mgr.verify_clean()


def test_request_ending_during_prefetch_leaves_nothing_in_flight(fresh_model, distilled_path) -> None:
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram=False)
    with pytest.raises(RuntimeError, match="client went away"), mgr.request() as req:
        req.enter("stage1")
        assert mgr.residency()["stage2"] == "prefetching"
        raise RuntimeError("client went away")
    assert mgr.state is WeightState.CLEAN
    assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
    assert mgr.memory()["stage2_in_flight_bytes"] == 0


@pytest.mark.parametrize("point", ["prefetch.before", "prefetch.after"])
@pytest.mark.parametrize("low_vram", [False, True])
def test_failed_prefetch_rolls_back(fresh_model, distilled_path, inputs, point, low_vram) -> None:
    faults = FaultInjector()
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram=low_vram, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm(point, lambda: torch.OutOfMemoryError("CUDA out of memory (injected)"))
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state in (WeightState.CLEAN, WeightState.OFFLOADED)
    assert "prefetching" not in mgr.residency().values() or mgr.state is WeightState.OFFLOADED
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    outputs(mgr, inputs)  # the next request is served
    mgr.verify_clean()


def test_guard_refuses_the_inactive_dit(fresh_model, distilled_path, inputs) -> None:
    model = fresh_model()
    mgr = make(model, distilled_path, "resident")
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        stage2 = mgr._executor.mode.stage2.module
        with pytest.raises(ForwardGuardError, match="stage-2 DiT ran while the active DiT is 'base'"):
            stage2(**inputs)
        req.enter("stage2")
        with pytest.raises(ForwardGuardError, match="active DiT is 'stage2'"):
            model(**inputs)


def test_tampered_stage2_copy_is_caught(fresh_model, distilled_path) -> None:
    mgr = make(fresh_model(), distilled_path, "resident")
    w = mgr._executor.mode.stage2.module.get_submodule("transformer_blocks.0.attn1.to_q").weight
    with torch.no_grad():
        w.view(-1)[0] += 1
    with pytest.raises(DirtyWeightsError, match="stage2:transformer_blocks.0.attn1.to_q"):
        mgr.verify_clean()
    assert mgr.state is WeightState.QUARANTINED


def test_repair_rebuilds_a_damaged_stage2_copy(fresh_model, distilled_path, inputs) -> None:
    reference = outputs(make(fresh_model(), distilled_path, "resident"), inputs)
    mgr = make(fresh_model(), distilled_path, "resident", clean_source=None)  # the base is not damaged
    stage2 = mgr._executor.mode.stage2.module
    clean = weight_bits({n: p for n, p in stage2.named_parameters()})
    w = stage2.get_submodule("transformer_blocks.1.ff.net.0.proj").weight
    with torch.no_grad():
        w.mul_(1.5)  # every element of one adapted weight
    with pytest.raises(DirtyWeightsError):
        mgr.verify_clean()
    mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits({n: p for n, p in stage2.named_parameters()}))
    rebuilt = [r for r in mgr.trace if r.event == "repair"][-1]
    assert rebuilt.bytes_touched == mgr.memory()["managed_weight_bytes"]  # every adapted weight, rebuilt
    mgr.verify_clean()
    for got, want in zip(outputs(mgr, inputs), reference, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("low_vram", [False, True])
def test_snapshot_repairs_from_its_base_snapshot(fresh_model, distilled_path, low_vram) -> None:
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram)
    mem = mgr.memory()
    assert mem["clean_source_host_bytes"] == 0, "no third host copy: the base snapshot serves repair()"
    assert mem["clean_source_shared_host_bytes"] == mem["managed_weight_bytes"]
    clean = weight_bits(mgr.managed_weights)
    with mgr.request() as req:  # the low-VRAM variant leaves the base streaming back
        req.enter("stage1")
        req.enter("stage2")
    name, w = next(iter(mgr.managed_weights.items()))
    mgr.repair()  # a no-op between requests (the low-VRAM variant rests offloaded)
    with pytest.raises(DirtyWeightsError, match=name), mgr.request() as req:
        req.enter("stage1")  # HQ merges stage 1, so the request is verified when it ends
        with torch.no_grad():
            w.view(-1)[:7] = 0.0  # a stray write while the base is on the device
    assert mgr.state is WeightState.QUARANTINED
    mgr.repair()
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.verify_clean()


def test_repair_without_clean_source_clears_a_quarantine_of_clean_weights(model, distilled_path) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "original", policy="dynamic", clean_source=None, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("detach.before", lambda: RuntimeError("adapter state lost"))
    with pytest.raises(QuarantinedError), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state is WeightState.QUARANTINED
    mgr.repair()  # dynamic phases never wrote the weights: nothing to restore from
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_auto_mode_reports_its_choice(fresh_model, distilled_path) -> None:
    mgr = ResidencyManager(fresh_model(), mode="auto", loras=[LoRASpec("distilled", distilled_path)])
    assert mgr.mode.value == "original"
    assert "not a CUDA device" in mgr.mode_reason


def test_undoing_stage1_keeps_stage2s_early_prefetch(fresh_model, distilled_path) -> None:
    faults = FaultInjector()
    mgr = make(fresh_model(), distilled_path, "snapshot", low_vram=False, faults=faults)
    with mgr.request() as req:
        req.enter("stage1")  # HQ: stage 1 merges, so entering stage 2 first undoes it
        assert mgr.state is WeightState.STAGE1_MERGED
        req.enter("stage2")
    assert faults.hits["prefetch.before"] == 1, "the early prefetch was thrown away and redone"
    assert [r.bytes_touched for r in mgr.trace if r.event == "activate_stage2"] == [0]
