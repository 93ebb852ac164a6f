"""``ltx2 generate --compile [MODE]`` and ``ltx2 bench --compile [MODE]`` (with ``--compile-backend``):
the flags parse to the :class:`~ltx2_residency.CompileSpec` they name, every bad combination is a
one-line error and exit 2 before anything loads, and a small compiled run of each command reports
its compile spec and the graphs each request compiled (none once warm).

The runs use the ``aot_eager`` backend: inductor works on a CPU too, but compiling the tiny DiT takes
it tens of seconds where ``aot_eager`` takes a few."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ltx2_pipeline import compiling
from ltx2_pipeline.cli import _parser, main
from ltx2_residency import COMPILE_MODES as MODES
from ltx2_residency import CompileSpec
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

#: A guard against a hung child only: the checks below never depend on how long a run takes.
HANG_S = 300


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_cli_offers_the_modes_compilespec_takes() -> None:
    assert compiling.COMPILE_MODES is MODES


@pytest.mark.parametrize(("flags", "spec"), [
    ([], None),
    (["--compile"], CompileSpec()),
    (["--compile", "max-autotune"], CompileSpec(mode="max-autotune")),
    (["--compile", "reduce-overhead", "--compile-backend", "inductor"], CompileSpec(mode="reduce-overhead")),
    (["--compile", "--compile-backend", "aot_eager"], CompileSpec(backend="aot_eager")),
    (["--compile", "default", "--compile-backend", "eager"], CompileSpec(backend="eager")),
])
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_the_flags_name_a_compile_spec(command: str, flags: list[str], spec: CompileSpec | None) -> None:
    # --compile takes its MODE or none: a following flag is not taken for one
    args = _parser().parse_args([command, *flags, "--device", "cpu"])
    assert compiling.compile_arguments(args) == spec


@pytest.mark.parametrize(("flags", "message"), [
    (["--compile-backend", "aot_eager"], "--compile-backend aot_eager applies with --compile only"),
    (["--compile", "max-autotune", "--compile-backend", "aot_eager"],
     "--compile max-autotune is a mode of the inductor backend, and --compile-backend aot_eager takes --compile "
     "default"),
    (["--compile", "--compile-backend", "no_such_backend"],
     "--compile-backend 'no_such_backend': compile backend 'no_such_backend' is not one this torch has"),
    (["--compile", "--compile-backend", ""], "--compile-backend '': CompileSpec.backend must be a backend name"),
])
@pytest.mark.parametrize("command", ["generate", "bench"])
def test_bad_compile_flags_are_refused_before_anything_loads(tmp_path: Path, capsys, command: str,
                                                             flags: list[str], message: str) -> None:
    out = tmp_path / ("video.mp4" if command == "generate" else "bench.json")
    where = ["--output", str(out)] if command == "generate" else ["--json", str(out)]
    assert main([command, "--preset", "tiny", *flags, *where]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: GenerationInputError: ") and message in lines[0], lines
    assert captured.out == "", "nothing started"
    assert not out.exists()


def test_the_parser_refuses_an_unknown_mode(capsys) -> None:
    for command in ("generate", "bench"):
        with pytest.raises(SystemExit) as info:
            main([command, "--compile", "sideways"])
        assert info.value.code == 2
        assert "argument --compile: invalid choice: 'sideways'" in capsys.readouterr().err


def test_bench_refuses_compile_without_the_requests_section(capsys) -> None:
    assert main(["bench", "--sections", "weights", "--compile"]) == 2
    assert "--compile applies to the requests section only" in capsys.readouterr().err


def _ltx2(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ltx2_pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_S)


@pytest.mark.parametrize("command", [["generate", "--preset", "tiny"], ["bench", "--preset", "tiny"]])
def test_the_console_script_says_it_in_one_line_without_a_traceback(tmp_path: Path, command: list[str]) -> None:
    proc = _ltx2(*command, "--compile", "reduce-overhead", "--compile-backend", "aot_eager", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--compile reduce-overhead is a mode of the inductor backend" in lines[0], lines
    assert not (tmp_path / "outputs").exists()


def test_generate_compiled_writes_the_video_and_reports_the_compilation(tmp_path: Path, capsys) -> None:
    mp4 = tmp_path / "video.mp4"
    code = main(["generate", "--preset", "tiny", "--compile", "--compile-backend", "aot_eager", "--steps", "1",
                 "--num-frames", "1", "--no-guidance", "--no-progress", "--output", str(mp4)])
    assert code == 0 and mp4.is_file()
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["compile"] == {"mode": "default", "backend": "aot_eager", "regional": True}
    assert report["graphs_compiled"] > 0 and 0 < report["compile_ms"] < report["e2e_ms"]
    assert report["dit_state_after"] == "clean"
    captured = capsys.readouterr()
    assert "DiT compiled (default, aot_eager)" in captured.out
    assert "DiT compiled (mode default, backend aot_eager)" in " ".join(captured.err.split())


def test_bench_compiled_compiles_in_the_warm_ups_only(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--sections", "requests", "--scenarios", "small",
                 "--policies", "merge", "--requests", "2", "--steps", "1", "--compile", "--compile-backend",
                 "aot_eager", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["requests"]
    assert r["compile"] == {"mode": "default", "backend": "aot_eager", "regional": True}
    # warmed until a request compiles nothing and decides as the one before it
    warmups = r["warmup"]
    assert {w["case"] for w in warmups} == {"small/merge"} and 2 <= len(warmups) <= 4
    assert warmups[0]["graphs_compiled"] > 0 and warmups[-1]["graphs_compiled"] == 0
    assert r["cases"]["small/merge"]["graphs_compiled_per_request"] == [0, 0]
    assert r["graphs_compiled_after_warmup"] == 0 and r["drift_layers_after_all_requests"] == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "DiT compiled (mode default, backend aot_eager)" in printed
    assert "the timed requests compiled 0" in printed
