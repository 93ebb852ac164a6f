import pytest

from ltx2_residency import ApplyKind, ConfigError, Phase, ResidencyMode
from ltx2_residency.policy import PhaseContext, make_policy

ORIG, SNAP, RES = ResidencyMode.ORIGINAL, ResidencyMode.SNAPSHOT, ResidencyMode.RESIDENT
NORMAL = ({"distilled": 0.0}, {"distilled": 1.0})
HQ = ({"distilled": 0.25}, {"distilled": 0.5})


def decide(policy: str, mode: ResidencyMode, phase: Phase, variant: tuple, native: bool) -> ApplyKind:
    stage1, stage2 = variant
    strengths = stage1 if phase is Phase.STAGE1 else stage2
    return make_policy(policy).decide(PhaseContext(mode, phase, strengths, stage1, native))


# (policy, mode, phase, variant, native_ltx23) -> expected; written from the rules in the issue
CASES = [
    ("sglang", ORIG, Phase.STAGE2, NORMAL, True, ApplyKind.DYNAMIC),
    ("sglang", ORIG, Phase.STAGE2, NORMAL, False, ApplyKind.DYNAMIC),
    ("sglang", ORIG, Phase.STAGE1, NORMAL, True, ApplyKind.NONE),
    ("sglang", ORIG, Phase.STAGE1, HQ, True, ApplyKind.MERGED),
    ("sglang", ORIG, Phase.STAGE1, HQ, False, ApplyKind.DYNAMIC),
    ("sglang", ORIG, Phase.STAGE2, HQ, True, ApplyKind.DYNAMIC),
    ("sglang", SNAP, Phase.STAGE2, NORMAL, True, ApplyKind.MERGED),
    ("sglang", RES, Phase.STAGE2, NORMAL, False, ApplyKind.DYNAMIC),
    ("sglang", RES, Phase.STAGE1, HQ, True, ApplyKind.MERGED),
    ("dynamic", ORIG, Phase.STAGE1, HQ, True, ApplyKind.DYNAMIC),
    ("dynamic", ORIG, Phase.STAGE2, NORMAL, True, ApplyKind.DYNAMIC),
    ("dynamic", ORIG, Phase.STAGE1, NORMAL, True, ApplyKind.NONE),
    ("merge", ORIG, Phase.STAGE1, HQ, False, ApplyKind.MERGED),
    ("merge", ORIG, Phase.STAGE2, NORMAL, False, ApplyKind.MERGED),
    ("merge", ORIG, Phase.STAGE1, NORMAL, False, ApplyKind.NONE),
]


@pytest.mark.parametrize(("policy", "mode", "phase", "variant", "native", "expected"), CASES)
def test_policy_table(policy, mode, phase, variant, native, expected) -> None:
    assert decide(policy, mode, phase, variant, native) is expected


def test_policy_names_parse_and_unknown_is_refused() -> None:
    assert make_policy(" Merge ").name.value == "merge"
    with pytest.raises(ConfigError, match="unknown merge policy: 'sometimes'.*'sglang', 'dynamic', 'merge', 'auto'"):
        make_policy("sometimes")
