"""``ltx2``: generate writes a playable mp4 with audio and a JSON report; bad arguments get a
clear message and exit code 2; diagram prints the tables' diagrams."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import tomllib

from ltx2_pipeline.cli import main
from ltx2_residency import ResidencyMode
from ltx2_residency.machine import TABLES, mermaid
from ltx2_residency.testing import save_lora
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

ROOT = Path(__file__).resolve().parents[1]
SWITCH_STAGES = ("LTX2LoRASwitchStage_stage1", "LTX2LoRASwitchStage_stage2")


def generate(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    mp4 = tmp_path / "out" / "video.mp4"
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
    (["--stage2-strength", "nan"], "StrengthError"),
])
def test_bad_arguments_get_a_clear_error_and_exit_2(tmp_path: Path, capsys, args, message) -> None:
    code, mp4 = generate(tmp_path, *args)
    assert code == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert not mp4.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "sideways"], "invalid choice: 'sideways'"),
    (["--merge-policy", "always"], "invalid choice: 'always'"),
    (["--lora", "style.safetensors@1"], "expected PATH or PATH@S1,S2"),
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


def test_the_console_script_and_make_demo_point_here() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ltx2"] == "ltx2_pipeline.cli:main"
    assert "ltx2 generate --preset tiny" in (ROOT / "Makefile").read_text()
