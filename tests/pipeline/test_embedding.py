"""PhaseHooks: sglang's residency hooks on one manager request; docs/embedding.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ltx2_pipeline.embedding import PhaseHooks
from ltx2_residency import (
    FaultInjector,
    LoRASpec,
    PhaseOrderError,
    QuarantinedError,
    RequestStateError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
HQ = {"stage1": 0.25, "stage2": 0.5}


def hooks_for(model, path, mode="original", **kw) -> PhaseHooks:
    return PhaseHooks(ResidencyManager(model, mode=mode, loras=[LoRASpec("distilled", path, HQ)],
                                       merge_policy="merge", **kw))


def test_the_documented_example_runs_and_prints_what_the_doc_says(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    example = next((b for b in blocks if "PhaseHooks(manager)" in b), None)
    assert example is not None
    exec(compile(example, str(DOC), "exec"), {"__name__": "docs.embedding"})
    out = capsys.readouterr().out
    assert "request 2 failed: request 2: LTX2RefinementStage failed" in out
    assert "state between requests: offloaded {'base': 'prefetching', 'stage2': 'offloaded'}" in out
    assert ("transitions of request 3: ['load_base', 'loaded', 'activate_stage2', 'activated', 'restore', "
            "'offloaded']") in out


@pytest.mark.parametrize("mode", ["original", "resident", "snapshot"])
def test_hooks_run_a_request_and_restore_after_it(model, distilled_path, inputs, mode) -> None:
    hooks = hooks_for(model, distilled_path, mode)
    clean = weight_bits(hooks.manager.managed_weights)
    hooks.prepare_for_use("stage1")
    assert hooks.in_request and hooks.manager.state is WeightState.STAGE1_MERGED
    with torch.no_grad():
        hooks.wait_for_use("stage1")(**inputs)
    hooks.finish_use("stage1")
    assert hooks.manager.state is WeightState.STAGE1_MERGED, "finish_use leaves the phase applied"
    hooks.prepare_for_use("stage2")
    with torch.no_grad():
        hooks.wait_for_use("stage2")(**inputs)
    hooks.prepare_after_request()
    assert not hooks.in_request and hooks.manager.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(hooks.manager.managed_weights))
    hooks.prepare_after_request()  # a second call is a no-op


def test_a_failed_request_passed_to_the_hook_leaves_the_dit_clean(model, distilled_path) -> None:
    hooks = hooks_for(model, distilled_path)
    clean = weight_bits(hooks.manager.managed_weights)
    hooks.prepare_for_use("stage1")
    hooks.prepare_for_use("stage2")
    hooks.prepare_after_request(RuntimeError("stage failed"))  # not re-raised: the engine does that
    assert hooks.manager.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(hooks.manager.managed_weights))
    hooks.prepare_for_use("stage1")  # the next request opens normally
    hooks.prepare_after_request()


def test_a_failed_undo_surfaces_from_the_hook(model, distilled_path) -> None:
    faults = FaultInjector()
    hooks = hooks_for(model, distilled_path, faults=faults)
    hooks.prepare_for_use("stage1")
    faults.arm("restore.before", lambda: RuntimeError("device lost"))
    with pytest.raises(QuarantinedError, match="quarantined"):
        hooks.prepare_after_request(RuntimeError("stage failed"))
    assert hooks.manager.state is WeightState.QUARANTINED and not hooks.in_request


def test_hooks_refuse_out_of_order_use(model, distilled_path) -> None:
    hooks = hooks_for(model, distilled_path)
    with pytest.raises(RequestStateError, match=r"wait_for_use\('stage1'\) without prepare_for_use"):
        hooks.wait_for_use("stage1")
    hooks.prepare_for_use("stage1")
    hooks.prepare_for_use("stage2")
    with pytest.raises(RequestStateError, match="prepared: 'stage2'"):
        hooks.wait_for_use("stage1")
    with pytest.raises(PhaseOrderError):
        hooks.prepare_for_use("stage1")  # stage 1 after stage 2 in one request
    hooks.prepare_after_request()
    assert hooks.manager.state is WeightState.CLEAN


def test_the_first_prepare_chooses_the_requests_loras(fresh_model, distilled_path, user_lora_path, inputs) -> None:
    """``loras=`` as ``manager.request(loras=...)``: an added LoRA at the request's first hook call;
    later in the request it is refused, and the DiT is clean after."""
    def run(hooks: PhaseHooks, loras: dict | None) -> list[torch.Tensor]:
        out = []
        for phase in ("stage1", "stage2"):
            hooks.prepare_for_use(phase, loras=loras if phase == "stage1" else None)
            with torch.no_grad():
                out.append(hooks.wait_for_use(phase)(**inputs)[0])
        hooks.prepare_after_request()
        return out

    hooks = hooks_for(fresh_model(), distilled_path)
    clean = weight_bits(hooks.manager.managed_weights)
    hooks.manager.add_lora(LoRASpec("style", user_lora_path))
    chosen = {"style": 0.7, "distilled": {"stage2": 1.0}}
    got = run(hooks, chosen)
    own = PhaseHooks(ResidencyManager(fresh_model(), loras=[LoRASpec("distilled", distilled_path, HQ),
                                                            LoRASpec("style", user_lora_path)],
                                      merge_policy="merge"))
    want = run(own, chosen)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    hooks.prepare_for_use("stage1")
    with pytest.raises(RequestStateError, match="first prepare_for_use"):
        hooks.prepare_for_use("stage2", loras={"style": 1.0})
    hooks.prepare_after_request()
    hooks.manager.synchronize()
    assert_same_bits(clean, weight_bits(hooks.manager.managed_weights))
