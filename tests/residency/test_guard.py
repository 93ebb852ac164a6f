"""One model, one manager; a constructor that fails, and ``close()``, give the model back exactly as
it was; the forward guard covers the DiT's call and each of its blocks, and refuses in quarantine
and after ``close()``."""

from __future__ import annotations

import pytest
import torch

from ltx2_residency import (
    FaultInjector,
    ForwardGuardError,
    LoRASpec,
    ManagerClosedError,
    ModelInUseError,
    QuarantinedError,
    RepairError,
    RequestStateError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import weight_bits
from untouched import assert_model_untouched, snapshot

STRENGTHS = {"stage1": 0.0, "stage2": 1.0}


def make(model, path, **kw) -> ResidencyManager:
    kw.setdefault("merge_policy", "merge")
    return ResidencyManager(model, loras=[LoRASpec("distilled", path, STRENGTHS)], **kw)


def given_back(model, before, state_keys) -> None:
    assert_model_untouched(before, model)
    assert list(model.state_dict()) == state_keys
    assert not hasattr(model, "peft_config")


def run(mgr, inputs) -> torch.Tensor:
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        return req.enter("stage2")(**inputs)[0]


def test_a_second_manager_on_the_same_model_is_refused_naming_the_first(model, distilled_path, inputs) -> None:
    first = make(model, distilled_path)
    before = snapshot(model)
    for target in (model, model.transformer_blocks[0]):  # the model, or any module of it
        with pytest.raises(ModelInUseError, match=f"0x{id(first):x}.*close"):
            make(target, distilled_path) if target is model else ResidencyManager(target)
    assert_model_untouched(before, model, peft_free=False)  # the first manager's, untouched
    run(first, inputs)  # the first one is unaffected
    assert first.state is WeightState.CLEAN
    first.close()
    second = make(model, distilled_path)  # closed: the model is free again
    run(second, inputs)
    second.close()


def test_a_constructor_that_fails_after_peft_wrapped_the_model_leaves_it_as_it_was(model, distilled_path) -> None:
    before, keys = snapshot(model), list(model.state_dict())
    faults = FaultInjector()
    faults.arm("detach.before", lambda: RuntimeError("late failure"))  # PeftAdapters' first sweep
    with pytest.raises(RuntimeError, match="late failure"):
        make(model, distilled_path, faults=faults)
    given_back(model, before, keys)
    make(model, distilled_path).close()  # not claimed by the failed one


@pytest.mark.parametrize("mode", ["original", "resident", "snapshot"])
def test_close_gives_the_model_back_as_it_was_given(fresh_model, distilled_path, inputs, mode) -> None:
    model = fresh_model()
    before, keys = snapshot(model), list(model.state_dict())
    with torch.no_grad():
        plain = model(**inputs)[0]
    mgr = make(model, distilled_path, mode=mode)
    stage2 = run(mgr, inputs)
    with mgr.request() as req:  # close() is refused inside a request
        with pytest.raises(RequestStateError):
            mgr.close()
        req.enter("stage1")
    mgr.close()
    mgr.close()  # idempotent
    given_back(model, before, keys)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], plain)  # the user's model again, unguarded
    for call in (mgr.request, mgr.verify_clean, mgr.repair, mgr.synchronize):
        with pytest.raises(ManagerClosedError):
            call().__enter__() if call == mgr.request else call()
    again = make(model, distilled_path, mode=mode)
    assert torch.equal(run(again, inputs), stage2)
    again.close()


def test_a_stage2_copy_refuses_to_run_once_its_manager_is_closed(model, distilled_path, inputs) -> None:
    mgr = make(model, distilled_path, mode="resident")
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        copy2 = req.enter("stage2")
    mgr.close()
    with pytest.raises(ManagerClosedError), torch.no_grad():
        copy2(**inputs)


def test_a_quarantined_dit_is_repaired_before_it_is_given_back(model, distilled_path, inputs) -> None:
    before, keys = snapshot(model), list(model.state_dict())
    faults = FaultInjector()
    mgr = make(model, distilled_path, faults=faults)
    faults.arm("restore.layer", lambda: RuntimeError("device lost"))
    with pytest.raises(QuarantinedError), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert mgr.state is WeightState.QUARANTINED
    faults.arm("repair.layer", lambda: RuntimeError("host copy unreadable"))
    with pytest.raises(RepairError):
        mgr.close()  # cannot be repaired: not given back, the manager stays open
    assert not mgr.closed and mgr.state is WeightState.QUARANTINED
    mgr.close()
    given_back(model, before, keys)


def test_blocks_called_on_their_own_are_guarded(fresh_model, distilled_path, inputs) -> None:
    args = _block_args(fresh_model(), inputs)
    model = fresh_model()
    faults = FaultInjector()
    mgr = make(model, distilled_path, faults=faults)
    block = model.transformer_blocks[0]
    with torch.no_grad():
        with pytest.raises(ForwardGuardError, match="outside a request phase"):
            block(**args)  # strict: not inside a request's phase
        with mgr.request() as req:
            req.enter("stage1")
            block(**args)  # inside a phase, on the active DiT: allowed
    faults.arm("restore.layer", lambda: RuntimeError("device lost"))
    with pytest.raises(QuarantinedError), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    for entry in (lambda: model(**inputs), lambda: model.transformer_blocks[1](**args)):
        with pytest.raises(ForwardGuardError, match="quarantined"), torch.no_grad():
            entry()


def test_even_a_non_strict_manager_refuses_a_block_mid_merge(fresh_model, distilled_path, inputs) -> None:
    args = _block_args(fresh_model(), inputs)
    model = fresh_model()
    faults = FaultInjector()
    mgr = make(model, distilled_path, strict=False, faults=faults)
    clean = weight_bits(mgr.managed_weights)
    refused: list[str] = []

    def run_a_block_while_merging() -> BaseException:
        with pytest.raises(ForwardGuardError) as info, torch.no_grad():
            model.transformer_blocks[0](**args)
        refused.append(str(info.value))
        return _Done()

    faults.arm("merge.layer", run_a_block_while_merging, on_hit=2)
    with pytest.raises(_Done), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert len(refused) == 1 and "merging" in refused[0]
    assert mgr.state is WeightState.CLEAN
    now = weight_bits(mgr.managed_weights)
    assert all(torch.equal(clean[n], now[n]) for n in clean)


class _Done(Exception):
    pass


def _block_args(model, inputs) -> dict:
    """What block 0 is called with in a DiT call (captured on an unmanaged model)."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        captured.update(dict(zip(("hidden_states",), args, strict=False)))
        raise _Done

    model.transformer_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(_Done), torch.no_grad():
        model(**inputs)
    return captured


def test_a_close_cut_short_gives_the_model_back_when_called_again(model, distilled_path, monkeypatch) -> None:
    from ltx2_residency.ops.dynamic import PeftAdapters

    before, keys = snapshot(model), list(model.state_dict())
    mgr = make(model, distilled_path)
    remove = PeftAdapters.remove

    def interrupted(self):
        monkeypatch.setattr(PeftAdapters, "remove", remove)
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftAdapters, "remove", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mgr.close()
    assert not mgr.closed
    mgr.close()
    given_back(model, before, keys)
    make(model, distilled_path).close()
