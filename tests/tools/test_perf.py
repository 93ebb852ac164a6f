"""``ltx2 perf-check`` and its baselines: the checker on synthetic numbers (a regression on each
metric kind is caught, a run within tolerance passes, the absolute floor, placeholders refused),
one real tiny CPU case end to end, the CLI's exit codes, ``--update``, and the plot's PNG.

No timing assertion anywhere: the real runs are checked for the fields they report and for the
verdict against expectations that no machine can miss (1e-6 ms) or fail (1e9 ms).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ltx2_pipeline.cli import main
from ltx2_tools import perf
from ltx2_tools.perf import (
    BaselineError,
    CaseCannotRun,
    CaseSpec,
    Regression,
    case_baseline,
    compare,
    improved,
    load_baselines,
    run_case,
)
from ltx2_tools.plot import load_results, plot
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

ROOT = Path(__file__).resolve().parents[2]
SWITCH_STAGES = ("LTX2LoRASwitchStage_stage1", "LTX2LoRASwitchStage_stage2")
WEIGHT_STAGES = (*SWITCH_STAGES, "LTX2LoRARestoreStage")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOL = {"e2e": 0.25, "denoise": 0.25, "stage": 0.5, "vram": 0.05, "stage_abs_floor_ms": 5.0}
#: A tiny case small enough for the suite: 2 stage-1 steps, one timed request, no warm-up.
FAST_TINY = dict(preset="tiny", device="cpu", variant="hq", mode="original", merge_policy="merge",
                 height=64, width=64, frames=9, steps=2, requests=1, warmup=0)


def synthetic_baseline(**overrides: Any) -> dict[str, Any]:
    stages = {"TextEncodingStage": 100.0, "LTX2LoRASwitchStage_stage1": 50.0, "LTX2AVDenoisingStage": 2000.0,
              "LTX2LoRASwitchStage_stage2": 0.05, "LTX2LoRARestoreStage": 40.0, "LTX2AVDecodingStage": 300.0}
    return {"case": "synthetic", "stages_ms": stages, "expected_e2e_ms": 3000.0, "expected_avg_denoise_ms": 200.0,
            "expected_median_denoise_ms": 190.0, "expected_weight_management_ms": 90.05,
            "expected_peak_vram_gib": 60.0, "tolerances": dict(TOL), **overrides}


def result_at(baseline: dict[str, Any], factor: float) -> dict[str, Any]:
    """A result with every metric at ``factor`` × its expectation, the DiT clean."""
    return {"case": "synthetic", "e2e_ms": baseline["expected_e2e_ms"] * factor,
            "avg_denoise_ms": baseline["expected_avg_denoise_ms"] * factor,
            "median_denoise_ms": baseline["expected_median_denoise_ms"] * factor,
            "weight_management_ms": baseline["expected_weight_management_ms"] * factor,
            "peak_vram_gib": baseline["expected_peak_vram_gib"] * factor,
            "stages_ms": {k: v * factor for k, v in baseline["stages_ms"].items()}, "dit_state_after": "clean"}


def write_baselines(path: Path, cases: dict[str, dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"meta": {"description": "test"}, "tolerances": TOL, "cases": cases}, indent=2))
    return path


def expectations(value: float) -> dict[str, Any]:
    return {"stages_ms": {s: value for s in WEIGHT_STAGES}, "expected_e2e_ms": value,
            "expected_avg_denoise_ms": value, "expected_median_denoise_ms": value,
            "expected_weight_management_ms": value, "expected_peak_vram_gib": None}


# ---------------------------------------------------------------------------- the checker
def test_every_metric_within_tolerance_passes() -> None:
    base = synthetic_baseline()
    # 1.04: inside the tightest tolerance (vram, 5 %)
    assert compare(result_at(base, 1.04), base) == []
    assert compare(result_at(base, 0.5), base) == []  # faster is never a regression


@pytest.mark.parametrize(("metric", "key", "value", "tolerance"), [
    ("e2e_ms", "e2e_ms", 3000.0 * 1.3, 0.25),
    ("median_denoise_ms", "median_denoise_ms", 190.0 * 1.3, 0.25),
    ("stages_ms.LTX2LoRASwitchStage_stage1", "LTX2LoRASwitchStage_stage1", 50.0 * 1.6, 0.5),
    ("stages_ms.LTX2AVDenoisingStage", "LTX2AVDenoisingStage", 2000.0 * 1.6, 0.5),
    ("weight_management_ms", "weight_management_ms", 90.05 * 1.6, 0.5),
    ("peak_vram_gib", "peak_vram_gib", 60.0 * 1.06, 0.05),
])
def test_a_regression_on_each_metric_kind_is_named(metric: str, key: str, value: float, tolerance: float) -> None:
    base = synthetic_baseline()
    result = result_at(base, 1.0)
    if key in result["stages_ms"]:
        result["stages_ms"][key] = value
    else:
        result[key] = value
    [reg] = compare(result, base)
    assert isinstance(reg, Regression) and reg.metric == metric
    assert reg.measured == pytest.approx(value) and reg.tolerance == tolerance
    assert reg.expected is not None and reg.limit == pytest.approx(max(reg.expected * (1 + tolerance),
                                                                       reg.expected + reg.floor))
    assert reg.over == pytest.approx(value - reg.limit) and reg.over > 0
    assert reg.over_fraction == pytest.approx(value / reg.expected - 1)
    assert metric in str(reg) and "limit" in str(reg)


def test_the_mean_step_is_reported_but_never_compared() -> None:
    # one cold step among a few moves the mean far past the tolerance; the median stays put
    base = synthetic_baseline()
    result = {**result_at(base, 1.0), "avg_denoise_ms": base["expected_avg_denoise_ms"] * 3}
    assert compare(result, base) == []
    assert "avg_denoise_ms" not in {c.metric for c in perf.checks(result, base)}


def test_medians_over_the_timed_requests_ignore_one_cold_step() -> None:
    def report(e2e: float, steps: list[float], switch: float) -> dict[str, Any]:
        return {"pipeline": "LTX2TwoStagePipeline", "variant": "normal", "mode": "original", "merge_policy": "merge",
                "device": "cpu", "e2e_ms": e2e, "denoise_step_ms": {"stage1": steps, "stage2": [10.0] * 3},
                "stages_ms": {"LTX2LoRASwitchStage_stage1": switch, "LTX2AVDenoisingStage": sum(steps)},
                "memory": {"peak_device_bytes": None, "peak_host_rss_bytes": 2**30}, "trace": [],
                "dit_state_after": "clean"}

    manager = SimpleNamespace(exact_kernel="recompute", low_vram=False, state=SimpleNamespace(value="clean"))
    # the first timed request met a cold cache: its first step, its switch and its e2e are 10x
    reports = [report(1000.0, [200.0, 20.0, 20.0, 20.0], 50.0)] + [report(100.0, [20.0] * 4, 5.0)] * 2
    result = perf.summarize(reports, manager)  # type: ignore[arg-type]
    assert (result["e2e_ms"], result["median_denoise_ms"]) == (100.0, 20.0)
    assert result["stages_ms"]["LTX2LoRASwitchStage_stage1"] == 5.0 and result["weight_management_ms"] == 5.0
    assert result["denoise_step_ms"]["stage1"] == [20.0] * 4
    assert result["avg_denoise_ms"] > 20.0  # reported as measured
    baseline = {"case": "cold", "stages_ms": {"LTX2LoRASwitchStage_stage1": 5.0}, "expected_e2e_ms": 100.0,
                "expected_avg_denoise_ms": 17.0, "expected_median_denoise_ms": 20.0,
                "expected_weight_management_ms": 5.0, "tolerances": {**TOL, "stage_abs_floor_ms": 0.0}}
    assert compare(result, baseline) == []


def test_perf_check_help_says_what_is_compared(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["perf-check", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "warm-up requests first (untimed, dropped)" in text and "median" in text
    assert "mean denoise step is reported, never compared" in text and "--baselines PATH" in text


def test_a_dit_left_dirty_and_a_missing_stage_are_regressions() -> None:
    base = synthetic_baseline()
    result = result_at(base, 1.0)
    result["dit_state_after"] = "merged_stage2"
    del result["stages_ms"]["LTX2LoRARestoreStage"]
    regs = {r.metric: r for r in compare(result, base)}
    assert set(regs) == {"dit_state_after", "stages_ms.LTX2LoRARestoreStage"}
    assert "'merged_stage2'" in str(regs["dit_state_after"])
    assert regs["stages_ms.LTX2LoRARestoreStage"].measured is None
    assert "not measured" in str(regs["stages_ms.LTX2LoRARestoreStage"])


def test_a_stage_regresses_only_past_the_tolerance_and_the_absolute_floor() -> None:
    base = synthetic_baseline()  # LTX2LoRASwitchStage_stage2 expects 0.05 ms, floor 5 ms
    result = result_at(base, 1.0)
    result["stages_ms"]["LTX2LoRASwitchStage_stage2"] = 4.9  # 98x the expectation, under the floor
    assert compare(result, base) == []
    result["stages_ms"]["LTX2LoRASwitchStage_stage2"] = 5.1
    [reg] = compare(result, base)
    assert reg.metric == "stages_ms.LTX2LoRASwitchStage_stage2" and reg.limit == pytest.approx(5.05)
    # without a floor the relative tolerance alone decides
    no_floor = synthetic_baseline(tolerances={**TOL, "stage_abs_floor_ms": 0.0})
    result["stages_ms"]["LTX2LoRASwitchStage_stage2"] = 0.1
    assert [r.metric for r in compare(result, no_floor)] == ["stages_ms.LTX2LoRASwitchStage_stage2"]
    # the floor is for stages: e2e past its tolerance fails even when the excess is tiny
    small = synthetic_baseline(expected_e2e_ms=1.0)
    assert [r.metric for r in compare({**result_at(small, 1.0), "e2e_ms": 1.3}, small)] == ["e2e_ms"]


def test_improvements_are_reported_past_the_threshold_and_the_floor() -> None:
    base = synthetic_baseline()
    fast = result_at(base, 0.5)
    rows = {c.metric: c for c in perf.checks(fast, base)}
    assert improved(rows["e2e_ms"], 0.2) and not improved(rows["e2e_ms"], 0.6)
    # 0.05 -> 0.025 ms is half, but within the floor: noise, not an improvement
    assert not improved(rows["stages_ms.LTX2LoRASwitchStage_stage2"], 0.2)


@pytest.mark.parametrize("hole", [
    {"expected_e2e_ms": None},
    {"expected_median_denoise_ms": None},
    {"stages_ms": None},
    {"stages_ms": {"TextEncodingStage": 1.0, "LTX2LoRASwitchStage_stage1": None}},
])
def test_null_expectations_are_refused(hole: dict[str, Any]) -> None:
    base = synthetic_baseline(status="to be measured on the device", **hole)
    with pytest.raises(BaselineError) as info:
        compare(result_at(synthetic_baseline(), 1.0), base)
    message = str(info.value)
    assert "no expected numbers yet" in message and "to be measured on the device" in message
    assert "--update" in message and next(iter(hole)) in message


def test_tolerances_resolve_defaults_then_file_then_case() -> None:
    doc = {"tolerances": {"e2e": 0.3, "stage": 0.7}, "improvement_reporting": {"threshold": 0.1},
           "cases": {"a": {"tolerances": {"e2e": 0.9}}, "b": {}}}
    a, b = case_baseline(doc, "a"), case_baseline(doc, "b")
    assert a["tolerances"] == {**perf.DEFAULT_TOLERANCES, "e2e": 0.9, "stage": 0.7}
    assert b["tolerances"] == {**perf.DEFAULT_TOLERANCES, "e2e": 0.3, "stage": 0.7}
    assert a["improvement_threshold"] == 0.1
    assert doc["cases"]["a"] == {"tolerances": {"e2e": 0.9}}  # resolving never edits the file's dict
    with pytest.raises(BaselineError, match=r"unknown case 'c'; known cases: a, b"):
        case_baseline(doc, "c")


@pytest.mark.parametrize(("entry", "message"), [
    ({"device": "cpu"}, "needs a 'preset' and a 'device'"),
    ({"preset": "huge", "device": "cpu"}, "preset='huge'; expected one of tiny, full"),
    ({"preset": "tiny", "device": "tpu"}, "device='tpu'"),
    ({"preset": "tiny", "device": "cpu", "variant": "lq"}, "variant='lq'"),
    ({"preset": "tiny", "device": "cpu", "steps": 0}, "steps=0; expected an integer ≥ 1"),
    ({"preset": "tiny", "device": "cpu", "warmup": -1}, "warmup=-1; expected an integer ≥ 0"),
    ({"preset": "tiny", "device": "cpu", "height": True}, "height=True"),
    ({"preset": "tiny", "device": "cpu", "low_vram": "yes"}, "low_vram='yes'"),
    ({"preset": "tiny", "device": "cpu", "manager_options": []}, "manager_options must be an object"),
])
def test_a_bad_case_entry_is_refused_with_the_field_named(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(BaselineError) as info:
        CaseSpec.from_entry("bad", entry)
    assert "case 'bad'" in str(info.value) and message in str(info.value)


def test_a_case_spec_keeps_what_core_validates_as_given() -> None:
    spec = CaseSpec.from_entry("x", {"preset": "full", "device": "cuda", "merge_policy": "auto",
                                     "mode": "snapshot", "low_vram": False, "expected_e2e_ms": 1.0,
                                     "manager_options": {"strict": False}})
    assert (spec.merge_policy, spec.mode, spec.low_vram, spec.exact_kernel) == ("auto", "snapshot", False, "auto")
    assert (spec.requests, spec.warmup) == (3, 1) and spec.manager_options == {"strict": False}


def test_the_shipped_baselines_file() -> None:
    # package data: the path an installed wheel has too (tests/test_packaging.py checks the wheel)
    shipped = importlib.resources.files("ltx2_tools") / "perf_baselines.json"
    assert shipped.is_file() and Path(str(shipped)) == perf.DEFAULT_BASELINES
    assert not (ROOT / "perf_baselines.json").exists(), "one copy: the package's"
    doc = load_baselines()
    assert {"description", "refresh", "tolerance_semantics"} <= set(doc["meta"])
    assert set(perf.DEFAULT_TOLERANCES) <= set(doc["tolerances"])
    cases = doc["cases"]
    tiny = {"tiny_cpu_normal_sglang", "tiny_cpu_normal_merge", "tiny_cpu_hq_merge", "tiny_cpu_snapshot_dynamic"}
    full = {"full_h100_normal_sglang", "full_h100_normal_merge", "full_h100_hq_merge", "full_h100_small_merge"}
    assert tiny | full <= set(cases)
    for name, entry in cases.items():
        spec = CaseSpec.from_entry(name, entry)
        baseline = case_baseline(doc, name)
        if name.startswith("tiny_cpu"):
            assert (spec.preset, spec.device) == ("tiny", "cpu")
            perf.check_expectations(name, baseline)
            assert set(WEIGHT_STAGES) <= set(entry["stages_ms"])
            assert entry["measured"]["device_name"] and entry["measured"]["torch"]
        elif name.startswith("full_h100"):
            assert (spec.preset, spec.device, spec.steps, spec.frames) == ("full", "cuda", 4, 121)
            assert (spec.width, spec.height) == ((384, 256) if "small" in name else (768, 512))
            if entry.get("status") != "measured":
                assert entry["status"] == "to be measured on the device" and entry["expected_e2e_ms"] is None
                with pytest.raises(BaselineError, match="no expected numbers yet"):
                    perf.check_expectations(name, baseline)


# ---------------------------------------------------------------------------- a real run
def test_run_case_runs_the_pipeline_and_reports_every_field() -> None:
    result = run_case(CaseSpec(name="t", **FAST_TINY))
    assert result["dit_state_after"] == "clean"
    assert result["pipeline"] == "LTX2TwoStageHQPipeline" and result["merge_policy"] == "merge"
    assert (result["case"], result["requests"], result["warmup"]) == ("t", 1, 0)
    assert len(result["e2e_ms_per_request"]) == 1 and result["e2e_ms"] == result["e2e_ms_per_request"][0]
    assert (len(result["denoise_step_ms"]["stage1"]), len(result["denoise_step_ms"]["stage2"])) == (2, 3)
    assert result["avg_denoise_ms"] > 0 and result["median_denoise_ms"] > 0
    stages = result["stages_ms"]
    assert set(WEIGHT_STAGES) | {"TextEncodingStage", "LTX2AVDenoisingStage", "LTX2AVDecodingStage"} <= set(stages)
    assert all(ms >= 0 for ms in stages.values()) and sum(stages.values()) <= result["e2e_ms"]
    weights = sum(ms for s, ms in stages.items() if s.startswith("LTX2LoRA"))
    assert result["weight_management_ms"] == pytest.approx(weights)
    assert result["weight_management_fraction"] == pytest.approx(weights / result["e2e_ms"])
    # hq + merge: both stages merge, so the trace has work on both switches and a restore
    assert result["trace"][:2] == ["merge", "merged_stage1"] and result["trace"][-1] == "restored"
    assert result["peak_vram_gib"] is None and result["peak_rss_gib"] > 0
    assert result["device"] == "cpu" and result["device_name"] and result["cpu_count"] >= 1
    assert result["torch"] == torch.__version__ and result["diffusers"]
    assert result["exact_kernel"] == "recompute"  # "auto" on a CPU
    json.dumps(result)  # what --json writes


def test_a_cuda_case_without_cuda_cannot_run() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CaseCannotRun, match="needs a CUDA device"):
        run_case(CaseSpec(name="g", **{**FAST_TINY, "preset": "full", "device": "cuda"}))


# ---------------------------------------------------------------------------- the CLI
def test_list_prints_every_case(tmp_path: Path, capsys) -> None:
    path = write_baselines(tmp_path / "b.json", {"one": {**FAST_TINY, **expectations(1.0)},
                                                 "two": {**FAST_TINY, "status": "to be measured"}})
    assert main(["perf-check", "--list", "--baselines", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["one", "two"]
    assert "e2e 1.0 ms" in lines[0] and "to be measured" in lines[1]
    assert main(["perf-check", "--list"]) == 0  # the repository's file
    assert "tiny_cpu_normal_merge" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--case", "nope"], "unknown case 'nope'; known cases: placeholder, real"),
    (["--case", "placeholder"], "case 'placeholder' has no expected numbers yet"),
    ([], "name a case with --case"),
    (["--case", "real", "--baselines", "missing.json"], "'missing.json' does not exist"),
])
def test_bad_input_exits_2_before_any_run(tmp_path: Path, capsys, monkeypatch, args, message) -> None:
    monkeypatch.setattr(perf, "run_case", lambda spec: pytest.fail("bad input must not cost a run"))
    path = write_baselines(tmp_path / "b.json", {"placeholder": {**FAST_TINY, "status": "to be measured",
                                                                 "expected_e2e_ms": None},
                                                 "real": {**FAST_TINY, **expectations(1.0)}})
    assert main(["perf-check", "--baselines", str(path), *args]) == 2
    assert message in capsys.readouterr().err.replace("\n", "")


def test_a_cuda_case_on_a_cpu_machine_exits_3(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_baselines(tmp_path / "b.json", {"gpu": {**FAST_TINY, "device": "cuda", **expectations(1.0)}})
    assert main(["perf-check", "--case", "gpu", "--baselines", str(path)]) == 3
    assert "cannot run here" in (err := capsys.readouterr().err) and "needs a CUDA device" in err


def test_impossible_expectations_exit_1_and_name_the_regression(tmp_path: Path, capsys) -> None:
    entry = {**FAST_TINY, **expectations(1e-6), "tolerances": {"stage_abs_floor_ms": 0.0}}
    path = write_baselines(tmp_path / "b.json", {"tiny": entry})
    assert main(["perf-check", "--case", "tiny", "--baselines", str(path)]) == 1
    err = capsys.readouterr().err.replace("\n", "")
    assert "REGRESSION e2e_ms:" in err and "REGRESSION stages_ms.LTX2LoRASwitchStage_stage1:" in err
    assert "DiT after the requests: clean" in err


def test_generous_expectations_exit_0_and_the_json_plots(tmp_path: Path, capsys) -> None:
    path = write_baselines(tmp_path / "b.json", {"tiny": {**FAST_TINY, **expectations(1e9)}})
    before = path.read_text()
    out = tmp_path / "bench" / "tiny.json"
    assert main(["perf-check", "--case", "tiny", "--baselines", str(path), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "REGRESSION" not in err and "LTX2LoRASwitchStage_stage2" in err
    assert path.read_text() == before  # only --update writes the baselines
    bench = json.loads(out.read_text())
    assert bench["tiny"]["verdict"] == "ok" and bench["tiny"]["regressions"] == []
    assert set(WEIGHT_STAGES) <= set(bench["tiny"]["stages_ms"])

    # the plot: this run twice (the second under another name, as from a second file) plus a list
    twin = copy.deepcopy(bench["tiny"]) | {"case": "twin"}
    results = load_results(out, [twin, {"not": "a result"}])
    assert list(results) == ["tiny", "twin"]
    png = plot(results, tmp_path / "plots" / "bench.png", title="test")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0  # something was drawn

    from ltx2_tools.plot import main as plot_main

    assert plot_main([str(out), str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").read_bytes()[:8] == PNG_SIGNATURE
    (tmp_path / "empty.json").write_text("{}")
    assert plot_main([str(tmp_path / "empty.json"), str(tmp_path / "none.png")]) == 2
    assert "no results to plot" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_update_rewrites_the_case_and_keeps_its_tolerances(tmp_path: Path, capsys) -> None:
    placeholder = {**FAST_TINY, "tolerances": {"e2e": 0.9}, "status": "to be measured",
                   "stages_ms": {s: None for s in WEIGHT_STAGES}, "expected_e2e_ms": None}
    other = {**FAST_TINY, **expectations(7.0)}
    path = write_baselines(tmp_path / "b.json", {"tiny": placeholder, "other": other})
    assert main(["perf-check", "--case", "tiny", "--baselines", str(path), "--update"]) == 0
    assert "updated 'tiny'" in capsys.readouterr().err
    doc = json.loads(path.read_text())
    entry = doc["cases"]["tiny"]
    assert entry["status"] == "measured" and entry["tolerances"] == {"e2e": 0.9}
    assert {k: entry[k] for k in FAST_TINY} == FAST_TINY
    assert entry["expected_e2e_ms"] > 0 and entry["expected_avg_denoise_ms"] > 0
    assert entry["expected_peak_vram_gib"] is None  # a CPU case has no device peak
    assert set(WEIGHT_STAGES) <= set(entry["stages_ms"]) and None not in entry["stages_ms"].values()
    assert entry["expected_weight_management_ms"] == pytest.approx(
        sum(v for s, v in entry["stages_ms"].items() if s.startswith("LTX2LoRA")), abs=0.01)
    assert entry["measured"]["device_name"] and entry["measured"]["date"]
    assert doc["cases"]["other"] == other and doc["tolerances"] == TOL  # nothing else moves
    perf.check_expectations("tiny", case_baseline(doc, "tiny"))  # now a checkable case


def test_a_request_the_pipeline_refuses_exits_2(tmp_path: Path, capsys) -> None:
    path = write_baselines(tmp_path / "b.json", {"odd": {**FAST_TINY, "height": 100, **expectations(1e9)}})
    assert main(["perf-check", "--case", "odd", "--baselines", str(path)]) == 2
    assert "height=100: must be a positive multiple of 64" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize(("state", "ok"), [("clean", True), ("offloaded", True), ("quarantined", False),
                                           ("restoring", False)])
def test_a_dit_at_rest_passes_whichever_rest_its_mode_has(state: str, ok: bool) -> None:
    # low-VRAM snapshot mode rests with its base offloaded to the pinned snapshot between requests
    base = synthetic_baseline()
    regs = {r.metric for r in compare({**result_at(base, 1.0), "dit_state_after": state}, base)}
    assert ("dit_state_after" not in regs) is ok


def test_update_refuses_a_run_that_left_the_dit_dirty(tmp_path: Path, capsys, monkeypatch) -> None:
    # a dirty DiT cannot be produced on purpose through the pipeline: the run is synthetic here
    path = write_baselines(tmp_path / "b.json", {"tiny": {**FAST_TINY, **expectations(1.0)}})
    before = path.read_text()
    dirty = {**result_at(synthetic_baseline(), 1.0), "dit_state_after": "merged_stage2", "device_name": "cpu",
             "mode": "original", "merge_policy": "merge", "weight_management_fraction": 0.03}
    monkeypatch.setattr(perf, "run_case", lambda spec: dirty)
    assert main(["perf-check", "--case", "tiny", "--baselines", str(path), "--update"]) == 1
    assert "not updated" in (err := capsys.readouterr().err) and "'merged_stage2'" in err
    assert path.read_text() == before


def test_a_much_faster_run_passes_and_suggests_a_refresh(tmp_path: Path, capsys, monkeypatch) -> None:
    base = synthetic_baseline()
    entry = {**FAST_TINY, **{k: v for k, v in base.items() if k != "case"}}
    path = write_baselines(tmp_path / "b.json", {"tiny": entry})
    fast = {**result_at(base, 0.5), "device_name": "cpu", "mode": "original", "merge_policy": "merge",
            "weight_management_fraction": 0.03}
    monkeypatch.setattr(perf, "run_case", lambda spec: fast)
    assert main(["perf-check", "--case", "tiny", "--baselines", str(path)]) == 0
    err = capsys.readouterr().err.replace("\n", "")
    assert "improved" in err and "perf-check --case tiny --update" in err and "REGRESSION" not in err
