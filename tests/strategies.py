"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

import threading

from hypothesis import strategies as st

from ltx2_residency import MergePolicyName, Phase, PhaseWork
from ltx2_residency.costmodel import DeviceRates

phases = st.sampled_from(list(Phase))
phase_values = st.sampled_from([p.value for p in Phase] + list(Phase))
policies = st.sampled_from([p.value for p in MergePolicyName])

#: Strengths a real request uses, including zero (no LoRA) and HQ values.
strengths = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.floats(min_value=0.0, max_value=1.5, allow_nan=False, allow_infinity=False, width=32),
)

#: Strength values every API must refuse.
bad_strengths = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.5, -1e-3, True, "1.0", None]),
    st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
)

fault_kinds = st.sampled_from(["exception", "keyboard_interrupt", "oom"])

# the cost model behind merge_policy="auto" (test_costmodel)
#: ``(out, in, rank, token_share)`` of one adapted layer.
layer_entries = st.tuples(st.integers(1, 16384), st.integers(1, 16384), st.integers(1, 512),
                          st.floats(0.0, 1.0, allow_nan=False))
layer_sets = st.lists(layer_entries, min_size=1, max_size=12)
device_rates = st.builds(DeviceRates, matmul_tflops=st.floats(0.01, 2000.0), hbm_gibps=st.floats(1.0, 8000.0),
                         launch_us=st.floats(0.5, 50.0))
phase_works = st.builds(PhaseWork, steps=st.integers(1, 60), tokens=st.integers(1, 32768), passes=st.integers(1, 4))
speedups = st.floats(1.01, 100.0)

# our dynamic forward (test_forward): one adapted Linear and its input
#: ``out``/``inp`` features, LoRA ranks (one or two LoRAs), a bias or not, leading input dims.
fused_linear_cases = st.fixed_dictionaries({
    "out": st.integers(1, 48), "inp": st.integers(1, 48),
    "ranks": st.lists(st.integers(1, 12), min_size=1, max_size=2),
    "bias": st.booleans(),
    "lead": st.sampled_from([(1,), (7,), (2, 5), (1, 3, 4)]),
    "seed": st.integers(0, 2**16),
})

# manager options (test_options) and LoRA strengths (test_lora)
#: Integers beyond float range: refused (or, for a timeout, no limit) without an OverflowError.
huge_ints = st.one_of(st.integers(min_value=2**1024, max_value=2**4000),
                      st.integers(min_value=-(2**4000), max_value=-(2**1024)))

#: Values a True/False option must refuse: never read for their truthiness.
not_bools = st.one_of(
    st.sampled_from(["no", "yes", "false", "True", "", 0, 1, 1.0, 0.0, [], {}, (), b"1"]),
    st.integers(), st.floats(), st.text(max_size=5),
)

#: Timeouts every API refuses: NaN, negative, bools, strings.
bad_timeouts = st.one_of(
    st.sampled_from([float("nan"), -float("inf"), True, False, "5", b"5", [5]]),
    st.floats(max_value=-1e-9, allow_nan=False), st.integers(max_value=-1),
)

#: Timeouts that mean "no limit": infinity, or longer than any lock can wait.
unlimited_timeouts = st.one_of(
    st.floats(min_value=threading.TIMEOUT_MAX, allow_nan=False, allow_infinity=True),
    st.integers(min_value=int(threading.TIMEOUT_MAX) + 1),
)

# LoRAs chosen per request (test_registry_stateful)
#: What ``request(loras={name: ...})`` takes for one LoRA: one strength for every phase, or the
#: strengths of some phases (by name or by ``Phase``; the phases not given: 0).
lora_request_strengths = st.one_of(strengths, st.dictionaries(phase_values, strengths, max_size=2))

#: A ``LoRASpec``'s strengths: ``None`` (the spec's default, 0 in stage 1 and 1.0 in stage 2) or both phases'.
lora_spec_strengths = st.none() | st.fixed_dictionaries({"stage1": st.just(0.0) | strengths, "stage2": strengths})

#: How many phases a request enters: stage 1 then stage 2, stage 1 only, or none.
phase_counts = st.sampled_from([2, 1, 2, 0])
