import threading
import time

import pytest
import torch

from ltx2_residency import (
    ConfigError,
    DirtyWeightsError,
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    PhaseOrderError,
    QuarantinedError,
    RepairError,
    RequestStateError,
    RequestTimeoutError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

HQ = {"stage1": 0.25, "stage2": 0.5}


def make(model, path, policy="merge", strengths=None, **kw) -> ResidencyManager:
    spec = LoRASpec("distilled", path, strengths or {"stage1": 0.0, "stage2": 1.0})
    return ResidencyManager(model, mode="original", loras=[spec], merge_policy=policy, **kw)


def run_request(mgr, inputs, stage2=None):
    with torch.no_grad(), mgr.request() as req:
        out1 = req.enter("stage1")(**inputs)[0]
        out2 = req.enter("stage2", strengths=stage2)(**inputs)[0]
    return out1, out2


@pytest.mark.parametrize("policy", ["sglang", "dynamic", "merge"])
def test_requests_end_clean_and_bit_identical(model, distilled_path, inputs, policy) -> None:
    mgr = make(model, distilled_path, policy, HQ, native_ltx23=True, verify="always")
    clean = weight_bits(mgr.managed_weights)
    for stage2 in (None, {"distilled": 1.0}, {"distilled": 0.0}):
        run_request(mgr, inputs, stage2)
        assert mgr.state is WeightState.CLEAN
        mgr.verify_clean()
        assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_trace_records_every_transition_with_bytes(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path, "merge", HQ)
    run_request(mgr, inputs)
    events = [(r.event, r.source, r.dest, r.phase) for r in mgr.trace]
    assert events == [
        ("merge", "clean", "merging", "stage1"),
        ("merged_stage1", "merging", "stage1_merged", "stage1"),
        ("restore", "stage1_merged", "restoring", "stage2"),
        ("restored", "restoring", "clean", "stage2"),
        ("merge", "clean", "merging", "stage2"),
        ("merged_stage2", "merging", "stage2_merged", "stage2"),
        ("restore", "stage2_merged", "restoring", None),
        ("restored", "restoring", "clean", None),
    ]
    managed = mgr.memory()["managed_weight_bytes"]
    assert [r.bytes_touched for r in mgr.trace if r.event in ("merge", "restore")] == [managed] * 4
    assert all(r.duration_ms >= 0 and r.ok for r in mgr.trace)
    assert len({r.request_id for r in mgr.trace}) == 1


@pytest.mark.parametrize("exc", [RuntimeError("denoiser blew up"), KeyboardInterrupt()])
@pytest.mark.parametrize("policy", ["dynamic", "merge"])
def test_leaving_by_exception_restores_clean(model, distilled_path, inputs, exc, policy) -> None:
    mgr = make(model, distilled_path, policy, HQ)
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(type(exc)), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")(**inputs)
        raise exc
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    run_request(mgr, inputs)  # the next request is served normally


def test_phase_order_is_enforced_without_touching_weights(model, distilled_path) -> None:
    mgr = make(model, distilled_path, "merge", HQ)
    with mgr.request() as req:
        with pytest.raises(PhaseOrderError, match="cannot enter 'stage2'.*next legal phase: stage1"):
            req.enter("stage2")
        req.enter("stage1")
        assert mgr.state is WeightState.STAGE1_MERGED
        with pytest.raises(PhaseOrderError, match="cannot enter 'stage1'"):
            req.enter("stage1")
        assert mgr.state is WeightState.STAGE1_MERGED
        req.enter("stage2")
        with pytest.raises(PhaseOrderError, match="request is complete"):
            req.enter("stage2")
    with pytest.raises(RequestStateError, match="closed"):
        req.enter("stage1")


def test_forward_guard(fresh_model, distilled_path, inputs) -> None:
    model = fresh_model()
    mgr = make(model, distilled_path, "dynamic")
    with pytest.raises(ForwardGuardError, match="outside a request phase"), torch.no_grad():
        model(**inputs)
    with mgr.request():
        with pytest.raises(ForwardGuardError, match="outside a request phase"), torch.no_grad():
            model(**inputs)  # a request is open but no phase was entered
    lenient = make(model_copy := fresh_model(), distilled_path, "dynamic", strict=False)
    with torch.no_grad():
        model_copy(**inputs)  # not strict: running clean weights outside a request is allowed
    assert lenient.state is WeightState.CLEAN


def test_guard_refuses_mid_operation_runs(model, distilled_path, inputs) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "merge", faults=faults)
    seen = []

    def run_inside_merge():
        seen.append(mgr.state)
        with torch.no_grad():
            model(**inputs)

    faults.arm("merge.after", lambda: RuntimeError("unused"), times=0)
    original_hit = faults.hit

    def hit(point):
        if point == "merge.after":
            run_inside_merge()
        original_hit(point)
    faults.hit = hit  # type: ignore[method-assign]
    with pytest.raises(ForwardGuardError, match="merging"), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert seen == [WeightState.MERGING]
    assert mgr.state is WeightState.CLEAN


def test_failed_restore_quarantines_and_repair_recovers(model, distilled_path, inputs) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "merge", faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("restore.layer", lambda: RuntimeError("device lost"), on_hit=3)
    with pytest.raises(QuarantinedError, match="quarantined.*manager.repair"), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state is WeightState.QUARANTINED
    with pytest.raises(QuarantinedError), mgr.request():
        pass
    with pytest.raises(ForwardGuardError, match="quarantined"), torch.no_grad():
        model(**inputs)
    mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    run_request(mgr, inputs)
    assert [r.event for r in mgr.trace][-4:] == ["merge", "merged_stage2", "restore", "restored"]


def test_repair_without_clean_source_stays_quarantined(model, distilled_path) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "merge", faults=faults, clean_source=None)
    assert mgr.memory()["clean_source_host_bytes"] == 0
    faults.arm("restore.before", lambda: RuntimeError("boom"))
    with pytest.raises(QuarantinedError, match="reload the model"), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    with pytest.raises(RepairError, match="clean_source=None"):
        mgr.repair()
    assert mgr.state is WeightState.QUARANTINED


def test_verify_clean_catches_tampering_and_quarantines(model, distilled_path) -> None:
    mgr = make(model, distilled_path, "dynamic")
    mgr.verify_clean()
    name, w = next(iter(mgr.managed_weights.items()))
    with torch.no_grad():
        w.view(-1)[0] = -w.view(-1)[0] if w.view(-1)[0] != 0 else 1.0
    with pytest.raises(DirtyWeightsError, match=f"1 of .* managed weights differ.*{name}"):
        mgr.verify_clean()
    assert mgr.state is WeightState.QUARANTINED
    mgr.repair()
    mgr.verify_clean()


def test_verify_inside_a_request_is_refused(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    with mgr.request(), pytest.raises(RequestStateError, match="between requests"):
        mgr.verify_clean()


def test_nested_request_fails_fast(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    with mgr.request(), pytest.raises(RequestStateError, match="nested"), mgr.request():
        pass
    assert mgr.state is WeightState.CLEAN


def test_second_request_waits_then_times_out(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with mgr.request() as req:
            req.enter("stage1")
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(10)
    with pytest.raises(RequestTimeoutError, match="waited 0.05 s"), mgr.request(timeout=0.05):
        pass
    release.set()
    t.join(10)
    with mgr.request(timeout=5):
        pass


def test_threads_serialize_and_phases_never_interleave(fresh_model, distilled_path, inputs) -> None:
    model = fresh_model()
    mgr = make(model, distilled_path, "merge", HQ)
    clean = weight_bits(mgr.managed_weights)
    log: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def worker(k: int):
        try:
            for _ in range(2):
                with torch.no_grad(), mgr.request(timeout=60) as req:
                    log.append((k, "open"))
                    req.enter("stage1")(**inputs)
                    log.append((k, "stage1"))
                    time.sleep(0.001)
                    req.enter("stage2")(**inputs)
                    log.append((k, "stage2"))
                log.append((k, "close"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    # each request's open/stage1/stage2 run back to back: nobody else's phase in between
    opened = [i for i, (_, what) in enumerate(log) if what == "open"]
    for i in opened:
        k = log[i][0]
        assert [e for e in log[i:i + 3]] == [(k, "open"), (k, "stage1"), (k, "stage2")]
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_stacked_loras_with_per_phase_strengths(model, distilled_path, user_lora_path, inputs) -> None:
    specs = [LoRASpec("distilled", distilled_path, HQ),
             LoRASpec("user", user_lora_path, {"stage1": 1.0, "stage2": 0.8})]
    mgr = ResidencyManager(model, loras=specs, merge_policy="merge")
    clean = weight_bits(mgr.managed_weights)
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        assert [f.lora for f in mgr._executor.stack.frames] == ["distilled", "user"]
        req.enter("stage2", strengths={"user": 0.0})(**inputs)
        assert [f.lora for f in mgr._executor.stack.frames] == ["distilled"]
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_memory_report(model, distilled_path) -> None:
    mgr = make(model, distilled_path, "merge", restore="recompute")
    with mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
        held = mgr.memory()
    report = mgr.memory()
    assert 0 < held["restore_capture_bytes"] < report["managed_weight_bytes"]
    assert 0 < held["last_merge_exception_fraction"] < 0.5
    assert report["restore_capture_bytes"] == 0
    assert report["clean_source_host_bytes"] == report["managed_weight_bytes"]
    assert report["lora_adapter_bytes"] > 0


def test_enum_and_string_forms_are_accepted(model, distilled_path) -> None:
    from ltx2_residency import Phase, ResidencyMode
    mgr = ResidencyManager(model, mode=ResidencyMode.ORIGINAL,
                           loras=[LoRASpec("distilled", distilled_path, {Phase.STAGE2: 1.0})],
                           merge_policy="MERGE")
    with mgr.request() as req:
        req.enter(Phase.STAGE1)
        req.enter("Stage2")
        assert mgr.state == "stage2_merged"


def test_a_failed_switch_poisons_the_request_not_the_manager(model, distilled_path, inputs) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "merge", HQ, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("merge.layer", lambda: RuntimeError("cuda error: misaligned address"), on_hit=60)
    with pytest.raises(RuntimeError, match="misaligned"), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)  # 56 layers: the 60th hit strikes inside stage 2's merge
        try:
            req.enter("stage2")
        finally:
            assert mgr.state is WeightState.CLEAN
            with pytest.raises(ForwardGuardError, match="outside a request phase"):
                model(**inputs)  # stage 1's weights are gone: nothing may run on them
            with pytest.raises(RequestStateError, match="failed while switching"):
                req.enter("stage2")
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    run_request(mgr, inputs)


def test_ctrl_c_stays_ctrl_c_when_the_undo_fails(model, distilled_path) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, "merge", HQ, faults=faults)
    faults.arm("restore.layer", lambda: RuntimeError("device lost"))
    with pytest.raises(KeyboardInterrupt) as info, mgr.request() as req:
        req.enter("stage1")
        raise KeyboardInterrupt
    assert any("quarantined" in n and "device lost" in n for n in info.value.__notes__)
    assert mgr.state is WeightState.QUARANTINED
    faults.arm("restore.layer", KeyboardInterrupt)
    mgr.repair()
    with pytest.raises(KeyboardInterrupt) as info2, mgr.request() as req:
        req.enter("stage1")
    assert any("repair()" in n for n in info2.value.__notes__)
    assert mgr.state is WeightState.QUARANTINED


def test_the_merge_policy_can_change_between_requests_only(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path, "dynamic")
    clean = weight_bits(mgr.managed_weights)
    run_request(mgr, inputs)
    assert "attach" in [r.event for r in mgr.trace] and "merge" not in [r.event for r in mgr.trace]
    mgr.set_merge_policy("merge")
    run_request(mgr, inputs)
    assert [r.event for r in mgr.trace].count("merge") == 1
    with pytest.raises(ConfigError, match="merge policy"):
        mgr.set_merge_policy("sometimes")
    with mgr.request():
        with pytest.raises(RequestStateError, match="between requests"):
            mgr.set_merge_policy("dynamic")
    assert mgr.policy.name.value == "merge"
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_auto_weighs_the_work_each_phase_declares(model, distilled_path, inputs, monkeypatch) -> None:
    from ltx2_residency import PhaseWork
    from ltx2_residency.costmodel import CPU, DeviceRates

    monkeypatch.setattr(DeviceRates, "measure", classmethod(lambda cls, device: CPU))  # no probe: fixed rates
    mgr = make(model, distilled_path, "auto", HQ)
    clean = weight_bits(mgr.managed_weights)
    heavy = PhaseWork(steps=1000, tokens=100_000, passes=3)
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1", work=heavy)(**inputs)
        assert mgr.state is WeightState.STAGE1_MERGED  # a thousand adapter passes cost more than a merge
        assert "3000 calls at 100000 tokens" in mgr.policy.last.reason
        req.enter("stage2", work=heavy)
    costs = mgr._switch.costs
    assert costs is not None and costs.merge_ms() > 0  # the measured merge replaced the estimate
    costs.observe_merge(1e9)  # a merge measured as ruinously slow: the same work now runs dynamic
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1", work=heavy)
        assert mgr.state is WeightState.STAGE1_DYNAMIC
    with pytest.raises(ConfigError, match="PhaseWork"), mgr.request() as req:
        req.enter("stage1", work=(1, 2, 3))
    mgr.synchronize()
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
