"""The cost model behind merge_policy="auto" (ltx2_residency.costmodel) and AutoPolicy.

Real-scale scenarios use the LTX-2 DiT's block linears (checked against diffusers' model below)
and the documented H100 rates of ``costmodel.H100``. Hypothesis strategies (layer sets, device rates,
phase work) live in tests/strategies.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from hypothesis import given, settings

from ltx2_pipeline.tiny import tiny_inputs
from ltx2_residency import ApplyKind, ConfigError, LoRASpec, MergePolicyName, Phase, ResidencyManager, ResidencyMode
from ltx2_residency import costmodel as cm
from ltx2_residency.costmodel import (
    FUSED_HOST_LAUNCHES,
    FUSED_OVERHEAD,
    H100,
    HOST_LAUNCHES_PER_ADAPTER,
    MERGE_OVERHEAD,
    RECIPE,
    UNDO_CRITICAL_SHARE,
    AdapterCost,
    CostModel,
    DeviceRates,
    MixCost,
    PhaseWork,
)
from ltx2_residency.policy import POLICIES, AutoPolicy, PhaseContext, make_policy
from ltx2_residency.testing import linear_names, weight_bits
from strategies import device_rates, layer_sets, phase_works, speedups

GIB = 2**30
ORIG = ResidencyMode.ORIGINAL

# ---------------------------------------------------------------------------- hand-computed formulas
# Two layers: (out 8, in 4, rank 2) on every token, (out 6, in 8, rank 3) on half of them.
TINY_LAYERS = [(8, 4, 2), (6, 8, 3, 0.5)]
# 1000 FLOP/s, 1000 B/s and 1 ms launches: every term below reads off in seconds.
SLOW = DeviceRates(matmul_tflops=1e-9, hbm_gibps=1000 / GIB, launch_us=1000.0)


def test_adapter_sums_by_hand() -> None:
    a = AdapterCost.of(TINY_LAYERS)
    assert a.layers == 2
    assert a.weight_elems == 8 * 4 + 6 * 8 == 80
    assert a.delta_macs == 2 * 32 + 3 * 48 == 208
    assert a.lora_elems == 2 * (4 + 8) + 3 * (8 + 6) == 66
    assert a.lora_macs_per_token == 24 + 0.5 * 42 == 45
    # (in + 2·rank + 6·out) elements of 2 bytes: 56 for the first layer, 50 for the second at half
    assert a.activation_bytes_per_token == 2 * 56 + 0.5 * 2 * 50 == 162


def test_merge_formula_by_hand() -> None:
    m = CostModel(SLOW, AdapterCost.of(TINY_LAYERS), record_fraction=0.5)
    assert m.record_bytes() == 6 * 0.5 * 80 == 240
    # read + write 80 bf16 weights (320 B) + 240 B of records = 0.56 s; B @ A: 416 FLOP = 0.416 s
    estimate = MERGE_OVERHEAD * (0.56 + 0.416) * 1e3
    assert m.undo_ms() == pytest.approx(UNDO_CRITICAL_SHARE * estimate)
    assert m.merge_ms() == pytest.approx(estimate * (1 + UNDO_CRITICAL_SHARE))


def test_dynamic_formula_by_hand() -> None:
    m = CostModel(SLOW, AdapterCost.of(TINY_LAYERS))
    # 10 tokens: 2·10·45 = 900 FLOP (0.9 s); 10·162 B of activations + 66 bf16 factors = 1752 B (1.752 s)
    assert m.forward_overhead_ms(10) == pytest.approx((0.9 + 1.752) * 1e3)
    assert m.dynamic_ms(PhaseWork(steps=3, tokens=10, passes=2)) == pytest.approx(6 * 2652.0)
    # host-bound: 100 ms launches make the host term (12 launch-equivalents × 2 layers) the larger
    slow_host = CostModel(dataclasses.replace(SLOW, launch_us=1e5), AdapterCost.of(TINY_LAYERS))
    assert slow_host.forward_overhead_ms(1) == pytest.approx(HOST_LAUNCHES_PER_ADAPTER * 2 * 100.0)
    assert m.forward_overhead_ms(1) == pytest.approx((0.09 + 0.294) * 1e3)  # device-bound again


def test_fused_forward_formula_by_hand() -> None:
    m = CostModel(SLOW, AdapterCost.of(TINY_LAYERS), dynamic_forward="fused")
    # 10 tokens. Layer 1 factored: 480 FLOP + 10·(4 + 4 + 16)·2 = 480 B = 0.96 s; merged: 2·2·32 =
    # 128 FLOP + (64 + 24)·2 = 176 B = 0.304 s, the cheaper. Layer 2 at 5 tokens: factored 420 FLOP
    # + 260 B = 0.68 s; merged 288 FLOP + (96 + 42)·2 = 276 B = 0.564 s.
    assert m.forward_overhead_ms(10) == pytest.approx(FUSED_OVERHEAD * (0.304 + 0.564) * 1e3)
    # 1 token: both factored (0.096 s and 0.068 s)
    assert m.forward_overhead_ms(1) == pytest.approx(FUSED_OVERHEAD * (0.096 + 0.068) * 1e3)
    slow_host = CostModel(dataclasses.replace(SLOW, launch_us=1e5), AdapterCost.of(TINY_LAYERS),
                          dynamic_forward="fused")
    assert slow_host.forward_overhead_ms(1) == pytest.approx(FUSED_HOST_LAUNCHES * 2 * 100.0)
    with pytest.raises(ConfigError, match="dynamic_forward"):
        CostModel(SLOW, AdapterCost.of(TINY_LAYERS), dynamic_forward="triton")


@given(work=phase_works, rates=device_rates)
def test_our_forward_never_costs_more_than_peft_s(work: PhaseWork, rates: DeviceRates) -> None:
    # per layer it takes the cheaper of two forms, one of them less traffic than PEFT's, with a
    # quarter of PEFT's host launches; the calibration factor covers its GEMMs' lower rate
    adapters = cm.ltx2_adapter_cost()
    ours = CostModel(rates, adapters, dynamic_forward="fused").dynamic_ms(work)
    assert ours <= FUSED_OVERHEAD * CostModel(rates, adapters).dynamic_ms(work) * (1 + 1e-9)


def test_fused_reference_matches_the_full_scale_measurement() -> None:
    # one H100, full DiT: our forward added 57 ms per call at 6144 tokens (PEFT's: 119 ms)
    m = CostModel(H100, cm.ltx2_adapter_cost(), dynamic_forward="fused")
    assert 0.8 * 57 <= m.forward_overhead_ms(6144) <= 1.2 * 57
    # so the 3 distilled stage-2 calls at 6144 tokens still merge, for less than PEFT's forward
    d = m.choose(RECIPE[Phase.STAGE2], True)
    peft = CostModel(H100, cm.ltx2_adapter_cost()).choose(RECIPE[Phase.STAGE2], True)
    assert d.kind is ApplyKind.MERGED and d.dynamic_ms < peft.dynamic_ms / 2, d.reason


def test_choose_reports_both_costs_and_ties_stay_dynamic() -> None:
    m = CostModel(SLOW, AdapterCost.of(TINY_LAYERS))
    work = PhaseWork(1, 1)
    d = m.choose(work, strengths_live=True)
    assert (d.kind, d.merge_ms, d.dynamic_ms) == (ApplyKind.DYNAMIC, m.merge_ms(), m.dynamic_ms(work))
    assert "vs dynamic" in d.reason and "1 tokens" in d.reason
    half = m.dynamic_ms(work) / 2  # halves add back exactly: a true tie
    m.observe_merge(half)
    m.observe_undo(half)
    tie = m.choose(work, strengths_live=True)
    assert tie.merge_ms == tie.dynamic_ms and tie.kind is ApplyKind.DYNAMIC
    m.observe_merge(m.dynamic_ms(work) / 4)
    assert m.choose(work, strengths_live=True).kind is ApplyKind.MERGED


def test_a_mix_is_priced_by_its_own_layers_and_measurements_scale_to_it() -> None:
    """A request's LoRAs (``MixCost``) replace the model's own in both formulas; a merge measured on
    one mix prices another by the ratio of their estimates (exact on the mix it was measured on)."""
    m = CostModel(SLOW, AdapterCost.of(TINY_LAYERS))
    small = AdapterCost.of([(8, 4, 1)])
    mix = MixCost(small, small)
    work = PhaseWork(2, 10)
    d = m.choose(work, strengths_live=True, mix=mix)
    assert (d.merge_ms, d.dynamic_ms) == (m.merge_ms(small), m.dynamic_ms(work, small))
    assert d.merge_ms < m.merge_ms() and d.dynamic_ms < m.dynamic_ms(work)
    assert m.record_bytes(small) < m.record_bytes()
    m.observe_merge(50.0, small)
    assert m.merge_ms(small) == 50.0 + m.undo_ms(small)
    scaled = 50.0 * m._merge_estimate_ms() / m._merge_estimate_ms(small)
    assert m.merge_ms() == pytest.approx(scaled + m.undo_ms())
    wide = MixCost(small, AdapterCost.of([*TINY_LAYERS, *TINY_LAYERS]))  # a compiled DiT computes every adapter
    assert m.choose(work, strengths_live=True, mix=wide).dynamic_ms == pytest.approx(2 * m.dynamic_ms(work))


def test_zero_strengths_choose_none() -> None:
    d = CostModel(H100, cm.ltx2_adapter_cost()).choose(RECIPE[Phase.STAGE2], strengths_live=False)
    assert (d.kind, d.merge_ms, d.dynamic_ms) == (ApplyKind.NONE, 0.0, 0.0)
    assert "strength is 0" in d.reason


def test_previous_merge_is_charged_to_both_sides() -> None:
    # the manager restores a merged stage 1 before stage 2 whichever way stage 2 runs
    m = cm.ltx2_reference_model()
    work = RECIPE[Phase.STAGE2]
    alone, after = m.choose(work, True), m.choose(work, True, previous_merged=True)
    assert after.kind is alone.kind
    assert after.merge_ms - alone.merge_ms == pytest.approx(m.undo_ms())
    assert after.dynamic_ms - alone.dynamic_ms == pytest.approx(m.undo_ms())


# ---------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(layer_sets, device_rates, phase_works)
def test_more_work_costs_dynamic_more(layers: list, rates: DeviceRates, work: PhaseWork) -> None:
    m = CostModel(rates, AdapterCost.of(layers))
    base = m.dynamic_ms(work)
    assert base > 0
    assert m.dynamic_ms(dataclasses.replace(work, steps=work.steps + 1)) > base
    assert m.dynamic_ms(dataclasses.replace(work, passes=work.passes + 1)) > base
    assert m.dynamic_ms(dataclasses.replace(work, tokens=work.tokens * 2)) >= base
    # the merge does not depend on the workload, so once merging pays it keeps paying
    if m.choose(work, True).kind is ApplyKind.MERGED:
        assert m.choose(dataclasses.replace(work, steps=work.steps + 1), True).kind is ApplyKind.MERGED


@settings(max_examples=60, deadline=None)
@given(layer_sets, device_rates, phase_works, speedups)
def test_faster_device_costs_less(layers: list, rates: DeviceRates, work: PhaseWork, k: float) -> None:
    adapters = AdapterCost.of(layers)
    m = CostModel(rates, adapters)
    for field in ("matmul_tflops", "hbm_gibps"):
        fast = CostModel(dataclasses.replace(rates, **{field: getattr(rates, field) * k}), adapters)
        assert fast.dynamic_ms(work) <= m.dynamic_ms(work) * (1 + 1e-12)
        assert fast.merge_ms() < m.merge_ms()
    quick_launch = CostModel(dataclasses.replace(rates, launch_us=rates.launch_us / k), adapters)
    assert quick_launch.dynamic_ms(work) <= m.dynamic_ms(work) * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(layer_sets, device_rates, phase_works)
def test_decision_follows_the_cheaper_side(layers: list, rates: DeviceRates, work: PhaseWork) -> None:
    m = CostModel(rates, AdapterCost.of(layers))
    d = m.choose(work, True)
    assert d.kind is (ApplyKind.MERGED if d.merge_ms < d.dynamic_ms else ApplyKind.DYNAMIC)
    m.headroom_bytes = m.record_bytes() - 1
    assert m.choose(work, True).kind is ApplyKind.DYNAMIC


# ---------------------------------------------------------------------------- real scale
def test_ltx2_layer_table_matches_diffusers() -> None:
    with torch.device("meta"):
        dit = LTX2VideoTransformer3DModel()
    modules = dict(dit.named_modules())
    names = linear_names(dit)
    shapes = sorted((n.split(".", 2)[2], modules[n].out_features, modules[n].in_features) for n in names)
    assert shapes == sorted(cm.LTX2_BLOCK_LINEARS * cm.LTX2_BLOCKS)
    a = cm.ltx2_adapter_cost()
    assert (a.layers, a.weight_elems) == (1344, sum(modules[n].weight.numel() for n in names))
    assert a.weight_elems * 2 / GIB == pytest.approx(34.5, abs=0.05)  # "34.5 GiB of adapted weights"


def test_token_share_matches_what_each_layer_sees(base_model: torch.nn.Module) -> None:
    # Which linears run on the video tokens, read off a forward of the tiny LTX-2 (same layer
    # names): video, audio and text token counts are made distinct.
    kw = tiny_inputs(base_model, frames=2, height=4, width=3, text_tokens=7, audio_frames=5)
    seen: dict[str, int] = {}
    hooks = [base_model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: seen.__setitem__(n, args[0].shape[-2])) for n in linear_names(base_model)]
    try:
        with torch.no_grad():
            base_model(**kw)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 56
    for name, tokens in seen.items():
        assert cm.ltx2_token_share(name) == (1.0 if tokens == 2 * 4 * 3 else 0.0), (name, tokens)
    assert cm.ltx2_token_share("proj_out") == 1.0  # unknown layers are assumed to see the phase's tokens


def _ff_only(rank: int = 384) -> AdapterCost:
    return AdapterCost.of((o, i, rank) for _ in range(cm.LTX2_BLOCKS)
                          for n, o, i in cm.LTX2_BLOCK_LINEARS if n.startswith("ff."))


# (what, adapters, work, previous_merged, expected): H100 rates, the distilled LoRA (rank 384, all
# 1344 block linears) unless said otherwise. Latent tokens: 768x512x121 -> 24x16x16 at stage 2;
# 384x256x121 -> 12x8x16 = 1536 at stage 2, 6x4x16 = 384 at stage 1.
SCENARIOS = [
    ("normal stage 2 (3 steps at 6144 tokens)", None, RECIPE[Phase.STAGE2], False, ApplyKind.MERGED),
    ("HQ stage 1 (30 steps x 2 calls, 2304 tokens on average)", None, RECIPE[Phase.STAGE1], False, ApplyKind.MERGED),
    ("HQ stage 1, 4 steps", None, PhaseWork(4, 1536, 3), False, ApplyKind.MERGED),
    ("HQ stage 2 after a merged stage 1", None, RECIPE[Phase.STAGE2], True, ApplyKind.MERGED),
    ("small resolution, stage 2", None, PhaseWork(3, 1536), False, ApplyKind.MERGED),
    ("small resolution, HQ stage 1", None, PhaseWork(30, 384, 3), False, ApplyKind.MERGED),
    ("tiny workload: 1 step at 64 tokens, an FF-only LoRA", _ff_only, PhaseWork(1, 64), False, ApplyKind.DYNAMIC),
    ("tiny workload: 3 steps at 64 tokens, an FF-only LoRA", _ff_only, PhaseWork(3, 64), False, ApplyKind.DYNAMIC),
    ("the FF-only LoRA over stage 2", _ff_only, RECIPE[Phase.STAGE2], False, ApplyKind.MERGED),
]


@pytest.mark.parametrize(("what", "adapters", "work", "previous", "expected"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_real_scale_decisions(what: str, adapters: Callable[[], AdapterCost] | None, work: PhaseWork,
                              previous: bool, expected: ApplyKind) -> None:
    m = CostModel(H100, adapters() if adapters else cm.ltx2_adapter_cost())
    d = m.choose(work, strengths_live=True, previous_merged=previous)
    assert d.kind is expected, d.reason
    # a clear call, not a coin toss: the loser costs at least 1.2x the winner
    assert max(d.merge_ms, d.dynamic_ms) >= 1.2 * min(d.merge_ms, d.dynamic_ms), d.reason


def test_reference_model_brackets_the_full_scale_measurements() -> None:
    # Full DiT + rank-384 PEFT adapters on one H200 (probe: 624 TFLOP/s, 3437 GiB/s, 9.84 µs):
    # +99 ms per call at 6144 tokens (device-bound), +143 to +191 ms at 64-1536 tokens (host-bound).
    m = CostModel(DeviceRates(624.0, 3437.0, 9.84), cm.ltx2_adapter_cost())
    assert 99 <= m.forward_overhead_ms(6144) <= 2 * 99  # errs high where the host partly hides
    assert 0.8 * 143 <= m.forward_overhead_ms(64) <= 1.2 * 191
    # the fused merge at full scale, ~90 ms on an H100
    assert 0.8 * 90 <= cm.ltx2_reference_model()._merge_estimate_ms() <= 1.2 * 90


def test_one_call_of_the_distilled_lora_depends_on_the_host() -> None:
    # 1344 PEFT layers cost ~129 ms of host time per call at 8 µs launches, more than a ~104 ms
    # merge; a host twice as fast makes a single small call cheaper dynamic.
    tiny = PhaseWork(1, 64)
    assert cm.ltx2_reference_model().choose(tiny, True).kind is ApplyKind.MERGED
    fast_host = CostModel(dataclasses.replace(H100, launch_us=4.0), cm.ltx2_adapter_cost())
    assert fast_host.choose(tiny, True).kind is ApplyKind.DYNAMIC


def test_headroom_smaller_than_the_records_forces_dynamic() -> None:
    m = cm.ltx2_reference_model()
    need = m.record_bytes()
    assert need / GIB == pytest.approx(6 * 0.125 * 18_522_046_464 / GIB)  # 12.9 GiB reserved at first merge
    packed = CostModel(H100, cm.ltx2_adapter_cost(), record_fraction=0.077)
    assert packed.record_bytes() / GIB == pytest.approx(7.97, abs=0.01)  # the ~8 GiB held while merged
    m.headroom_bytes = need - 1
    d = m.choose(RECIPE[Phase.STAGE2], True)
    assert d.kind is ApplyKind.DYNAMIC
    assert "12.94 GiB" in d.reason and "free" in d.reason
    assert d.merge_ms < d.dynamic_ms  # the merge would have been cheaper: memory decided
    m.headroom_bytes = need
    assert m.choose(RECIPE[Phase.STAGE2], True).kind is ApplyKind.MERGED


def test_a_measured_slow_merge_changes_the_decision() -> None:
    m = cm.ltx2_reference_model()
    assert m.choose(RECIPE[Phase.STAGE2], True).kind is ApplyKind.MERGED
    m.observe_merge(690.0)  # the unfused merge's switch in docs/benchmarks.md
    assert m.merge_ms() == pytest.approx(690.0 + m.undo_ms())
    assert m.choose(RECIPE[Phase.STAGE2], True).kind is ApplyKind.DYNAMIC
    m.observe_undo(5.0)
    assert m.undo_ms() == 5.0 and m.merge_ms() == 695.0
    assert m.choose(RECIPE[Phase.STAGE1], True).kind is ApplyKind.MERGED  # 60 calls still pay for it


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "90"])
def test_observations_are_validated(bad: Any) -> None:
    m = cm.ltx2_reference_model()
    before = m.merge_ms()
    for observe, name in ((m.observe_merge, "observe_merge"), (m.observe_undo, "observe_undo")):
        with pytest.raises(ConfigError, match=rf"{name}\(ms\) must be a finite number > 0, got"):
            observe(bad)
    assert m.merge_ms() == before


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(steps=0, tokens=1), "steps"), (dict(steps=1, tokens=-5), "tokens"),
    (dict(steps=1, tokens=1, passes=0), "passes"), (dict(steps=1.5, tokens=1), "steps"),
    (dict(steps=True, tokens=1), "steps"), (dict(steps=1, tokens="6144"), "tokens"),
])
def test_phase_work_refuses_non_positive_ints(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"PhaseWork\.{field} must be a positive int, got") as err:
        PhaseWork(**kwargs)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), None])
def test_device_rates_refuse_non_positive(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"DeviceRates\.hbm_gibps must be a finite number > 0"):
        DeviceRates(matmul_tflops=1.0, hbm_gibps=bad, launch_us=1.0)


@pytest.mark.parametrize(("layers", "message"), [
    ([], "no adapted layers"), ([(8, 4)], r"expected \(out, in, rank\)"), ([(8, 0, 2)], "in must be a positive int"),
    ([(8, 4, 2, 1.5)], r"token_share must be in \[0, 1\]"), ([(8, 4, 2.0)], "rank must be a positive int"),
])
def test_adapter_cost_refuses_bad_layers(layers: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AdapterCost.of(layers)


def test_record_fraction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"record_fraction must be in \[0, 1\], got 1.5"):
        CostModel(H100, AdapterCost.of(TINY_LAYERS), record_fraction=1.5)


# ---------------------------------------------------------------------------- device rates
def test_measure_turns_the_probes_times_into_rates_and_caches_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe's kernels run, its clock is injected: a 256³ fp32 GEMM, a 4 Mi-element bf16 copy
    # and 200 launches, each timed at a fixed best-of
    monkeypatch.setattr(cm, "_MEASURED", {})
    timed: list[float] = []

    def best_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
        fn()
        timed.append((0.5, 2.0, 1.0)[len(timed)])
        return timed[-1]

    monkeypatch.setattr(cm, "_best_ms", best_ms)
    rates = DeviceRates.measure("cpu")
    assert rates.matmul_tflops == pytest.approx(2 * 256**3 / 0.5e-3 / 1e12)
    assert rates.hbm_gibps == pytest.approx(4 * (4 << 20) / 2.0e-3 / GIB)  # read + write of 2-byte elements
    assert rates.launch_us == pytest.approx(1.0e3 / 200)
    assert DeviceRates.measure(torch.device("cpu")) is rates and len(timed) == 3  # probed once


def test_measure_falls_back_to_the_defaults_when_the_card_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cm, "_MEASURED", {})

    def full(device: torch.device) -> DeviceRates:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cm, "_probe", full)
    assert DeviceRates.measure("cuda:0") is H100
    assert DeviceRates.default_for("cuda") is H100 and DeviceRates.default_for("cpu") is cm.CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_measure_on_cuda_runs_the_probe_on_the_card_and_caches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe's kernels run and synchronize on the card; its clock is injected (1 ms each)
    monkeypatch.setattr(cm, "_MEASURED", {})
    real, devices = cm._best_ms, []

    def best_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
        real(fn, device, reps=1)
        devices.append(device)
        return 1.0

    monkeypatch.setattr(cm, "_best_ms", best_ms)
    rates = DeviceRates.measure("cuda")
    assert rates.matmul_tflops == pytest.approx(2 * 4096**3 / 1e-3 / 1e12)  # a 4096³ bf16 GEMM
    assert rates.hbm_gibps == pytest.approx(4 * (128 << 20) / 1e-3 / GIB)  # a 128 Mi-element bf16 copy
    assert rates.launch_us == pytest.approx(1e3 / 200)
    assert devices == [torch.device("cuda", torch.cuda.current_device())] * 3
    assert DeviceRates.measure(f"cuda:{torch.cuda.current_device()}") is rates


# ---------------------------------------------------------------------------- AutoPolicy
def _ctx(phase: Phase, strengths: dict[str, float], stage1: dict[str, float] | None = None,
         **kw: Any) -> PhaseContext:
    return PhaseContext(ORIG, phase, strengths, stage1 if stage1 is not None else strengths, False, **kw)


def test_make_policy_auto() -> None:
    policy = make_policy(" Auto ")
    assert isinstance(policy, AutoPolicy) and policy.name is MergePolicyName.AUTO
    assert POLICIES[MergePolicyName.AUTO] is AutoPolicy
    assert policy.last is None


def test_auto_without_work_or_costs_uses_the_recipe_on_the_reference_model() -> None:
    policy = AutoPolicy()
    assert policy.decide(_ctx(Phase.STAGE1, {"distilled": 0.0})) is ApplyKind.NONE
    assert policy.decide(_ctx(Phase.STAGE2, {"distilled": 1.0}, {"distilled": 0.0})) is ApplyKind.MERGED
    assert policy.last is not None and "6144 tokens" in policy.last.reason
    assert policy.decide(_ctx(Phase.STAGE1, {"distilled": 0.25})) is ApplyKind.MERGED
    assert "60 calls at 2304 tokens" in policy.last.reason


def test_auto_uses_the_work_and_costs_it_is_given() -> None:
    policy = AutoPolicy()
    ff = CostModel(H100, _ff_only())
    tiny, live = PhaseWork(1, 64), {"user": 1.0}
    assert policy.decide(_ctx(Phase.STAGE2, live, work=tiny, costs=ff)) is ApplyKind.DYNAMIC
    assert policy.decide(_ctx(Phase.STAGE2, live, costs=ff)) is ApplyKind.MERGED  # no work: the recipe's
    assert policy.decide(_ctx(Phase.STAGE2, live, work=tiny)) is ApplyKind.MERGED  # no costs: the reference
    assert "64 tokens" in policy.last.reason  # type: ignore[union-attr]
    full = CostModel(H100, cm.ltx2_adapter_cost(), headroom_bytes=GIB)
    assert policy.decide(_ctx(Phase.STAGE2, live, costs=full)) is ApplyKind.DYNAMIC
    assert policy.decide(_ctx(Phase.STAGE2, {"user": 0.0}, costs=full)) is ApplyKind.NONE


def test_phase_context_keeps_its_positional_fields() -> None:
    ctx = PhaseContext(ORIG, Phase.STAGE2, {"d": 1.0}, {"d": 0.0}, True)
    assert (ctx.work, ctx.costs) == (None, None)
    assert [f.name for f in dataclasses.fields(PhaseContext)] == [
        "mode", "phase", "strengths", "stage1_strengths", "native_ltx23", "work", "costs", "ahead", "mix"]


def inject_measurements(monkeypatch: pytest.MonkeyPatch, rates: DeviceRates, merge_ms: float,
                        undo_ms: float) -> dict[str, list[float]]:
    """The manager's own cost model, measured without a clock: its device probe returns ``rates``, and
    every merge or undo it observes counts as ``merge_ms`` / ``undo_ms``. What the manager really
    timed is returned (per kind, in order), so a test can still check that it reports each one."""
    monkeypatch.setattr(DeviceRates, "measure", classmethod(lambda cls, device: rates))
    timed: dict[str, list[float]] = {"merge": [], "undo": []}
    for kind, injected in (("merge", merge_ms), ("undo", undo_ms)):
        real = getattr(CostModel, f"observe_{kind}")

        def observe(self: CostModel, ms: float, adapters: AdapterCost | None = None, *, kind: str = kind,
                    real: Any = real, injected: float = injected) -> None:
            timed[kind].append(ms)
            real(self, injected, adapters)

        monkeypatch.setattr(CostModel, f"observe_{kind}", observe)
    return timed


# The tiny DiT's 56 rank-8 adapters at cm.CPU rates, over the recipe: merging is estimated well under
# 1 ms; dynamic costs hundreds of ms in stage 1 either way, and in stage 2 ~100 ms with PEFT's forward,
# ~4 ms with ours. The stage-2 decision follows the stage-1 merge's (injected) time. Our forward is
# spelled "ours" here: the suite runs Triton's interpreter for any parameter "fused" (see conftest),
# and the kernels are not what this test is about.
@pytest.mark.parametrize(("forward", "merge_ms", "stage2"), [
    ("peft", 20.0, "stage2_merged"),
    ("ours", 20.0, "stage2_dynamic"),
    ("peft", 500.0, "stage2_dynamic"),  # a merge timed on a loaded machine: dynamic is cheaper then
])
def test_manager_with_auto_decides_from_its_measurements_and_runs_exactly(
        fresh_model: Callable[[], torch.nn.Module], distilled_path: str, inputs: dict,
        monkeypatch: pytest.MonkeyPatch, forward: str, merge_ms: float, stage2: str) -> None:
    timed = inject_measurements(monkeypatch, cm.CPU, merge_ms=merge_ms, undo_ms=1.0)
    model = fresh_model()
    params = dict(model.named_parameters())
    before = weight_bits(params)
    mgr = ResidencyManager(model, loras=[LoRASpec("distilled", distilled_path, {"stage1": 0.25, "stage2": 0.5})],
                           merge_policy="auto", dynamic_forward="fused" if forward == "ours" else forward)
    assert mgr.policy.name is MergePolicyName.AUTO
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")(**inputs)
        assert mgr.state.value == "stage1_merged"  # no merge seen yet: the estimate at these rates
        assert mgr.policy.last is not None and mgr.policy.last.merge_ms < 1.0 < mgr.policy.last.dynamic_ms
        req.enter("stage2")(**inputs)
        assert mgr.state.value == stage2
        # stage 2 was priced with the injected merge plus the undo's estimate (under 1 ms), not a clock
        assert merge_ms < mgr.policy.last.merge_ms < merge_ms + 1.0
    assert mgr.state.value == "clean"
    merges = 2 if stage2 == "stage2_merged" else 1
    assert len(timed["merge"]) == merges and len(timed["undo"]) == 1 and all(ms > 0 for ms in timed["merge"])
    after = weight_bits(params)
    assert all(torch.equal(before[n], after[n]) for n in before)
    mgr.verify_clean()


def test_headroom_counts_the_allocators_cached_memory_and_records_follow_the_last_merge(monkeypatch) -> None:
    # a request's activations are freed into torch's cache, not to the driver: merge records reuse them
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 40 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 30 * 2**30)
    model = CostModel(H100, cm.ltx2_adapter_cost(), device=torch.device("cuda", 0))
    model.refresh_headroom()
    assert model.headroom_bytes == 13 * 2**30
    before = model.record_bytes()
    model.observe_records(0.077)
    assert model.record_bytes() < before and model.record_fraction == 0.077
    model.observe_records(0.0)  # a merge that recorded nothing says nothing about the next
    assert model.record_fraction == 0.077
    cpu = CostModel(H100, cm.ltx2_adapter_cost())
    cpu.refresh_headroom()
    assert cpu.headroom_bytes is None


def test_a_merge_ahead_is_priced_at_the_share_left_on_the_path() -> None:
    model = cm.ltx2_reference_model()
    work = PhaseWork(3, 6144, 1)
    at_switch = model.choose(work, True)
    ahead = model.choose(work, True, ahead=True)
    undo = model.undo_ms()
    assert ahead.merge_ms - undo == pytest.approx(cm.AHEAD_CRITICAL_SHARE * (at_switch.merge_ms - undo))
    assert ahead.dynamic_ms == at_switch.dynamic_ms
    assert "merge ahead" in ahead.reason
    # a merge that loses at the switch can win ahead: priced just above dynamic there, below it ahead
    model.observe_merge(at_switch.dynamic_ms - undo + 1.0)
    assert model.choose(work, True).kind is ApplyKind.DYNAMIC
    assert model.choose(work, True, ahead=True).kind is ApplyKind.MERGED


def test_a_managers_model_skips_the_first_merge_and_undo_it_sees() -> None:
    ref = cm.ltx2_reference_model()
    model = CostModel(ref.rates, ref.adapters, skip_cold=True)
    estimate, undo_estimate = model.merge_ms(), model.undo_ms()
    model.observe_merge(5000.0)  # the first merge of a process: the kernels compiled inside it
    model.observe_undo(900.0)
    assert (model.merge_ms(), model.undo_ms()) == (estimate, undo_estimate)
    model.observe_merge(120.0)
    model.observe_undo(3.0)
    assert (model.merge_ms(), model.undo_ms()) == (123.0, 3.0)
    with pytest.raises(ConfigError):
        model.observe_merge(-1.0)  # still checked while cold


@pytest.mark.parametrize("forward", ["peft", "fused"])
def test_a_compiled_dit_prices_device_time_only(forward: str) -> None:
    # compiled, the adapters' kernels launch with the graph's: no host time per layer; at a small
    # call the eager estimate is the host's, the compiled one far below it
    eager = CostModel(H100, cm.ltx2_adapter_cost(), dynamic_forward=forward)
    compiled = CostModel(H100, cm.ltx2_adapter_cost(), dynamic_forward=forward, compiled=True)
    host_ms = (FUSED_HOST_LAUNCHES if forward == "fused" else HOST_LAUNCHES_PER_ADAPTER) * 1344 * H100.launch_us / 1e3
    assert eager.forward_overhead_ms(64) == pytest.approx(host_ms)
    assert compiled.forward_overhead_ms(64) < host_ms / 10
    assert compiled.forward_overhead_ms(6144) == pytest.approx(eager.forward_overhead_ms(6144))  # device-bound


def test_merge_ahead_is_not_expected_to_hide_behind_a_compiled_call() -> None:
    from ltx2_residency.policy import hides_merge
    assert hides_merge(RECIPE[Phase.STAGE2], "cpu", compiled=True)  # the CPU merges inline either way
    small = PhaseWork(30, 1536, 2)
    assert hides_merge(small, "cuda") and not hides_merge(small, "cuda", compiled=True)
    assert not hides_merge(PhaseWork(3, 6144), "cuda")
