"""``python -m ltx2_tools.bench_compile`` runs end to end on the tiny DiT (CPU, aot_eager): its JSON
holds every field, the manager compiled no graph after the warm-up and left no weight dirty, and
bad arguments exit 2 before anything is built. No time is asserted: benchmarks report, tests check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltx2_tools import bench_compile
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

SMOKE = ["--shape", "tiny", "--device", "cpu", "--backend", "aot_eager", "--modes", "eager", "default",
         "--policies", "merge", "dynamic", "--requests", "1", "--stage1-calls", "1"]


def _exit_code(argv: list[str]) -> int:
    try:
        return bench_compile.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        return int(exc.code or 0)


def test_the_tiny_bench_measures_every_mode_and_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compile.json"
    assert bench_compile.main([*SMOKE, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["command"] == f"python -m ltx2_tools.bench_compile {' '.join(SMOKE)} --json {out}"
    assert res["device"] == "cpu" and res["torch"] and res["lora_layers"] > 0
    assert res["video_tokens"] == {"stage1": 32, "stage2": 128}
    assert list(res["modes"]) == ["eager", "default"]
    for mode, m in res["modes"].items():
        assert "error" not in m, m
        assert (m["spec"] is None) == (mode == "eager")
        for stage, c in m["calls"].items():
            assert c["video_tokens"] == res["video_tokens"][stage]
            assert c["first_call_s"] > 0 and c["wall_ms"] > 0 and c["kernel_ms"] > 0
            assert c["wall_over_kernels"] == pytest.approx(c["wall_ms"] / c["kernel_ms"])
            assert c["graphs"] == (0 if mode == "eager" else 1)  # one graph serves every block
        ideal = m["ideal"]
        assert ideal["request_ms"] == pytest.approx(ideal["stage1_ms"] + ideal["stage2_ms"])
        managed = m["managed"]
        assert managed["graphs_after_warmup"] == 0
        assert (managed["warmup_graphs"] > 0) == (mode != "eager")
        assert set(managed["policies"]) == {"merge", "dynamic"}
        for p in managed["policies"].values():
            assert p["failures"] == [] and p["dirty"] == 0 and p["graphs_after_warmup"] == 0
            assert len(p["runs"]) == 1 and p["warmup"]["strength"] == 1.0
            assert p["overhead"] == pytest.approx(p["request_ms"] / ideal["request_ms"] - 1)
        strengths = [p["runs"][0]["strength"] for p in managed["policies"].values()]
        assert len(set(strengths)) == len(strengths) and max(strengths) < 1.0  # new ones after the warm-up
        assert m["dirty_vs_host_copy"] == 0
    printed = capsys.readouterr().out
    assert "cpu, torch" in printed and res["command"] in printed and "| default | dynamic |" in printed


@pytest.mark.parametrize(("argv", "says"), [
    (["--shape", "real", "--device", "cpu"], "--shape real runs on a CUDA device"),
    (["--shape", "tiny", "--device", "cpu", "--modes", "eager", "fast"], "--modes fast"),
    (["--shape", "tiny", "--device", "cpu", "--backend", "aot_eager", "--modes", "reduce-overhead"],
     "--modes reduce-overhead"),
    (["--shape", "tiny", "--device", "cpu", "--backend", "nope"], "--backend 'nope'"),
    (["--shape", "tiny", "--device", "cpu", "--policies", "merge", "merge"], "--policies names one twice"),
    (["--shape", "tiny", "--device", "cpu", "--json", "/nonexistent/dir/out.json"], "does not exist"),
])
def test_bad_arguments_exit_2_before_anything_is_built(argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench_compile, "build", lambda *a: pytest.fail("built before the arguments were checked"))
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "GenerationInputError" in err


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--stage1-calls", "x"], ["--policies", "peft"],
                                  ["--shape", "huge"], ["--device", "tpu"]])
def test_argparse_refusals_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_compile, "build", lambda *a: pytest.fail("built before the arguments were checked"))
    assert _exit_code(["--shape", "tiny", *argv]) == 2


@pytest.mark.gpu
def test_the_tiny_bench_on_a_gpu_with_inductor_and_cuda_graphs(tmp_path: Path) -> None:
    out = tmp_path / "compile.json"
    assert bench_compile.main(["--shape", "tiny", "--device", "cuda", "--modes", "eager", "default", "reduce-overhead",
                               "--requests", "1", "--stage1-calls", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for m in res["modes"].values():
        assert "error" not in m, m
        assert m["peak_gib"] > 0 and m["dirty_vs_host_copy"] == 0
        assert m["managed"]["graphs_after_warmup"] == 0
        assert all(p["dirty"] == 0 for p in m["managed"]["policies"].values())
