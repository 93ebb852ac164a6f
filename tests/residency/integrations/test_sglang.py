"""The manager inside sglang 0.5.23's LTX-2 two-stage pipeline, driven by sglang's real
ComponentResidencyManager, SyncExecutor and LTX-2 stage classes on the tiny DiT: each output equals
the manager's own request bit for bit, and the DiT is clean after every request, a failed one too.

The denoising stages keep sglang's residency use-site (``_select_and_manage_model``, which reports
each step's DiT to sglang's manager) and their LoRA switch, and run the tiny DiT a few steps in
place of sglang's sampler (which needs a full prepared batch).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import sglang_env
from ltx2_residency import EmbeddingError, LoRAKeyError, LoRASpec, ResidencyManager
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

STEPS = (900, 500)


@pytest.fixture(scope="module")
def sg() -> types.SimpleNamespace:
    return sglang_env.load()


class StageFailure(RuntimeError):
    pass


def tiny_stages(sg: types.SimpleNamespace) -> tuple[type, type]:
    """sglang's two LTX-2 denoising stages with the tiny DiT's steps as their forward."""

    def forward(self: Any, batch: Any, server_args: Any) -> Any:
        if isinstance(self, sg.stages.LTX2RefinementStage):
            batch.extra["ltx2_phase"] = "stage2"  # as sglang's refinement stage does
        phase = batch.extra["ltx2_phase"]
        self.pipeline().switch_lora_phase(phase, batch=batch)  # as _before_denoising_loop does
        for t in STEPS:
            dit, _ = self._select_and_manage_model(t, None, server_args, batch)
            with torch.no_grad():
                batch.extra["outputs"].append((phase, dit(**batch.extra["inputs"])[0]))
            if batch.extra.get("fail") == phase:
                raise StageFailure(f"{phase} failed")
        self._finish_active_component_use()
        return batch

    def verified(self: Any, batch: Any, server_args: Any) -> Any:
        return sg.VerificationResult()

    body = {"forward": forward, "verify_input": verified, "verify_output": verified}
    first = type("LTX2AVDenoisingStage", (sg.stages.LTX2AVDenoisingStage,), body)
    second = type("LTX2RefinementStage", (sg.stages.LTX2RefinementStage,), body)
    return first, second


class Served:
    """A sglang LTX2TwoStagePipeline around the tiny DiT (built as sglang builds it, less the
    checkpoint loading), the manager installed, and sglang's residency manager and executor."""

    def __init__(self, sg: types.SimpleNamespace, dit: nn.Module, manager: ResidencyManager | None,
                 transformer_2: nn.Module | None = None) -> None:
        self.sg, self.dit, self.manager = sg, dit, manager
        self.args = args = sglang_env.server_args(sg)
        pipe = object.__new__(sg.LTX2TwoStagePipeline)  # its __init__ loads a checkpoint
        pipe.server_args, pipe.modules, pipe.memory_usages = args, {"transformer": dit}, {}
        if transformer_2 is not None:  # sglang's own pre-merged stage-2 DiT (its resident layout)
            pipe.modules["transformer_2"] = transformer_2
        pipe._stages, pipe._stage_name_mapping, pipe.component_residency_strategies = [], {}, {}
        self.pipe = pipe
        if manager is not None:  # else the test installs it
            self.strategy = sg_install(pipe, manager)
        first, second = tiny_stages(sg)
        scheduler = object()
        for name, stage in (
                ("LTX2LoRASwitchStage", sg.stages.LTX2LoRASwitchStage(pipeline=pipe, phase="stage1")),
                ("LTX2AVDenoisingStage", first(transformer=dit, scheduler=scheduler, vae=None, audio_vae=None,
                                               pipeline=pipe)),
                ("ltx2_lora_switch_stage2", sg.stages.LTX2LoRASwitchStage(pipeline=pipe, phase="stage2")),
                ("LTX2RefinementStage", second(transformer=transformer_2 or dit, scheduler=scheduler,
                                               distilled_sigmas=[0.9, 0.7, 0.0], pipeline=pipe))):
            stage.set_registered_stage_name(name)
            pipe._stage_name_mapping[name] = stage
            pipe._stages.append(stage)
        self.residency = sg.ComponentResidencyManager(pipe, args)
        self.residency.refresh_pipeline(pipe)
        self.executor = sg.SyncExecutor(server_args=args)
        self.executor.component_residency_manager = self.residency

    def run(self, inputs: dict[str, Any], **extra: Any) -> list[tuple[str, torch.Tensor]]:
        req = self.sg.Req(sampling_params=self.sg.SamplingParams(prompt="a tiny video"),
                          extra={"inputs": inputs, "outputs": [], **extra})
        req.timesteps = torch.tensor([float(t) for t in STEPS])
        self.residency.refresh_pipeline(self.pipe)  # as sglang's pipeline forward does: picks up install()
        try:
            self.executor.execute(self.pipe._stages, req, self.args)
        finally:
            self.outputs = req.extra["outputs"]
        return self.outputs


def sg_install(pipe: Any, manager: ResidencyManager) -> Any:
    from ltx2_residency.integrations.sglang import install

    return install(pipe, manager)


def reference(fresh_model: Callable[[], nn.Module], distilled_path: str, mode: str, policy: str,
              inputs: dict[str, Any], s1: float, s2: float) -> list[tuple[str, torch.Tensor]]:
    """The same request through the manager's own API."""
    mgr = ResidencyManager(fresh_model(), mode, [LoRASpec("distilled", path=distilled_path)], policy)
    out = []
    with torch.no_grad(), mgr.request() as req:
        for phase, strength in (("stage1", s1), ("stage2", s2)):
            dit = req.enter(phase, strengths={"distilled": strength})
            out += [(phase, dit(**inputs)[0]) for _ in STEPS]
    mgr.close()
    return out


def assert_clean(manager: ResidencyManager, clean: dict[str, torch.Tensor]) -> None:
    """Between requests: the DiT settled and bit for bit as it was given."""
    manager.synchronize()
    assert_same_bits(clean, weight_bits(manager.managed_weights))


def native_lora_file(dit: nn.Module, path: Any, names: list[str] | None = None, relative_norm: float = 0.10) -> str:
    """A rank-4 LoRA file on ``names`` (default: every block linear) of sglang's native DiT."""
    from ltx2_residency.testing import linear_names, save_lora, synthetic_lora

    return save_lora(path, synthetic_lora(dit, linear_names(dit) if names is None else names, rank=4,
                                          relative_norm=relative_norm))


def assert_same_outputs(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [p for p, _ in got] == [p for p, _ in want]
    for (phase, g), (_, w) in zip(got, want, strict=True):
        assert torch.equal(g, w), phase


@pytest.mark.parametrize("mode", ["original", "resident"])
@pytest.mark.parametrize("policy", ["merge", "sglang"])
def test_sglang_runs_the_managers_request_bit_for_bit_and_leaves_the_dit_clean(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], mode: str, policy: str) -> None:
    dit = fresh_model()
    manager = ResidencyManager(dit, mode, [LoRASpec("distilled", path=distilled_path)], policy)
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    # sglang's defaults for the two-stage pipeline (stage 1 0.0, stage 2 1.0), then a request's own
    default = served.run(inputs)
    assert_same_outputs(default, reference(fresh_model, distilled_path, mode, policy, inputs, 0.0, 1.0))
    assert_clean(manager, clean)
    chosen = served.run(inputs, ltx2_distilled_lora_strength_stage_2=0.6)
    assert_same_outputs(chosen, reference(fresh_model, distilled_path, mode, policy, inputs, 0.0, 0.6))
    assert_clean(manager, clean)
    refinement = served.pipe.get_stage("LTX2RefinementStage")
    assert refinement.transformer is dit  # bound back after the request (resident: it ran the copy)
    manager.close()


@pytest.mark.parametrize("failing", ["stage1", "stage2"])
def test_a_stage_that_fails_leaves_the_dit_clean_and_the_next_request_exact(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], failing: str) -> None:
    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    with pytest.raises(StageFailure):
        served.run(inputs, fail=failing)
    assert_clean(manager, clean)
    assert_same_outputs(served.run(inputs), reference(fresh_model, distilled_path, "original", "merge", inputs,
                                                      0.0, 1.0))
    manager.close()


def test_stage1_runs_base_weights_although_sglang_prefetches_stage2(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any]) -> None:
    """sglang prefetches the next large use (stage 2's DiT) as stage 1 begins: declined, so
    stage 1 runs on the base weights."""
    dit = fresh_model()
    with torch.no_grad():
        base = dit(**inputs)[0]
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    served = Served(sg, dit, manager)
    calls: list[str] = []
    prefetch = served.strategy.prefetch_for_use

    def spy(module: nn.Module, use: Any, state: Any) -> bool:
        calls.append(str(use.phase))
        return prefetch(module, use, state)

    served.strategy.prefetch_for_use = spy  # type: ignore[method-assign]
    out = served.run(inputs)
    assert "stage2" in calls  # sglang asked
    assert all(torch.equal(o, base) for phase, o in out if phase == "stage1")
    manager.close()


def test_install_refuses_what_it_cannot_serve(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str) -> None:
    from ltx2_residency.integrations.sglang import SglangResidencyStrategy, install

    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    with pytest.raises(EmbeddingError, match="no `modules`"):
        install(object(), manager)
    other = object.__new__(sg.LTX2TwoStagePipeline)
    other.modules, other.component_residency_strategies = {"transformer": fresh_model()}, {}
    with pytest.raises(EmbeddingError, match="not the manager's DiT"):
        install(other, manager)
    with pytest.raises(EmbeddingError, match="no LoRA 'style'"):
        SglangResidencyStrategy(manager, lora="style")
    manager.close()


@pytest.fixture(scope="module")
def native(sg: types.SimpleNamespace) -> Callable[[], nn.Module]:
    """sglang's own tiny LTX-2 DiT, the same weights each time (its layers hold the process group:
    built again rather than copied). Importing the integration lets the manager take its layers."""
    import ltx2_residency.integrations.sglang  # noqa: F401

    sglang_env.init_distributed(sg)
    return sglang_env.native_dit


def native_request(manager: ResidencyManager, inputs: dict[str, Any], s2: float) -> list[torch.Tensor]:
    out = []
    with torch.no_grad(), sglang_env.forward_context(), manager.request() as req:
        for phase, strength in (("stage1", 0.0), ("stage2", s2)):
            out.append(req.enter(phase, strengths={"distilled": strength})(**inputs)[0])
    return out


@pytest.mark.parametrize(("mode", "policy"), [("original", "merge"), ("original", "dynamic"), ("resident", "merge")])
def test_the_manager_takes_sglangs_own_linear_layers(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module], mode: str, policy: str, tmp_path: Any) -> None:
    """sglang's native DiT (ColumnParallelLinear/RowParallelLinear, which return (output, bias)):
    a LoRA on all its block linears merges and runs dynamic as on diffusers' DiT, resident mode
    copies it (sharing its process groups), and the DiT is clean after."""
    from sglang.multimodal_gen.runtime.layers.linear import LinearBase

    from ltx2_residency.testing import linear_names

    dit = native()
    names = linear_names(dit)
    assert names and all(isinstance(dit.get_submodule(n), LinearBase) for n in names)
    path = native_lora_file(dit, tmp_path / "distilled.safetensors", names)
    inputs = sglang_env.native_inputs()
    with torch.no_grad(), sglang_env.forward_context():
        base = dit(**inputs)[0]
    manager = ResidencyManager(dit, mode, [LoRASpec("distilled", path=path, strengths={"stage2": 0.7})], policy)
    clean = weight_bits(manager.managed_weights)
    stage1, stage2 = native_request(manager, inputs, 0.7)
    assert torch.equal(stage1, base)
    reference = ResidencyManager(native(), "original", [LoRASpec("distilled", path=path)], "merge")
    want = native_request(reference, inputs, 0.7)[1]
    assert not torch.equal(stage2, base)
    torch.testing.assert_close(stage2, want, rtol=1e-4, atol=1e-5)  # merged vs added: float32 roundings
    assert_clean(manager, clean)
    manager.close()
    reference.close()


def test_sglang_serves_its_own_dit_through_the_manager(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module], tmp_path: Any) -> None:

    dit = native()
    path = native_lora_file(dit, tmp_path / "distilled.safetensors")
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    inputs = sglang_env.native_inputs()
    with sglang_env.forward_context():
        got = served.run(inputs, ltx2_distilled_lora_strength_stage_2=0.8)
    reference = ResidencyManager(native(), "original", [LoRASpec("distilled", path=path)], "merge")
    with sglang_env.forward_context():
        want = native_request(reference, inputs, 0.8)
    assert_same_outputs(got, [(p, w) for p, w in zip(("stage1", "stage2"), want, strict=True) for _ in STEPS])
    assert_clean(manager, clean)
    manager.close()
    reference.close()


def test_lora_files_in_ltx2_or_kohya_keys_name_sglangs_modules(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module], tmp_path: Any) -> None:
    """An LTX-2 checkpoint-style file (``diffusion_model.*``, ``ff.net.0.proj``, ``lora_down``/
    ``lora_up``) read with ``lora_spec`` runs exactly as the same LoRA written in sglang's names."""
    from safetensors.torch import save_file

    from ltx2_residency.integrations.sglang import lora_spec
    from ltx2_residency.testing import linear_names, synthetic_lora

    dit = native()
    names = [n for n in linear_names(dit) if ".ff." in n or ".attn1." in n]
    ours = synthetic_lora(dit, names, rank=4, relative_norm=0.10)
    original = {}
    for key, tensor in ours.items():
        module, _, part = key.rpartition(".lora_")
        module = module.replace("ff.proj_in", "ff.net.0.proj").replace("ff.proj_out", "ff.net.2")
        factor = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[part]
        original[f"diffusion_model.{module}.{factor}"] = tensor.contiguous()
    path = tmp_path / "ltx2_original.safetensors"
    save_file(original, str(path))
    inputs = sglang_env.native_inputs()
    managers = [ResidencyManager(dit, "original", [lora_spec("distilled", path)], "merge"),
                ResidencyManager(native(), "original", [LoRASpec("distilled", tensors=ours)], "merge")]
    got, want = (native_request(m, inputs, 0.9) for m in managers)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    for m in managers:
        m.close()
    bad = tmp_path / "not_a_lora.safetensors"
    save_file({"diffusion_model.proj_in.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(LoRAKeyError, match="not a LoRA factor"):
        lora_spec("bad", bad)


def test_a_tensor_parallel_shard_is_refused_before_anything_moves(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module]) -> None:
    from ltx2_residency.testing import linear_names, synthetic_lora

    dit = native()
    names = linear_names(dit)
    lora = synthetic_lora(dit, names, rank=4, relative_norm=0.10)
    before = weight_bits(dict(dit.named_parameters()))
    dit.get_submodule(names[0]).tp_size = 2  # as a layer sharded over two ranks says
    with pytest.raises(LoRAKeyError, match="tensor-parallel"):
        ResidencyManager(dit, "original", [LoRASpec("distilled", tensors=lora)], "merge")
    assert_same_bits(before, weight_bits(dict(dit.named_parameters())))


def test_the_documented_installation_serves_sglangs_dit(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/embedding.md's installation block, run as written on sglang's pipeline (its LoRA file
    written here in LTX-2's original keys), then a request through sglang's executor."""
    import re
    from pathlib import Path

    from safetensors.torch import save_file

    from ltx2_residency.testing import linear_names, synthetic_lora

    doc = (Path(__file__).resolve().parents[3] / "docs" / "embedding.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "lora_spec(" in b)
    dit = native()
    ours = synthetic_lora(dit, [n for n in linear_names(dit) if ".attn1." in n], rank=4, relative_norm=0.10)
    monkeypatch.chdir(tmp_path)
    save_file({f"diffusion_model.{k.replace('.lora_A.', '.lora_down.').replace('.lora_B.', '.lora_up.')}":
               v.contiguous() for k, v in ours.items()}, "ltx-2-19b-distilled-lora-384.safetensors")
    served = Served(sg, dit, None)
    namespace: dict[str, Any] = {"pipeline": served.pipe}
    exec(compile(block, "docs/embedding.md", "exec"), namespace)
    manager = namespace["manager"]
    inputs = sglang_env.native_inputs()
    with sglang_env.forward_context():
        got = served.run(inputs)
    reference = ResidencyManager(native(), "original", [LoRASpec("distilled", tensors=ours,
                                                                 strengths={"stage1": 0.0, "stage2": 1.0})])
    with sglang_env.forward_context():
        want = native_request(reference, inputs, 1.0)
    assert_same_outputs(got, [(p, w) for p, w in zip(("stage1", "stage2"), want, strict=True) for _ in STEPS])
    manager.close()
    reference.close()


def test_sglangs_fused_linear_gelu_never_skips_a_dynamic_adapter(
        sg: types.SimpleNamespace, native: Callable[[], nn.Module], tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """sglang's fused linear+GELU site reads ``ff.proj_in.weight`` instead of calling the layer (on a
    GPU in half precision; here its CUDA-only checks are lifted and its kernel is computed on the
    CPU): while an adapter adds to the output the wrapper's ``weight`` is None, so the site calls the
    forward and the LoRA is applied."""
    import torch.nn.functional as F
    from sglang.kernels.ops.diffusion import FUSED_LINEAR_GELU
    from sglang.multimodal_gen.runtime.models.dits import ltx_2

    from ltx2_residency.testing import linear_names

    def can_use(linear: Any, x: torch.Tensor) -> bool:  # sglang's per-call check, less its CUDA-only parts
        weight = getattr(linear, "weight", None)
        return weight is not None and x.dtype == weight.dtype

    fused = []
    monkeypatch.setattr(ltx_2, "can_use_linear_gelu", can_use)
    monkeypatch.setattr(ltx_2, "fused_linear_gelu_tanh",
                        lambda x, w, b: fused.append(1) or F.gelu(F.linear(x, w, b), approximate="tanh"))
    results = {}
    for mounted in (False, True):
        dit = native()
        path = native_lora_file(dit, tmp_path / "ff.safetensors",
                                [n for n in linear_names(dit) if n.endswith("ff.proj_in")], relative_norm=0.2)
        if mounted:
            FUSED_LINEAR_GELU._set_enabled(FUSED_LINEAR_GELU.iter_sites(dit), True)
        manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=path)], "dynamic")
        results[mounted] = native_request(manager, sglang_env.native_inputs(), 1.0)
        manager.close()
    assert fused, "the fused site ran (stage 1, no adapter active)"
    assert not torch.equal(results[True][1], results[True][0])  # stage 2 has the LoRA
    for a, b in zip(results[False], results[True], strict=True):
        torch.testing.assert_close(a, b)


def test_a_request_sglang_never_finished_is_restored_before_the_next(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """sglang's finish_request stops at the first component whose hook raises: the DiT's may never
    come. The next request (a new sglang state) restores the DiT first and runs exact."""
    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    finish = served.strategy.finish_request
    monkeypatch.setattr(served.strategy, "finish_request", lambda *a, **k: None)
    served.run(inputs)
    assert manager.state.value != "clean"  # stage 2 still merged: sglang did not finish it
    monkeypatch.setattr(served.strategy, "finish_request", finish)
    assert_same_outputs(served.run(inputs), reference(fresh_model, distilled_path, "original", "merge", inputs,
                                                      0.0, 1.0))
    assert_clean(manager, clean)
    manager.close()


def test_an_interrupt_right_after_the_request_is_entered_frees_the_dit(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from ltx2_residency import RequestScope

    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    enter = RequestScope.__enter__
    cuts = [True]

    def cut(self: Any) -> Any:
        req = enter(self)
        if cuts:
            cuts.pop()
            raise KeyboardInterrupt  # after the DiT is owned, before the strategy keeps the request
        return req

    monkeypatch.setattr(RequestScope, "__enter__", cut)
    with pytest.raises(KeyboardInterrupt):
        served.run(inputs)
    assert_clean(manager, clean)  # and free again: synchronize() would raise "already owns the DiT"
    assert_same_outputs(served.run(inputs), reference(fresh_model, distilled_path, "original", "merge", inputs,
                                                      0.0, 1.0))
    manager.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "abc"])
def test_a_bad_stage2_strength_fails_the_request_before_stage1_runs(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], bad: object) -> None:
    from ltx2_residency import StrengthError

    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager)
    with pytest.raises(StrengthError, match="stage"):
        served.run(inputs, ltx2_distilled_lora_strength_stage_2=bad)
    assert served.outputs == []  # no DiT call ran
    assert_clean(manager, clean)
    manager.close()


@pytest.mark.parametrize(("attr", "value", "message"), [
    ("lora_initialized", True, "already applied LoRAs"),
    ("_stage1_distilled_in_base", True, "already applied LoRAs"),
    ("_stage1_lora_path", "user.safetensors", "user LoRA"),
])
def test_install_refuses_a_pipeline_whose_dit_sglang_already_changed(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        attr: str, value: object, message: str) -> None:
    from ltx2_residency.integrations.sglang import install

    dit = fresh_model()
    manager = ResidencyManager(dit, "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    pipe = object.__new__(sg.LTX2TwoStagePipeline)
    pipe.modules, pipe.component_residency_strategies = {"transformer": dit}, {}
    setattr(pipe, attr, value)
    with pytest.raises(EmbeddingError, match=message):
        install(pipe, manager)
    assert pipe.component_residency_strategies == {}
    manager.close()


def test_lora_spec_refuses_two_keys_for_one_factor_and_takes_peft_names(tmp_path: Any, sg: types.SimpleNamespace,
                                                                        native: Callable[[], nn.Module]) -> None:
    from safetensors.torch import save_file

    from ltx2_residency.integrations.sglang import lora_spec

    a, b = torch.randn(4, 64), torch.randn(64, 4)
    save_file({"diffusion_model.transformer_blocks.0.attn1.to_q.lora_down.weight": a,
               "transformer_blocks.0.attn1.to_q.lora_A.weight": a.clone(),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": b}, str(tmp_path / "twice.safetensors"))
    with pytest.raises(LoRAKeyError, match="two keys"):
        lora_spec("twice", tmp_path / "twice.safetensors")
    save_file({"base_model.model.transformer_blocks.0.attn1.to_q.lora_A.default.weight": a,
               "base_model.model.transformer_blocks.0.attn1.to_q.lora_B.default.weight": b,
               "base_model.model.transformer_blocks.0.attn1.to_q.lora_alpha": torch.tensor(8.0)},
              str(tmp_path / "peft.safetensors"))
    spec = lora_spec("peft", tmp_path / "peft.safetensors")
    q = "transformer_blocks.0.attn1.to_q"
    assert sorted(spec.tensors) == [f"{q}.alpha", f"{q}.lora_A.weight", f"{q}.lora_B.weight"]


@pytest.mark.parametrize("mode", ["original", "resident"])
def test_a_pipeline_laid_out_with_sglangs_transformer_2_runs_the_managers_dit(
        sg: types.SimpleNamespace, fresh_model: Callable[[], nn.Module], distilled_path: str,
        inputs: dict[str, Any], mode: str) -> None:
    """sglang's resident layout gives the refinement stage its own ``transformer_2``: the strategy
    serves it too, binds the stage to the manager's DiT for stage 2 and back to its own after."""
    dit, own_stage2 = fresh_model(), fresh_model()
    manager = ResidencyManager(dit, mode, [LoRASpec("distilled", path=distilled_path)], "merge")
    clean = weight_bits(manager.managed_weights)
    served = Served(sg, dit, manager, transformer_2=own_stage2)
    assert_same_outputs(served.run(inputs), reference(fresh_model, distilled_path, mode, "merge", inputs, 0.0, 1.0))
    assert served.pipe.get_stage("LTX2RefinementStage").transformer is own_stage2
    assert_clean(manager, clean)
    manager.close()
