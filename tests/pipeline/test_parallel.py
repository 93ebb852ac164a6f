"""The pipeline on several ranks (``ltx2_pipeline.parallel``): spawned gloo processes and real torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.distributed as dist

from ltx2_pipeline.cli import main
from ltx2_pipeline.errors import GenerationInputError
from ltx2_pipeline.parallel import check_cfg_parallel
from ltx2_pipeline.two_stage import LTX2TwoStagePipeline
from ranks import free_port, run_ranks

KW = dict(prompt="a robot dancing in the rain", height=64, width=64, num_frames=9, num_inference_steps=2,
          max_sequence_length=32)


def two_stage_on_ranks(rank: int, world: int, cfg_parallel: bool) -> dict[str, Any]:
    pipe = LTX2TwoStagePipeline.from_preset("tiny", mode="original", merge_policy="merge",
                                            process_group=dist.group.WORLD, cfg_parallel=cfg_parallel)
    result = pipe(**KW)
    pipe.close()
    return {"video": result.video, "state": result.report["dit_state_after"], "ranks": result.report["ranks"],
            "events": [r["event"] for r in result.report["trace"]]}


@pytest.mark.parametrize("cfg_parallel", [False, True])
def test_two_ranks_make_the_single_process_video(cfg_parallel: bool) -> None:
    single = LTX2TwoStagePipeline.from_preset("tiny", mode="original", merge_policy="merge")
    want = single(**KW)
    single.close()
    for r in run_ranks(2, two_stage_on_ranks, cfg_parallel):
        # CFG-parallel: each rank ran one guidance branch; the gathered predictions are the batch's own
        assert np.array_equal(r["video"], want.video)
        assert r["state"] == "clean" and r["events"] == [e["event"] for e in want.report["trace"]]
        assert r["ranks"] == {"size": 2, "cfg_parallel": cfg_parallel, "context_parallel": None}


def test_cfg_parallel_needs_a_group_of_two() -> None:
    with pytest.raises(GenerationInputError, match="process_group"):
        check_cfg_parallel(True, None)
    with pytest.raises(GenerationInputError, match="True or False"):
        check_cfg_parallel("yes", None)
    check_cfg_parallel(False, None)


def test_generate_under_torchrun_writes_once(tmp_path: Path) -> None:
    mp4 = tmp_path / "v.mp4"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           f"--master-port={free_port()}", "-m", "ltx2_pipeline.cli", "generate", "--preset", "tiny",
                           "--cfg-parallel", "--no-progress", "--steps", "2", "--output", str(mp4)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ltx2 generate: tiny on 2 ranks (cpu)") == 1  # rank 0 speaks, rank 1 does not
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["ranks"] == {"size": 2, "cfg_parallel": True, "context_parallel": None}
    assert report["dit_state_after"] == "clean"
    assert mp4.stat().st_size > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.mp4"]


@pytest.mark.parametrize("world", [None, "4"])
def test_cfg_parallel_outside_a_two_rank_torchrun_is_refused_before_loading(
        world: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if world is not None:
        monkeypatch.setitem(os.environ, "WORLD_SIZE", world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--preset", "tiny", "--cfg-parallel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cfg-parallel" in err[0] and "torchrun --nproc-per-node 2" in err[0]
