"""``ltx2``: generate writes a playable mp4 with audio and a JSON report; every argument is
checked before anything loads, and every error is one line on stderr (exit 2 for bad input, 1
for a failed run, 130 on Ctrl-C), never a traceback; diagram prints the tables' diagrams.

The error paths run the real console script in a subprocess: what a user sees is the exit
status and stderr of that process."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import pytest
import tomllib
import torch

from ltx2_pipeline import checks
from ltx2_pipeline.cli import _lora_arg, main
from ltx2_residency import TABLES, ResidencyMode, mermaid
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

ROOT = Path(__file__).resolve().parents[2]
SWITCH_STAGES = ("LTX2LoRASwitchStage_stage1", "LTX2LoRASwitchStage_stage2")
#: A guard against a hung child only: the checks below never depend on how long a run takes.
HANG_S = 300


def generate(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    mp4 = tmp_path / "out" / "video.mp4"
    mp4.parent.mkdir(exist_ok=True)
    code = main(["generate", "--preset", "tiny", "--output", str(mp4), "--no-progress", "--steps", "2", *extra])
    return code, mp4


@pytest.mark.parametrize("extra", [(), ("--variant", "hq", "--mode", "snapshot", "--merge-policy", "merge")])
def test_generate_writes_a_playable_mp4_with_audio_and_a_report(tmp_path: Path, capsys, extra) -> None:
    code, mp4 = generate(tmp_path, *extra)
    assert code == 0
    with av.open(str(mp4)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (64, 64)
        assert audio.channels == 2 and audio.rate == 16_000
        assert sum(1 for _ in container.decode(video=0)) == 9
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["output"] == {"mp4": str(mp4), "frames": 9, "height": 64, "width": 64, "audio_sample_rate": 16_000}
    assert report["e2e_ms"] > 0 and report["avg_denoise_ms"] > 0
    assert all(name in report["stages_ms"] for name in SWITCH_STAGES)
    assert len(report["denoise_step_ms"]["stage1"]) == 2 and len(report["denoise_step_ms"]["stage2"]) == 3
    assert report["dit_state_after"] == "clean"
    assert report["trace"] and report["trace"][-1]["dest"] == "clean"
    assert "peak_host_rss_bytes" in report["memory"] and "manager" in report["memory"]
    if extra:
        assert report["variant"] == "hq" and report["mode"] == "snapshot"
        assert [r["event"] for r in report["trace"]][:2] == ["merge", "merged_stage1"]
    assert "wrote" in capsys.readouterr().err


def test_generate_takes_a_distilled_lora_file_in_original_format(tmp_path: Path) -> None:
    from ltx2_pipeline.loras import to_original_format
    from ltx2_pipeline.presets import tiny_preset

    path = save_lora(tmp_path / "distilled.safetensors", to_original_format(tiny_preset(seed=0)[1]))
    code, mp4 = generate(tmp_path, "--distilled-lora", path, "--lora", f"{path}@0,0.5")
    assert code == 0
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert set(report["memory"]["manager"]) >= {"lora_adapter_bytes"}


@pytest.mark.parametrize(("args", "message"), [
    (["--distilled-lora", "missing.safetensors"], "--distilled-lora 'missing.safetensors' does not exist"),
    (["--height", "100"], "height=100: must be a positive multiple of 64"),
    (["--num-frames", "8"], "num_frames=8"),
    (["--lora", "style.safetensors@1"], "--lora 'style.safetensors@1' does not exist (strengths go after the last"),
])
def test_bad_arguments_get_a_clear_error_and_exit_2(tmp_path: Path, capsys, args, message) -> None:
    code, mp4 = generate(tmp_path, *args)
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert not mp4.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "sideways"], "invalid choice: 'sideways'"),
    (["--merge-policy", "always"], "invalid choice: 'always'"),
    (["--stage2-strength", "nan"], "strength must be finite"),
    (["--preset", "tiny", "--model-path", "x"], "not allowed with argument"),
])
def test_unknown_options_are_refused_by_the_parser(capsys, args, message) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_diagram_prints_every_modes_diagram_from_its_table(capsys) -> None:
    assert main(["diagram"]) == 0
    out = capsys.readouterr().out
    for mode in ResidencyMode:
        assert mermaid(TABLES[mode]) in out
    assert main(["diagram", "--mode", "resident"]) == 0
    assert capsys.readouterr().out.strip().endswith(mermaid(TABLES[ResidencyMode.RESIDENT]).strip())


def test_the_console_script_and_make_demo_point_here(capsys) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["ltx2"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    assert entry(["diagram", "--mode", "resident"]) == 0  # the entry point reaches this CLI
    assert capsys.readouterr().out.strip().endswith(mermaid(TABLES[ResidencyMode.RESIDENT]).strip())
    assert "ltx2 generate --preset tiny" in (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------------- the console script, as users run it
def ltx2(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ltx2_pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_S)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The run exited ``code`` with exactly one line on stderr, an ``error:`` line; returns it."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    return lines[0]


def tiny_lora_file(path: Path, scale: float = 1.0) -> Path:
    """A LoRA on the tiny DiT's self-attention, its factors scaled by ``scale`` (finite either way)."""
    from ltx2_pipeline.tiny import tiny_transformer

    dit = tiny_transformer(seed=0)
    tensors = synthetic_lora(dit, [n for n in linear_names(dit) if ".attn1." in n], rank=4, relative_norm=0.1, seed=7)
    return Path(save_lora(path, {k: v * scale for k, v in tensors.items()}))


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "gpu0"], "argument --device: 'gpu0' is not a torch device"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--max-sequence-length", "-5"], "argument --max-sequence-length: must be an integer ≥ 1, got '-5'"),
    (["--max-sequence-length", "0"], "argument --max-sequence-length: must be an integer ≥ 1, got '0'"),
    (["--output", "/etc/passwd/x.mp4"], "'/etc/passwd' is a file, not a directory"),
    (["--output", "{tmp}/missing/x.mp4"], "the directory '{tmp}/missing' does not exist"),
    (["--output", "{tmp}"], "is a directory"),
    (["--output", "{tmp}/x.txt"], "give a file ending in .mp4"),
    (["--output", "{tmp}/x.mp4", "--report", "{tmp}/x.mp4"], "is the video's own path"),
    (["--report", "/etc/passwd/r.json"], "--report '/etc/passwd/r.json'"),
    (["--steps", "0"], "argument --steps: must be an integer ≥ 1, got '0'"),
    (["--steps", "-2"], "argument --steps: must be an integer ≥ 1"),
    (["--steps", "two"], "argument --steps: expected an integer ≥ 1, got 'two'"),
    (["--stage2-strength", "1e30"], "argument --stage2-strength: strength 1e+30 is above 10"),
    (["--stage1-strength", "inf"], "argument --stage1-strength: strength must be finite"),
    (["--stage1-strength", "nan"], "argument --stage1-strength: strength must be finite"),
    (["--lora", "style.safetensors@1e30,1"], "stage 1: strength 1e+30 is above 10"),
    (["--lora", "style.safetensors@1,nan"], "stage 2: strength must be finite"),
    (["--frame-rate", "inf"], "argument --frame-rate: must be a finite number > 0"),
    (["--seed", "-1"], "argument --seed"),
])
def test_bad_arguments_are_refused_in_one_line_before_anything_loads(tmp_path: Path, args, message) -> None:
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = ltx2("generate", "--preset", "tiny", *args, cwd=tmp_path)
    assert message.replace("{tmp}", str(tmp_path)) in one_line_error(proc, 2)
    assert proc.stdout == "", "nothing started"
    assert not list(tmp_path.rglob("*.mp4")) and not list(tmp_path.rglob("*.json"))
    assert not (tmp_path / "outputs").exists(), "a refused run creates no folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cuda"], "--device cuda: no CUDA device here"),
    (["--preset", "full"], "--preset full runs on a CUDA device and there is none here"),
])
def test_cuda_on_a_machine_without_it_is_refused(tmp_path: Path, args, message) -> None:
    line = one_line_error(ltx2("generate", *args, cwd=tmp_path), 2)
    assert message in line and ("--device cpu" in line or "--preset tiny" in line)


def test_the_unwritable_directory_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere a mode bit forbids: /proc takes no new file, for anyone
        target = Path("/proc/ltx2.mp4")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "x.mp4"
    line = one_line_error(ltx2("generate", "--output", str(target), cwd=tmp_path), 2)
    assert f"cannot write into {str(target.parent)!r}" in line


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--low-vram"], "--low-vram applies to --mode snapshot only"),
    (["generate", "--no-low-vram", "--mode", "resident"], "--no-low-vram applies to --mode snapshot only"),
    (["generate", "--text-layers", "4"], "--text-layers applies to --preset full only, not to --preset tiny"),
    (["generate", "--preset", "full", "--device", "cpu", "--text-layers", "49"], "Gemma 3 12B has 48 layers"),
    (["generate", "--no-guidance", "--negative-prompt", "blurry"], "--negative-prompt applies to stage 1's guidance"),
    (["bench", "--sections", "weights", "--steps", "2"], "--steps applies to the requests section only"),
    (["bench", "--sections", "weights", "--policies", "merge"], "--policies applies to the requests section only"),
    (["bench", "--sections", "weights", "--scenarios", "hq"], "--scenarios applies to the requests section only"),
    (["bench", "--requests", "0"], "argument --requests: must be an integer ≥ 1"),
    (["bench", "--device", "gpu0"], "'gpu0' is not a torch device"),
    (["bench", "--json", "/etc/passwd/bench.json"], "'/etc/passwd' is a file, not a directory"),
])
def test_flags_that_would_change_nothing_are_refused(tmp_path: Path, args, message) -> None:
    assert message in one_line_error(ltx2(*args, cwd=tmp_path), 2)


def _full_preset_fits_here() -> bool:
    from ltx2_pipeline.presets import full_preset_bytes

    have = checks.available_memory(torch.device("cpu"))
    return have is None or have[0] >= sum(full_preset_bytes().values())


@pytest.mark.parametrize("command", [["generate", "--preset", "full", "--device", "cpu"],
                                     ["bench", "--preset", "full", "--device", "cpu"]])
def test_the_full_preset_is_refused_up_front_without_the_memory(tmp_path: Path, command) -> None:
    if _full_preset_fits_here():
        pytest.skip("this host has the memory for the full preset")
    line = one_line_error(ltx2(*command, cwd=tmp_path), 2)
    assert "InsufficientMemoryError" in line and "needs at least" in line and "GiB are available" in line
    assert "B parameters in bf16" in line or "the DiT" in line or "the pipeline" in line


def test_the_memory_check_compares_the_real_config_with_the_device(monkeypatch, capsys) -> None:
    from ltx2_pipeline.presets import full_preset_bytes

    held = sum(full_preset_bytes().values())
    monkeypatch.setattr(checks, "available_memory", lambda dev: (held - 1, "free for the test"))
    assert main(["generate", "--preset", "full", "--device", "cpu", "--mode", "auto"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"needs at least {held / 2**30:.1f} GiB on cpu" in line and "free for the test" in line
    # resident mode holds a second DiT: its need grows by the DiT, and says so
    assert main(["generate", "--preset", "full", "--device", "cpu", "--mode", "resident"]) == 2
    assert "a second DiT for --mode resident" in capsys.readouterr().err


def test_a_lora_path_with_at_signs_splits_at_the_last_one_only_before_strengths() -> None:
    assert _lora_arg("styles/v2@home/style.safetensors") == ("styles/v2@home/style.safetensors", 1.0, 1.0)
    assert _lora_arg("styles/v2@home/style.safetensors@0,0.5") == ("styles/v2@home/style.safetensors", 0.0, 0.5)
    assert _lora_arg("a@b@c.safetensors@1,2") == ("a@b@c.safetensors", 1.0, 2.0)
    assert _lora_arg("style@1") == ("style@1", 1.0, 1.0)  # not two strengths: all of it is the path
    assert _lora_arg("@0,1") == ("@0,1", 1.0, 1.0)


def test_a_lora_file_with_an_at_sign_in_its_name_loads(tmp_path: Path) -> None:
    path = tiny_lora_file(tmp_path / "style@v2.safetensors")  # 'v2.safetensors' is no strengths: all of it is the path
    code, mp4 = generate(tmp_path, "--lora", str(path), "--steps", "1", "--no-guidance", "--merge-policy", "merge")
    assert code == 0
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["dit_state_after"] == "clean"
    assert sum(r["event"] == "merge" for r in report["trace"]) == 2, "the user LoRA merged in both stages"


def test_a_bad_lora_file_is_named_in_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken@v1.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    line = one_line_error(ltx2("generate", "--lora", f"{bad}@1,1", cwd=tmp_path), 2)
    assert "LoRAFormatError" in line and str(bad) in line
    assert not (tmp_path / "outputs").exists()


def test_non_finite_latents_fail_at_their_stage_and_the_report_is_still_written(tmp_path: Path) -> None:
    huge = tiny_lora_file(tmp_path / "huge.safetensors", scale=1e18)  # finite factors, an overflowing update
    mp4 = tmp_path / "video.mp4"
    proc = ltx2("generate", "--no-progress", "--steps", "1", "--no-guidance", "--lora", f"{huge}@1,1",
                "--output", str(mp4), cwd=tmp_path)
    line = one_line_error(proc, 1)
    assert "NonFiniteOutputError: LTX2AVDenoisingStage: stage 1" in line and str(mp4.with_suffix(".json")) in line
    assert not mp4.exists()
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["error"]["stage"] == "LTX2AVDenoisingStage" and report["output"] is None
    assert "LTX2UpsampleStage" not in report["stages_ms"], "nothing ran on the non-finite latents"
    assert report["dit_state_after"] == "clean" and report["trace"][-1]["dest"] == "clean"


def test_one_stage1_step_makes_a_video(tmp_path: Path) -> None:
    code, mp4 = generate(tmp_path, "--steps", "1")
    assert code == 0
    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert len(json.loads(mp4.with_suffix(".json").read_text())["denoise_step_ms"]["stage1"]) == 1


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ltx2_pipeline.cli", "generate", "--preset", "tiny",
                             "--no-progress", "--steps", "50", "--output", str(tmp_path / "video.mp4")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stdout.readline()  # printed once every argument is checked, before the build
        assert started.startswith("ltx2 generate: tiny on cpu"), started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        proc.kill()
    assert "Traceback" not in err
    assert err.splitlines() == ["error: interrupted"]
    assert proc.returncode == 130
    assert not (tmp_path / "video.mp4").exists()
