"""Hypothesis strategies shared by the test modules."""

from __future__ import annotations

from hypothesis import strategies as st

from ltx2_residency import MergePolicyName, Phase

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
