"""``ltx2 bench`` runs end to end on the tiny preset and its derived numbers are the arithmetic
of its measurements (no time is asserted: benchmarks report, tests check)."""

from __future__ import annotations

import json

import pytest

from ltx2_pipeline.cli import main
from ltx2_tools import bench
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures


def _case(e2e: float, weights: float) -> dict:
    return {"e2e_ms": e2e, "weight_management_ms": weights, "decisions": ["merge"] if weights > 50 else ["attach"]}


def test_derive_compares_auto_with_the_best_fixed_policy_and_a_premerged_dit() -> None:
    cases = {"normal/merge": _case(1000.0, 100.0), "normal/dynamic": _case(1200.0, 5.0),
             "normal/sglang": _case(1190.0, 5.0), "normal/auto": _case(1020.0, 100.0),
             "small/merge": _case(500.0, 100.0), "small/dynamic": _case(450.0, 5.0)}
    d = bench.derive(cases, ["normal", "small"], ["merge", "dynamic", "sglang", "auto"])
    assert d["normal"]["best_fixed_policy"] == "merge" and d["normal"]["best_fixed_e2e_ms"] == 1000.0
    assert d["normal"]["auto_vs_best_fixed"] == pytest.approx(0.02)
    assert d["normal"]["auto_decides_as"] == ["merge"]
    assert d["normal"]["premerged_e2e_ms"] == 900.0  # the merged run without its switch and restore
    assert d["normal"]["vs_premerged"]["dynamic"] == pytest.approx(1200 / 900 - 1)
    assert d["small"]["best_fixed_policy"] == "dynamic" and "auto_vs_best_fixed" not in d["small"]


def test_the_tiny_bench_runs_every_section_and_writes_its_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--scenarios", "normal", "hq",
                 "--policies", "merge", "dynamic", "auto", "--requests", "1", "--steps", "2",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    w = res["weights"]
    assert w["ours_requests_verified_clean"] == 3 and w["peft_layers_drifted_after_4_cycles"] > 0
    assert w["ratios"]["merge_vs_peft_merge"] == pytest.approx(w["ours_merge_ms"] / w["peft_merge_ms"])
    assert set(w["steps"]) == {"stage1", "stage2"}
    for s in w["steps"].values():
        assert s["dynamic_overhead"] == pytest.approx(s["dynamic_ms"] / s["merged_ms"] - 1)
        assert s["dynamic_peft_overhead"] == pytest.approx(s["dynamic_peft_ms"] / s["merged_ms"] - 1)
    r = res["requests"]
    assert set(r["cases"]) == {f"{s}/{p}" for s in ("normal", "hq") for p in ("merge", "dynamic", "auto")}
    assert all(c["dit_state_after"] == "clean" for c in r["cases"].values())
    assert r["drift_layers_after_all_requests"] == 0
    hq = r["cases"]["hq/merge"]
    assert "merge" in hq["decisions"] and hq["weight_management_ms"] > 0  # HQ stage 1 merges too
    assert "merge" not in r["cases"]["normal/dynamic"]["decisions"]
    normal = r["derived"]["normal"]
    fixed = {p: r["cases"][f"normal/{p}"]["e2e_ms"] for p in ("merge", "dynamic")}
    assert normal["best_fixed_e2e_ms"] == min(fixed.values())
    auto = r["cases"]["normal/auto"]["e2e_ms"]
    assert normal["auto_vs_best_fixed"] == pytest.approx(auto / min(fixed.values()) - 1)
    printed = capsys.readouterr().out
    assert "against the best fixed policy" in printed and "drift after all requests: 0 layers" in printed
