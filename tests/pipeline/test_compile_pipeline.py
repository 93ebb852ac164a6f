"""The two-stage pipeline with its DiT under torch.compile (``compile=``), on the tiny preset with a
CPU backend (``aot_eager``: no C++ toolchain, seconds to compile): the first request compiles the
graphs and says so in its report, a second request with other strengths compiles none and gives
the eager pipeline's output, the DiT is clean afterwards, and a bad ``compile=`` is refused before
anything is built. The hooks CUDA graphs need (one graph step per DiT call, each call's outputs
copied out) are checked on the CPU against a stand-in that, like a replayed graph, writes every
call's outputs into the same buffers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from ltx2_pipeline import two_stage
from ltx2_pipeline.two_stage import GenerationRequest, Guidance, LTX2TwoStageHQPipeline, LTX2TwoStagePipeline
from ltx2_residency import CompileSpec, OptionError, ResidencyManager, no_recompiles
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

SPEC = CompileSpec(backend="aot_eager")
# Stage 1 at CFG + modality guidance (several DiT calls a step; no STG: the tiny DiT cannot perturb),
# one step, one frame: the smallest request that still runs every stage.
GUIDANCE = Guidance(stg_scale=0.0, audio_stg_scale=0.0)
# Compiled against eager: a merged or base phase runs the same kernels (equal), the dynamic path
# rounds in other places (the eager forward fuses the LoRA scale into one addmm, the graph scales in
# float32): bf16 roundings of the DiT's outputs, carried through the steps and the decode into
# frames and waveform in [0, 1] and [-1, 1].
ATOL = {"merge": 0.0, "dynamic": 2.0**-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _request(stage2: float) -> GenerationRequest:
    return GenerationRequest.for_preset("tiny", num_inference_steps=1, num_frames=1, guidance=GUIDANCE,
                                        strengths={"stage2": {"distilled": stage2}})


def _close(compiled: Any, eager: Any, atol: float) -> None:
    np.testing.assert_allclose(compiled.video, eager.video, atol=atol, rtol=0)
    torch.testing.assert_close(compiled.audio.float(), eager.audio.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("policy", ["merge", "dynamic"])
def test_a_warm_compiled_pipeline_compiles_nothing_and_matches_eager(policy: str) -> None:
    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy=policy, compile=SPEC)
    eager = LTX2TwoStagePipeline.from_preset("tiny", merge_policy=policy)
    try:
        assert pipe.compile_spec == SPEC and eager.compile_spec is None
        assert pipe.manager.compiled and not eager.manager.compiled
        clean = weight_bits(pipe.manager.managed_weights)

        first = pipe(_request(1.0)).report
        assert first["compile"] == {"mode": "default", "backend": "aot_eager", "regional": True}
        assert first["graphs_compiled"] > 0, "the first request compiles the DiT's graphs"
        assert 0 < first["compile_ms"] < first["e2e_ms"], "its time includes the compilation"

        with no_recompiles():  # a recompilation raises here
            second = pipe(_request(0.5))
        assert second.report["graphs_compiled"] == 0 and second.report["compile_ms"] == 0
        assert second.report["dit_state_after"] == "clean"
        expected = eager(_request(0.5))
        assert expected.report["compile"] is None and expected.report["graphs_compiled"] == 0
        _close(second, expected, ATOL[policy])

        pipe.manager.verify_clean()
        assert_same_bits(clean, weight_bits(pipe.manager.managed_weights))
    finally:
        pipe.close()
        eager.close()


@pytest.mark.parametrize("value", ["sideways", "", 3, 1.5, {"mode": "default"}, CompileSpec(backend="no_such_backend")])
def test_a_bad_compile_value_is_refused_before_anything_is_built(monkeypatch, value: object) -> None:
    def built(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("built before compile= was checked")

    for name in ("tiny_preset", "full_preset", "load_components", "ResidencyManager"):
        monkeypatch.setattr(two_stage, name, built)
    with pytest.raises(OptionError):
        LTX2TwoStagePipeline.from_preset("tiny", compile=value)
    with pytest.raises(OptionError):
        LTX2TwoStageHQPipeline.from_pretrained("/no/such/folder", compile=value)
    with pytest.raises(OptionError):  # checked before the components are
        LTX2TwoStagePipeline({}, distilled_lora={}, compile=value)


@pytest.mark.parametrize(("value", "spec"), [(None, None), (False, None), (True, CompileSpec()),
                                             ("Reduce-Overhead", CompileSpec(mode="reduce-overhead")),
                                             (SPEC, SPEC)])
def test_compile_takes_what_compilespec_of_takes(value: object, spec: CompileSpec | None) -> None:
    # nothing runs: compiling is lazy, the first DiT call compiles
    pipe = LTX2TwoStageHQPipeline.from_preset("tiny", compile=value)
    try:
        assert pipe.compile_spec == spec
        assert pipe.manager.compiled == (spec is not None)
    finally:
        pipe.close()


def test_a_failed_compile_gives_the_model_back(monkeypatch) -> None:
    components, lora = two_stage.tiny_preset(0)

    def fail(self: ResidencyManager, spec: object) -> None:
        raise RuntimeError("compile failed")

    with monkeypatch.context() as patch:
        patch.setattr(ResidencyManager, "compile", fail)
        with pytest.raises(RuntimeError, match="compile failed"):
            LTX2TwoStagePipeline(components, lora, compile=SPEC)
    pipe = LTX2TwoStagePipeline(components, lora)  # the DiT is free for another pipeline
    pipe.close()


class _Replayed(torch.nn.Module):
    """A stand-in for a replayed CUDA graph: every call writes its outputs into the same buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("out", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.out.copy_(x)
        return self.out, self.out * 2


def test_cuda_graph_hooks_start_a_step_per_call_and_keep_each_calls_outputs(monkeypatch) -> None:
    from ltx2_pipeline.compiling import cuda_graph_hooks

    steps: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    dit = _Replayed()
    first = dit(torch.ones(2))
    dit(torch.full((2,), 3.0))
    assert torch.equal(first[0], torch.full((2,), 3.0)), "unhooked, the next call overwrote the first's output"

    cuda = torch.device("cuda")
    assert cuda_graph_hooks(dit, None, cuda) == [] and cuda_graph_hooks(dit, CompileSpec(), cuda) == []
    assert cuda_graph_hooks(dit, CompileSpec(mode="reduce-overhead"), torch.device("cpu")) == []
    hooks = cuda_graph_hooks(dit, CompileSpec(mode="reduce-overhead"), cuda)
    first = dit(torch.ones(2))
    second = dit(torch.full((2,), 3.0))
    assert torch.equal(first[0], torch.ones(2)) and torch.equal(first[1], torch.full((2,), 2.0))
    assert torch.equal(second[0], torch.full((2,), 3.0)) and len(steps) == 2
    for hook in hooks:
        hook.remove()
    assert not dit._forward_hooks and not dit._forward_pre_hooks


def test_the_pipeline_hooks_every_dit_call_of_a_stage_under_cuda_graphs(monkeypatch) -> None:
    # the hooks a GPU run under reduce-overhead gets, here on the CPU and an eager DiT: one CUDA-graph
    # step per DiT call (stage 1: the CFG batch and the modality pass; stage 2: one call a step), the
    # outputs as they were, and no hook left on the DiT afterwards
    from ltx2_pipeline import compiling

    steps: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    monkeypatch.setattr(two_stage, "cuda_graph_hooks", lambda dit, spec, device: compiling.cuda_graph_hooks(
        dit, CompileSpec(mode="reduce-overhead"), torch.device("cuda")))
    pipe = LTX2TwoStagePipeline.from_preset("tiny", merge_policy="merge")
    try:
        held = (dict(pipe.base._forward_pre_hooks), dict(pipe.base._forward_hooks))  # the manager's guard
        hooked = pipe(_request(1.0))
        assert (pipe.base._forward_pre_hooks, pipe.base._forward_hooks) == held
        monkeypatch.undo()
        assert len(steps) == 2 * 1 + len(two_stage.STAGE2_SIGMAS)
        _close(hooked, pipe(_request(1.0)), 0.0)
    finally:
        pipe.close()
