"""Snapshot and resident mode on the CPU: the same answers as original mode, residency stored
and moved explicitly, no DiT left half moved when a request or a prefetch fails."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_bits
from ltx2_residency import FaultInjector, ForwardGuardError, LoRASpec, ResidencyManager, WeightState
from ltx2_residency.testing import weight_bits

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
        assert dit is mgr._mode.base.module
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
        stage2 = mgr._mode.stage2.module
        with pytest.raises(ForwardGuardError, match="stage-2 DiT ran while the active DiT is 'base'"):
            stage2(**inputs)
        req.enter("stage2")
        with pytest.raises(ForwardGuardError, match="active DiT is 'stage2'"):
            model(**inputs)


def test_tampered_stage2_copy_is_caught(fresh_model, distilled_path) -> None:
    mgr = make(fresh_model(), distilled_path, "resident")
    w = mgr._mode.stage2.module.get_submodule("transformer_blocks.0.attn1.to_q").weight
    with torch.no_grad():
        w.view(-1)[0] += 1
    with pytest.raises(Exception, match="stage2:transformer_blocks.0.attn1.to_q"):
        mgr.verify_clean()
    assert mgr.state is WeightState.QUARANTINED


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
