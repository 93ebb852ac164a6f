"""The manager under torch.compile (ltx2_residency.compiled): the tiny DiT compiled with a CPU
backend, warmed up on each phase kind, then requests with new strengths, LoRA mixes and policies
under ``error_on_recompile``: no new graph, outputs as the same requests run eager, and the DiT
clean bit for bit afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from ltx2_pipeline.tiny import tiny_inputs
from ltx2_residency import (
    CompiledModuleError,
    CompileSpec,
    ConfigError,
    LoRASpec,
    ManagerClosedError,
    ManagerOptions,
    OptionError,
    ResidencyManager,
    WeightState,
    compile_dit,
    compiled_graphs,
    is_compiled,
    no_recompiles,
)
from ltx2_residency.testing import save_lora, synthetic_lora, weight_bits
from untouched import assert_same_bits

# Eager and compiled runs of the dynamic path round in different places (the eager forward fuses
# the scale into one addmm, the graph scales h in float32): bf16 roundings, the tolerance of
# test_forward's fused-vs-PEFT comparison. A merged or base phase runs the same kernels: equal.
ATOL = 2.0**-5

# stage 2 strengths (and policies) after warm-up: new strengths, mixes, a LoRA alone
REQUESTS = [
    ("dynamic", {"distilled": 0.5}),
    ("dynamic", {"distilled": 0.7, "user": 0.3}),
    ("merge", {"distilled": 0.25, "user": 2.0}),
    ("dynamic", {"user": 1.0}),
    ("sglang", {"distilled": 0.9}),
    ("auto", {"distilled": 1.0, "user": 0.5}),
    ("merge", {"user": 0.75}),
    ("dynamic", {"distilled": 1.5, "user": 1.0}),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _specs(distilled: str, user: str) -> list[LoRASpec]:
    return [LoRASpec("distilled", path=distilled, strengths={"stage1": 0.0, "stage2": 1.0}),
            LoRASpec("user", path=user, strengths={"stage1": 0.0, "stage2": 0.0})]


def _request(mgr: ResidencyManager, x1: dict[str, Any], x2: dict[str, Any],
             stage2: dict[str, float], stage1: dict[str, float] | None = None) -> list[torch.Tensor]:
    with torch.no_grad(), mgr.request() as req:
        dit = req.enter("stage1", strengths=stage1)
        out = [_call(dit, x1)]
        dit = req.enter("stage2", strengths=stage2)
        out.append(_call(dit, x2))
    return out


def _call(dit: nn.Module, x: dict[str, Any]) -> torch.Tensor:
    # under CUDA graphs each call is a step of its own (its outputs are copied before the next)
    torch.compiler.cudagraph_mark_step_begin()
    return dit(**x)[0].float()


def _eager(mgr: ResidencyManager, *args: Any) -> list[torch.Tensor]:
    with torch.compiler.set_stance("force_eager"):
        return _request(mgr, *args)


def _warm_up(mgr: ResidencyManager, x1: dict[str, Any], x2: dict[str, Any]) -> None:
    """A request per phase kind at each shape: base, merged and dynamic, and (resident and snapshot
    modes) stage 2 on the pre-merged copy and, for other strengths, on the base DiT."""
    for policy, stage1, stage2 in (("merge", None, {"distilled": 1.0}),
                                   ("merge", {"user": 0.5}, {"distilled": 1.0, "user": 0.5}),
                                   ("dynamic", {"user": 0.5}, {"distilled": 1.0, "user": 0.5})):
        mgr.set_merge_policy(policy)
        _request(mgr, x1, x2, stage2, stage1)


def _inputs(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    # stage 2 runs on twice the latent height, as after the x2 upsample
    return tiny_inputs(model, seed=0), tiny_inputs(model, seed=1, height=8)


def _compiled(model: nn.Module, specs: list[LoRASpec], policy: str
              ) -> tuple[ResidencyManager, dict[str, Any], dict[str, Any]]:
    """A manager in original mode on ``model``, compiled with aot_eager, and the two stages' inputs."""
    mgr = ResidencyManager(model, "original", specs, policy)
    mgr.compile(CompileSpec(backend="aot_eager"))
    return (mgr, *_inputs(model))


def _compile(model: nn.Module, mgr: ResidencyManager | None, how: str) -> None:
    """Compile ``model`` as a caller would: through the manager or compile_dit (``spec``), with
    diffusers' regional compilation, or the module's own ``compile()`` (Dynamo's default,
    fullgraph off)."""
    if how in ("regional", "whole"):
        spec = CompileSpec(backend="aot_eager", regional=how == "regional")
        mgr.compile(spec) if mgr is not None else compile_dit(model, spec)
    elif how == "diffusers":
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    else:
        model.compile(backend="aot_eager")


@pytest.mark.parametrize(("mode", "how", "order"), [
    ("original", "regional", "after"),
    ("original", "regional", "before"),
    ("original", "whole", "after"),
    ("original", "whole", "before"),
    ("original", "diffusers", "before"),
    ("original", "module", "after"),
    ("resident", "regional", "before"),
    ("snapshot", "regional", "after"),
])
def test_no_recompiles_after_warm_up(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                     user_lora_path: str, mode: str, how: str, order: str) -> None:
    model = fresh_model()
    clean = weight_bits({n: p for n, p in model.named_parameters()})
    if order == "before":
        _compile(model, None, how)
    mgr = ResidencyManager(model, mode, _specs(distilled_path, user_lora_path), "merge")
    if order == "after":
        _compile(model, mgr, how)
    assert mgr.compiled and is_compiled(model)
    x1, x2 = _inputs(model)
    start = compiled_graphs()
    _warm_up(mgr, x1, x2)
    warm = compiled_graphs()
    # one graph per phase kind (base or merged, dynamic) and shape: the blocks share theirs
    # (regional); a stage-2 copy (plain Linears, no adapters) has its own at stage 2's shape.
    # Compiled with Dynamo's default dynamic=None, a second shape also compiles a dynamic-shape graph.
    limit = (5 if mode in ("resident", "snapshot") else 4) * (1 if how in ("regional", "whole") else 2)
    assert 0 < warm - start <= limit
    with no_recompiles():
        for policy, strengths in REQUESTS:
            mgr.set_merge_policy(policy)
            compiled = _request(mgr, x1, x2, strengths)
            eager = _eager(mgr, x1, x2, strengths)
            assert torch.equal(compiled[0], eager[0])  # stage 1: the base weights
            if policy == "merge" and mode == "original":  # merged in place: the same kernels
                assert torch.equal(compiled[1], eager[1])
            # (resident and snapshot modes run an override of the copy's strengths dynamic)
            torch.testing.assert_close(compiled[1], eager[1], atol=ATOL, rtol=0)
            assert mgr.state in (WeightState.CLEAN, WeightState.OFFLOADED)
    assert compiled_graphs() == warm
    mgr.verify_clean()
    mgr.close()
    assert_same_bits(clean, weight_bits({n: p for n, p in model.named_parameters()}))


def test_a_new_mix_is_a_write_not_a_graph(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                          user_lora_path: str) -> None:
    # the dynamic graph reads every LoRA's strength from one tensor: the output still follows it
    model = fresh_model()
    mgr, x1, x2 = _compiled(model, _specs(distilled_path, user_lora_path), "dynamic")
    _warm_up(mgr, x1, x2)
    mgr.set_merge_policy("dynamic")
    with no_recompiles():
        base = _request(mgr, x1, x2, {"distilled": 0.0})[1]
        one = _request(mgr, x1, x2, {"distilled": 1.0})[1]
        mix = _request(mgr, x1, x2, {"distilled": 1.0, "user": 1.0})[1]
        half = _request(mgr, x1, x2, {"distilled": 0.5})[1]
    assert not torch.equal(one, mix) and not torch.equal(one, half)
    effect = (one - base).abs().mean()
    assert (half - (base + one) / 2).abs().mean() < effect / 5  # linear in the strength, to rounding
    mgr.close()


def test_blocks_share_a_graph_when_a_loras_alpha_differs_between_them(
        fresh_model: Callable[[], nn.Module], block_linears: list[str], tmp_path: Any) -> None:
    # alpha/rank is read from a tensor in the graph: per-block values are no part of its guards
    model = fresh_model()
    tensors = {}
    for block in (0, 1):
        names = [n for n in block_linears if n.startswith(f"transformer_blocks.{block}.")]
        tensors.update(synthetic_lora(model, names, rank=4, seed=block, alpha=4.0 + 4 * block))
    spec = LoRASpec("mixed", path=save_lora(tmp_path / "mixed.safetensors", tensors),
                    strengths={"stage1": 0.0, "stage2": 1.0})
    mgr, x1, x2 = _compiled(model, [spec], "dynamic")
    start = compiled_graphs()
    _request(mgr, x1, x2, {"mixed": 1.0})
    assert compiled_graphs() - start == 2  # base at stage 1's shape, dynamic at stage 2's: both blocks
    with no_recompiles():
        out = _request(mgr, x1, x2, {"mixed": 0.5})[1]
    torch.testing.assert_close(out, _eager(mgr, x1, x2, {"mixed": 0.5})[1], atol=ATOL, rtol=0)
    mgr.close()


def test_merge_ahead_under_compile(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                   user_lora_path: str) -> None:
    # the merge ahead's hooks run outside the graphs: on a compiled DiT the whole merge is
    # launched when the last announced call is done
    model = fresh_model()
    mgr, x1, x2 = _compiled(model, _specs(distilled_path, user_lora_path), "merge")
    clean = weight_bits(mgr.managed_weights)

    def ahead(strengths: dict[str, float]) -> torch.Tensor:
        with torch.no_grad(), mgr.request() as req:
            dit = req.enter("stage1")
            assert req.prepare("stage2", strengths, calls=1)
            dit(**x1)
            return req.enter("stage2", strengths=strengths)(**x2)[0].float()

    ahead({"distilled": 1.0})
    with no_recompiles():
        for strengths in ({"distilled": 0.5}, {"distilled": 1.0, "user": 0.5}):
            with torch.compiler.set_stance("force_eager"):
                expected = _request(mgr, x1, x2, strengths)[1]
            torch.testing.assert_close(ahead(strengths), expected, atol=0, rtol=0)
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_the_guard_still_refuses_on_a_compiled_dit(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                                   user_lora_path: str) -> None:
    from ltx2_residency import ForwardGuardError
    for regional in (True, False):
        torch._dynamo.reset()
        model = fresh_model()
        mgr = ResidencyManager(model, "original", _specs(distilled_path, user_lora_path), "merge",
                               options=ManagerOptions(strict=True))
        mgr.compile(CompileSpec(backend="aot_eager", regional=regional))
        x1, x2 = _inputs(model)
        _request(mgr, x1, x2, {"distilled": 1.0})
        with torch.no_grad(), pytest.raises(ForwardGuardError, match="outside a request phase"):
            model(**x1)
        mgr.close()
        with torch.no_grad():
            model(**x1)  # given back: unguarded, compiled as it was


def test_compiled_wrapper_is_refused_untouched(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                               user_lora_path: str) -> None:
    model = fresh_model()
    before = weight_bits({n: p for n, p in model.named_parameters()})
    modules = [type(m) for m in model.modules()]
    with pytest.raises(CompiledModuleError, match="compile it in place"):
        ResidencyManager(torch.compile(model, backend="aot_eager"), "original", _specs(distilled_path, user_lora_path))
    with pytest.raises(CompiledModuleError, match="in place"):
        compile_dit(torch.compile(model, backend="aot_eager"))
    assert [type(m) for m in model.modules()] == modules and not is_compiled(model)
    assert_same_bits(before, weight_bits({n: p for n, p in model.named_parameters()}))


def test_a_copy_needs_to_know_how_the_dit_was_compiled(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                                       user_lora_path: str) -> None:
    model = fresh_model()
    model.compile(backend="aot_eager")  # by other means: the resident copy cannot be compiled alike
    before = weight_bits({n: p for n, p in model.named_parameters()})
    with pytest.raises(CompiledModuleError, match="manager.compile"):
        ResidencyManager(model, "resident", _specs(distilled_path, user_lora_path))
    assert_same_bits(before, weight_bits({n: p for n, p in model.named_parameters()}))
    ResidencyManager(model, "original", _specs(distilled_path, user_lora_path)).close()  # one DiT: fine


def test_compile_spec_is_checked() -> None:
    assert CompileSpec.of(None) is None and CompileSpec.of(False) is None
    assert CompileSpec.of(True) == CompileSpec()
    assert CompileSpec.of(" Reduce-Overhead ").cuda_graphs
    assert not CompileSpec.of("max-autotune-no-cudagraphs").cuda_graphs
    assert CompileSpec(backend="aot_eager").kwargs() == {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    for bad in ({"mode": "fast"}, {"backend": ""}, {"backend": "aot_eager", "mode": "reduce-overhead"},
                {"regional": 1}):
        with pytest.raises(OptionError):
            CompileSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="CompileSpec"):
        CompileSpec.of(3)
    model = nn.Linear(2, 2)
    with pytest.raises(OptionError, match="not one this torch has"):
        compile_dit(model, CompileSpec(backend="nosuch"))
    with pytest.raises(OptionError, match="numbered blocks"):
        compile_dit(model, CompileSpec(backend="aot_eager"))
    assert not is_compiled(model)


def test_compile_is_between_requests(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                     user_lora_path: str) -> None:
    from ltx2_residency import RequestStateError
    model = fresh_model()
    mgr = ResidencyManager(model, "original", _specs(distilled_path, user_lora_path))
    with pytest.raises(ConfigError, match="un-compiled"):
        mgr.compile(False)
    with mgr.request(), pytest.raises(RequestStateError, match="between requests"):
        mgr.compile(CompileSpec(backend="aot_eager"))
    assert not mgr.compiled
    mgr.close()
    with pytest.raises(ManagerClosedError):
        mgr.compile(CompileSpec(backend="aot_eager"))
    assert not is_compiled(model)


# ---------------------------------------------------------------------------- on a GPU, with inductor
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead"])
@pytest.mark.parametrize("residency", ["original", "resident", "snapshot"])
def test_no_recompiles_with_inductor_on_the_gpu(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                                user_lora_path: str, mode: str, residency: str) -> None:
    # CUDA graphs (reduce-overhead) read the weights' storage when replayed: a merge written in
    # place, the dynamic strengths written into their tensor, must be seen by every replay
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run through the device machine)")
    model = fresh_model().cuda()
    clean = weight_bits({n: p for n, p in model.named_parameters()})
    mgr = ResidencyManager(model, residency, _specs(distilled_path, user_lora_path), "merge")
    spec = CompileSpec(mode=mode)
    mgr.compile(spec)
    x1, x2 = (({k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}) for x in _inputs(model))
    start = compiled_graphs()
    _warm_up(mgr, x1, x2)
    assert 0 < compiled_graphs() - start <= (5 if residency != "original" else 4)
    warm = compiled_graphs()
    with no_recompiles():
        for policy, strengths in REQUESTS:
            mgr.set_merge_policy(policy)
            compiled = _request(mgr, x1, x2, strengths)
            eager = _eager(mgr, x1, x2, strengths)
            for c, e in zip(compiled, eager, strict=True):
                # inductor fuses and reorders: bf16 roundings on both forms
                torch.testing.assert_close(c, e, atol=2**-4, rtol=2**-5)
    assert compiled_graphs() == warm
    mgr.verify_clean()
    mgr.close()
    assert_same_bits(clean, weight_bits({n: p for n, p in model.named_parameters()}))
