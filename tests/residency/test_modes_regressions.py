"""src bugs the modes state machine (tests/residency/test_modes_stateful.py) found, each as the smallest
request sequence that shows it, asserting the documented behaviour:

- snapshot mode: a stage 1 that applies nothing (all strengths 0) leaves the manager CLEAN, so
  neither the request's end nor a failed switch ran the restore effect, the only place that
  released the stage-2 prefetch queued after stage 1: a whole DiT stayed in flight on the
  device between requests;
- low VRAM: ``SnapshotMode.reset`` (repair) loaded the base before it released the stage-2
  DiT, so repairing a DiT quarantined while stage 2 was resident held both DiTs on the device.

Both are fixed in src (``settle()`` at a request's or a failed switch's end, stage 2 released
first in ``reset``); these keep them fixed.
"""

from __future__ import annotations

import contextlib

import pytest

from ltx2_residency import FaultInjector, LoRASpec, QuarantinedError, ResidencyManager, WeightState
from ltx2_residency.domain import Residency
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

HQ = {"stage1": 0.25, "stage2": 1.0}
NO_STAGE1 = {"stage1": 0.0, "stage2": 1.0}  # the distilled LoRA as the README configures it


def make(model, path, low_vram: bool, strengths=HQ, faults=None) -> ResidencyManager:
    return ResidencyManager(model, mode="snapshot", loras=[LoRASpec("distilled", path, strengths)],
                            merge_policy="merge", low_vram=low_vram, faults=faults)


class Boom(Exception):
    pass


class WatchedFaults(FaultInjector):
    """Records, at every fault point an operation passes, whether both DiTs hold device memory."""

    def __init__(self) -> None:
        super().__init__()
        self.mgr: ResidencyManager | None = None
        self.both_on_device: list[str] = []

    def hit(self, point: str) -> None:
        if self.mgr is not None:
            where = self.mgr.residency()
            if Residency.OFFLOADED.value not in where.values():
                self.both_on_device.append(f"at {point}: {where}")
        super().hit(point)


@pytest.mark.parametrize("ends", ["normally", "body_error"])
def test_stage2_prefetch_released_when_a_request_without_stage1_lora_ends(fresh_model, distilled_path, ends) -> None:
    mgr = make(fresh_model(), distilled_path, low_vram=False, strengths=NO_STAGE1)
    clean = weight_bits(mgr.managed_weights)
    expect = pytest.raises(Boom) if ends == "body_error" else contextlib.nullcontext()
    with expect, mgr.request() as req:
        req.enter("stage1")
        assert mgr.state is WeightState.CLEAN  # stage 1 applies nothing ...
        assert mgr.residency()["stage2"] == "prefetching"  # ... and stage 2 streams in
        if ends == "body_error":
            raise Boom("client went away during stage 1")
    assert mgr.state is WeightState.CLEAN
    # "released after the request" (modes docstring): nothing of it on the device or in flight
    assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
    assert mgr.memory()["stage2_in_flight_bytes"] == 0
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_failed_stage1_switch_releases_its_stage2_prefetch(fresh_model, distilled_path) -> None:
    faults = FaultInjector()
    mgr = make(fresh_model(), distilled_path, low_vram=False, strengths=NO_STAGE1, faults=faults)
    with mgr.request() as req:
        faults.arm("prefetch.after", lambda: Boom("injected after the stage-2 copy was queued"))
        with pytest.raises(Boom):
            req.enter("stage1")
        # rolled back: no DiT left half moved when a prefetch fails
        assert mgr.state is WeightState.CLEAN
        assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
        assert mgr.memory()["stage2_in_flight_bytes"] == 0


def test_low_vram_repair_never_holds_both_dits(fresh_model, distilled_path) -> None:
    faults = WatchedFaults()
    mgr = make(fresh_model(), distilled_path, low_vram=True, faults=faults)
    faults.mgr = mgr
    with pytest.raises(QuarantinedError, match="repair"), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
        assert mgr.residency() == {"base": "offloaded", "stage2": "resident"}
        faults.arm("restore.before", lambda: RuntimeError("injected: the undo fails at the request's end"))
    faults.disarm()
    assert mgr.state is WeightState.QUARANTINED
    assert mgr.residency() == {"base": "offloaded", "stage2": "resident"}  # the undo moved nothing
    mgr.repair()
    assert mgr.state is WeightState.CLEAN
    assert mgr.residency() == {"base": "resident", "stage2": "offloaded"}
    mgr.verify_clean()
    # low VRAM: "never both on the device", not even while the repair moves them
    assert not faults.both_on_device, faults.both_on_device

