"""The overlapped restore (``overlap_restore``): the undo of merged LoRAs is launched when a
request ends and settled by the DiT's next user; the DiT is ``restoring`` in between, refuses to
run, and the end-of-request verify is read when it settles.

On the CPU the undo runs inline, so these tests pin the bookkeeping and the failure paths; the
GPU test at the end runs the real side stream against work queued behind it on the main stream.
"""

from __future__ import annotations

import pytest
import torch

from ltx2_residency import (
    ConfigError,
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


def make(model, path, **kw) -> ResidencyManager:
    spec = LoRASpec("distilled", path, {"stage1": 0.25, "stage2": 0.5})
    kw.setdefault("overlap_restore", True)
    return ResidencyManager(model, mode="original", loras=[spec], merge_policy="merge", strict=False, **kw)


def run_request(mgr, inputs) -> torch.Tensor:
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        return req.enter("stage2")(**inputs)[0]


def test_a_merged_request_ends_restoring_and_the_next_user_settles_it(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path)
    clean = weight_bits(mgr.managed_weights)
    first = run_request(mgr, inputs)
    assert mgr.state is WeightState.UNDO_PENDING
    assert [r.event for r in mgr.trace][-1] == "restore_behind"
    assert_same_bits(clean, weight_bits(mgr.managed_weights))  # the CPU undo ran inline
    with pytest.raises(ForwardGuardError, match="undo_pending"), torch.no_grad():
        model(**inputs)  # between requests, before anything settled it
    with mgr.request() as req:
        assert mgr.state is WeightState.CLEAN  # request() settled it before handing it over
        assert [r.event for r in mgr.trace][-1] == "restored"
        with torch.no_grad():
            req.enter("stage1")
            second = req.enter("stage2")(**inputs)[0]
    assert torch.equal(first, second)
    mgr.synchronize()
    assert mgr.state is WeightState.CLEAN
    mgr.synchronize()  # nothing pending: a no-op
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_verify_clean_and_repair_settle_a_pending_undo_first(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path, verify="never")
    run_request(mgr, inputs)
    assert mgr.state is WeightState.UNDO_PENDING
    mgr.verify_clean()
    assert mgr.state is WeightState.CLEAN
    run_request(mgr, inputs)
    mgr.repair()  # nothing to repair once settled: a no-op
    assert mgr.state is WeightState.CLEAN


def test_requests_that_merge_nothing_end_clean_at_once(model, distilled_path, inputs) -> None:
    spec = LoRASpec("distilled", distilled_path, {"stage1": 0.0, "stage2": 1.0})
    mgr = ResidencyManager(model, loras=[spec], merge_policy="dynamic", overlap_restore=True)
    run_request(mgr, inputs)
    assert mgr.state is WeightState.CLEAN  # a dynamic phase only detaches: nothing is left pending


def test_the_deferred_verify_catches_a_bad_undo_at_the_next_request(model, distilled_path, inputs,
                                                                     monkeypatch) -> None:
    mgr = make(model, distilled_path)
    clean = weight_bits(mgr.managed_weights)
    undo = mgr._executor.stack.strategy.undo
    skipped: list[str] = []

    def forgetful(target, layer_undo, strength) -> None:  # an undo that silently skips one layer
        if not skipped:
            skipped.append(target.name)
            return
        undo(target, layer_undo, strength)

    monkeypatch.setattr(mgr._executor.stack.strategy, "undo", forgetful)
    run_request(mgr, inputs)
    assert mgr.state is WeightState.UNDO_PENDING and skipped
    with pytest.raises(DirtyWeightsError, match=skipped[0].replace(".", r"\.")), mgr.request():
        pass
    assert mgr.state is WeightState.QUARANTINED
    monkeypatch.setattr(mgr._executor.stack.strategy, "undo", undo)
    mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    run_request(mgr, inputs)
    mgr.synchronize()
    assert mgr.state is WeightState.CLEAN


def test_a_fault_in_the_overlapped_undo_quarantines_as_a_synchronous_one_does(model, distilled_path,
                                                                                inputs) -> None:
    faults = FaultInjector()
    mgr = make(model, distilled_path, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    faults.arm("restore.layer", lambda: RuntimeError("undo failed"), on_hit=40)
    with pytest.raises(QuarantinedError, match="undo failed"):
        run_request(mgr, inputs)
    assert mgr.state is WeightState.QUARANTINED
    mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_overlap_is_off_by_default_on_the_cpu_and_checked(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path, overlap_restore=None)
    assert mgr.overlap_restore is False
    run_request(mgr, inputs)
    assert mgr.state is WeightState.CLEAN
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(ConfigError, match="overlap_restore"):
        make(model, distilled_path, overlap_restore="yes")
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs a GPU")
def test_the_side_stream_undo_is_exact_under_work_queued_behind_it(fresh_model, distilled_path, inputs) -> None:
    model = fresh_model().cuda()
    cuda_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    mgr = make(model, distilled_path, restore="auto", overlap_restore=None)
    assert mgr.exact_kernel == "fused" and mgr.overlap_restore
    clean = weight_bits(mgr.managed_weights)
    reference = None
    for _ in range(3):
        out = run_request(mgr, cuda_inputs)
        assert mgr.state is WeightState.UNDO_PENDING
        # the main stream goes on at once (the decode's place), reusing freed memory
        scratch = [torch.randn(4096, 4096, device="cuda") for _ in range(4)]
        for t in scratch:
            t @ t
        del scratch
        reference = out if reference is None else reference
        assert torch.equal(out, reference)
    mgr.synchronize()
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
