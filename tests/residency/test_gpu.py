"""GPU checks at the real LTX-2 shapes (18.9 B parameters, random weights, rank-384 LoRA on all
1344 block linears, ‖ΔW‖ = 10 % of ‖W‖). Skipped without CUDA; run through the device machine:
``python -m pytest -m gpu tests/residency/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from ltx2_residency import LoRASpec, ResidencyManager, WeightState
from ltx2_residency.ops.fingerprint import Fingerprint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_model():
    from ltx2_residency.testing import linear_names, synthetic_lora
    from ltx2_tools.realshape import real_shape_transformer

    model = real_shape_transformer("cuda")
    targets = linear_names(model)
    assert len(targets) == 1344
    tensors = synthetic_lora(model, targets, rank=384, relative_norm=0.10)
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", tensors=tensors,
                                                  strengths={"stage1": 0.25, "stage2": 1.0})],
                           merge_policy="merge", verify="always", clean_source=None)
    yield model, mgr
    mgr.close()


def test_real_shape_merge_restore_is_bit_exact(full_model) -> None:
    _, mgr = full_model
    weights = mgr.managed_weights
    sample = list(weights)[:: len(weights) // 16]  # 16+ layers kept bit for bit on the GPU
    kept = {n: weights[n].detach().clone() for n in sample}
    for _ in range(3):
        with mgr.request() as req:
            req.enter("stage1")
            assert mgr.state is WeightState.STAGE1_MERGED
            req.enter("stage2", strengths={"distilled": 0.5})
        mgr.verify_clean()
        for n in sample:
            assert torch.equal(kept[n].view(torch.int16), weights[n].detach().view(torch.int16)), n
    frac = mgr.memory()["last_merge_exception_fraction"]
    assert 0.0 < frac < 0.5


def test_real_shape_peft_unmerge_drifts_on_the_same_model(full_model) -> None:
    from peft.tuners.lora import LoraLayer

    model, mgr = full_model
    weights = mgr.managed_weights
    clean = Fingerprint.of(weights.items())
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for m in layers:
            m.enable_adapters(True)
            m.set_adapter(["distilled"], inference_mode=True)
        for _ in range(4):
            for m in layers:
                m.merge(adapter_names=["distilled"])
            for m in layers:
                m.unmerge()
    drifted = clean.differing(Fingerprint.of(weights.items()))
    assert len(drifted) > 0, "PEFT unmerge came back exact; the delta is too small to be realistic"
