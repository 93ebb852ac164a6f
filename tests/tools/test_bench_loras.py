"""The per-request LoRA benchmark runs end to end on the tiny DiT (CPU, aot_eager)."""

from __future__ import annotations

import json
from pathlib import Path

from ltx2_tools.bench_loras import main, workload


def test_the_workload_is_zipf_and_reproducible() -> None:
    names = [f"user{i}" for i in range(10)]
    jobs = workload(names, 200, seed=1)
    assert jobs == workload(names, 200, seed=1)
    assert all(len(j) - 1 <= 2 and j["distilled"] == {"stage2": 1.0} for j in jobs)
    counts = {n: sum(n in j for j in jobs) for n in names}
    assert counts["user0"] > counts["user9"]


def test_a_tiny_run_reports_every_tier_against_the_ideal(tmp_path: Path, capsys) -> None:
    out = tmp_path / "loras.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--backend", "aot_eager", "--mode", "default",
                 "--loras", "4", "--host-loras", "1", "--requests", "6", "--stage1-calls", "1",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ideal_ms"] > 0 and len(res["runs"]) == 5  # the first request only starts the clock
    assert sum(t["n"] for t in res["tiers"].values()) == 5
    assert res["diffusers"]["n"] == 6
    assert "| LoRAs from |" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["--shape", "real", "--device", "cpu"]) == 2
    assert "CUDA device" in capsys.readouterr().err
