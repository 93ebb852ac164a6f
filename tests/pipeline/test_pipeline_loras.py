"""LoRAs chosen per generation: ``pipe(..., loras={...})`` on LoRAs added while the pipeline runs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ltx2_pipeline.errors import GenerationInputError
from ltx2_pipeline.loras import load_lora
from ltx2_pipeline.tiny import tiny_transformer
from ltx2_pipeline.two_stage import LTX2TwoStagePipeline
from ltx2_residency import LoRASpec, StrengthError, WeightState
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora
from offline import assert_offline, no_network  # noqa: F401 - autouse fixtures

KW: dict[str, Any] = dict(prompt="a robot dancing in the rain", negative_prompt="blurry", height=64, width=64,
                          num_frames=9, num_inference_steps=2, max_sequence_length=32)


@pytest.fixture(scope="module")
def style_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    dit = tiny_transformer(seed=0)  # the preset's DiT, weight for weight
    attn = [n for n in linear_names(dit) if ".attn1." in n]
    return save_lora(Path(tmp_path_factory.mktemp("style")) / "style.safetensors",
                     synthetic_lora(dit, attn, rank=4, relative_norm=0.15, seed=7))


@pytest.mark.parametrize("policy", ["merge", "dynamic"])
def test_a_lora_chosen_per_call_is_the_lora_built_in(style_path: str, policy: str) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy=policy)
    pipe.manager.add_lora(LoRASpec("style", path=style_path))
    chosen = pipe(**KW, loras={"style": {"stage1": 1.0, "stage2": 0.5}})
    assert chosen.report["request"]["loras"]["style"] == {"stage1": 1.0, "stage2": 0.5}
    assert chosen.report["dit_state_after"] == WeightState.CLEAN.value
    built = LTX2TwoStagePipeline.from_preset("tiny", merge_policy=policy,
                                             loras=[load_lora(style_path, "style", {"stage1": 1.0, "stage2": 0.5})])
    assert np.array_equal(chosen.video, built(**KW).video)
    # a generation that does not choose it runs the distilled LoRA alone
    alone = LTX2TwoStagePipeline.from_preset("tiny", merge_policy=policy)(**KW)
    assert np.array_equal(pipe(**KW, loras={}).video, alone.video)


def test_unknown_loras_are_refused_before_any_work(style_path: str) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny")
    with pytest.raises(GenerationInputError, match="unknown LoRA 'style'.*add_lora"):
        pipe(**KW, loras={"style": 1.0})
    pipe.manager.add_lora(LoRASpec("style", path=style_path))
    with pytest.raises(GenerationInputError, match="strengths\\['stage2'\\]: unknown LoRA 'style'"):
        pipe(**KW, loras={}, strengths={"stage2": {"style": 1.0}})
    with pytest.raises(StrengthError, match="must be >= 0"):  # checked like strengths=, before any work
        pipe(**KW, loras={"style": -1.0})
    with pytest.raises(GenerationInputError, match="unknown phase 'stage3'"):
        pipe(**KW, loras={"style": {"stage3": 1.0}})
    assert pipe.manager.state is WeightState.CLEAN and not pipe.manager.trace


def test_the_documented_serving_loop_runs(capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "embedding.md").read_text()
    section = doc[doc.index("## LoRAs chosen per request"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None
    exec(compile(block.group(1), "docs/embedding.md", "exec"), {"__name__": "docs.embedding.loras"})
    out = capsys.readouterr().out
    assert "served True registered ['anime', 'clay', 'distilled']" in out
    assert "tiers {'host': [" in out and "'hit_rate'" in out
