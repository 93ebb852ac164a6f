"""diffusers' context parallelism on the two-stage pipeline (``ltx2_pipeline.context_parallel``):
spawned gloo processes against the single-process run, the refusals, and real torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

from ltx2_pipeline.cli import main
from ltx2_pipeline.context_parallel import ContextParallelSpec, check_sequences
from ltx2_pipeline.errors import GenerationInputError
from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_pipeline.two_stage import LTX2TwoStagePipeline
from ranks import free_port, run_ranks

# 9 frames: 9 audio latents, which stay whole on every rank; the video and text tokens divide by 2
KW = dict(prompt="a robot dancing in the rain", height=64, width=64, num_frames=9, num_inference_steps=2,
          max_sequence_length=32)


def tiny(mode: str, policy: str, **kwargs: Any) -> LTX2TwoStagePipeline:
    # perturbed attention: stage 1 runs its STG and modality passes too, each a DiT call of its own
    return LTX2TwoStagePipeline.from_preset("tiny", mode=mode, merge_policy=policy, dtype=torch.float32,
                                            preset_options={"perturbed_attn": True}, **kwargs)


def cp_generation(rank: int, world: int, mode: str, policy: str, context_parallel: Any) -> dict[str, Any]:
    pipe = tiny(mode, policy, process_group=dist.group.WORLD, context_parallel=context_parallel)
    result = pipe(**KW)
    pipe.close()
    return {"video": result.video, "state": result.report["dit_state_after"], "ranks": result.report["ranks"],
            "events": [r["event"] for r in result.report["trace"]]}


@pytest.mark.parametrize(("mode", "policy", "context_parallel"),
                         [("original", "merge", "ulysses"), ("snapshot", "dynamic", "ulysses"),
                          ("resident", "merge", ContextParallelConfig(ulysses_degree=2))])
def test_ulysses_on_two_ranks_makes_the_single_process_video(mode: str, policy: str, context_parallel: Any) -> None:
    single = tiny(mode, policy)
    want = single(**KW)
    single.close()
    for r in run_ranks(2, cp_generation, mode, policy, context_parallel):
        # every call's sequences split, the attention exchanged by all-to-all: the same video to fp32 rounding
        assert np.abs(r["video"] - want.video).max() <= 1e-5
        assert r["state"] == "clean" and r["events"] == [e["event"] for e in want.report["trace"]]
        assert r["ranks"] == {"size": 2, "cfg_parallel": False, "context_parallel": "ulysses"}


def cp_dit_call(rank: int, world: int) -> list[float]:
    from ltx2_pipeline.context_parallel import ContextParallel, ContextParallelDiTs

    dit = tiny_transformer(dtype=torch.float32, rope_type="split")  # RoPE tables (batch, heads, tokens, dim)
    inputs = tiny_inputs(dit, frames=2, height=4, width=4, text_tokens=8, audio_frames=5)  # odd: stays whole
    with torch.no_grad():
        want = dit(**inputs)
        got = ContextParallel(dit, ContextParallelDiTs(ContextParallelSpec("ulysses", world), torch.device("cpu")))(
            **inputs)
    return [float((g - w).abs().max()) for g, w in zip(got, want, strict=True)]


def test_the_plan_with_split_rope_tables_and_an_odd_audio_length() -> None:
    for video, audio in run_ranks(2, cp_dit_call):
        assert video <= 1e-5 and audio <= 1e-5


def refusals(rank: int, world: int) -> dict[str, str]:
    from ltx2_pipeline.presets import tiny_preset

    components, lora = tiny_preset(0, torch.bfloat16)

    def refused(**kwargs: Any) -> str:
        try:
            LTX2TwoStagePipeline(components, lora, process_group=dist.group.WORLD, **kwargs).close()
        except GenerationInputError as exc:
            return str(exc)
        return "built"

    out = {
        "ring on a CPU": refused(context_parallel="ring"),
        "with cfg_parallel": refused(context_parallel="ulysses", cfg_parallel=True),
        "compiled": refused(context_parallel="ulysses", compile=True),
        "degrees": refused(context_parallel=ContextParallelConfig(ulysses_degree=4)),
        "anything": refused(context_parallel=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True)),
    }
    dit = components["transformer"]
    dit.set_attention_backend("_native_math")
    out["backend"] = refused(context_parallel="ulysses")
    dit.set_attention_backend("native")
    pipe = LTX2TwoStagePipeline(components, lora, process_group=dist.group.WORLD, context_parallel="ulysses")
    out["while open"] = refused(context_parallel="ulysses")
    pipe.close()
    # closed: the DiT is given back without diffusers' hooks, free for a pipeline of another kind
    again = LTX2TwoStagePipeline(components, lora, process_group=dist.group.WORLD, context_parallel="ulysses")
    first = again(**KW).video
    again.close()
    whole = LTX2TwoStagePipeline(components, lora)  # no group: any hook left would split the calls
    out["after close"] = str(float(np.abs(whole(**KW).video - first).max()))
    whole.close()
    return out


def test_what_context_parallel_refuses_before_any_work_and_close_gives_the_dit_back() -> None:
    for r in run_ranks(2, refusals):
        assert "use ulysses" in r["ring on a CPU"]
        assert "choose one" in r["with cfg_parallel"]
        assert "leave compile unset" in r["compiled"]
        assert "ulysses_degree=4" in r["degrees"] and "2" in r["degrees"]
        assert "ulysses_anything" in r["anything"]
        assert "'_native_math' has no context-parallel form" in r["backend"]
        assert "already parallelized" in r["while open"]
        assert float(r["after close"]) <= 0.05  # bf16: the same video, split or whole


def test_a_sequence_that_does_not_divide_is_named_with_a_frame_count_that_does() -> None:
    spec = ContextParallelSpec("ulysses", 2)
    check_sequences(spec, {"stage-1 video": 1536, "stage-2 video": 6144, "text": 1024})
    # made-up counts: 81 stage-1 video tokens at 9 frames, 162 at 17
    with pytest.raises(GenerationInputError, match=r"stage-1 video 81 tokens.*num_frames=17 divides them all"):
        check_sequences(spec, {"stage-1 video": 81, "text": 1024},
                        [(9, {"stage-1 video": 81}), (17, {"stage-1 video": 162})])
    with pytest.raises(GenerationInputError, match=r"text 1023 tokens\. Choose"):
        check_sequences(spec, {"text": 1023}, [(17, {"text": 1023})])


@pytest.mark.parametrize(("value", "match"), [("sideways", "must be one of ulysses, ring"),
                                              ("ulysses", "process_group")])
def test_context_parallel_without_a_group_or_with_a_bad_name(value: str, match: str) -> None:
    with pytest.raises(GenerationInputError, match=match):
        LTX2TwoStagePipeline.from_preset("tiny", context_parallel=value)


def test_generate_under_torchrun_with_ulysses(tmp_path: Path) -> None:
    mp4 = tmp_path / "v.mp4"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           f"--master-port={free_port()}", "-m", "ltx2_pipeline.cli", "generate", "--preset", "tiny",
                           "--context-parallel", "ulysses", "--no-progress", "--steps", "2",
                           "--output", str(mp4)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(mp4.with_suffix(".json").read_text())
    assert report["ranks"] == {"size": 2, "cfg_parallel": False, "context_parallel": "ulysses"}
    assert report["dit_state_after"] == "clean" and mp4.stat().st_size > 0


@pytest.mark.parametrize(("argv", "needle"), [
    (["--context-parallel", "ulysses"], "torchrun --nproc-per-node 2"),
    (["--context-parallel", "sideways"], "invalid choice"),
])
def test_context_parallel_flag_refused_before_loading(argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        code = main(["generate", "--preset", "tiny", *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1]
