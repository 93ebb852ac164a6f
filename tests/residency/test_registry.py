"""LoRAs chosen per request: the registry (add/remove), the request's choice, and the tiers that
hold added LoRAs (host cache, device slots, disk), each compared bit for bit with a manager that
was built with the same LoRAs as its own."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ltx2_residency import (
    CompileSpec,
    LoRACacheError,
    LoRAChangedError,
    LoRAFitError,
    LoRANameClashError,
    LoRASpec,
    ManagerOptions,
    RegisteredLoRA,
    ResidencyManager,
    StrengthError,
    UnknownLoRAError,
    no_recompiles,
)
from ltx2_residency.testing import save_lora, synthetic_lora, weight_bits
from untouched import assert_same_bits

Mix = Mapping[str, float | Mapping[str, float]]


@pytest.fixture(scope="module")
def user_files(base_model: nn.Module, block_linears: list[str], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, str]:
    """Three user LoRAs of different ranks and layers, as files."""
    root = tmp_path_factory.mktemp("user_loras")
    attn = [n for n in block_linears if ".attn1." in n]
    ff = [n for n in block_linears if ".ff." in n] or block_linears[-4:]
    layers = {"style": (attn, 4, 8.0), "hero": (ff, 6, None), "ink": (block_linears[:6], 2, 1.0)}
    return {name: save_lora(root / f"{name}.safetensors",
                            synthetic_lora(base_model, names, rank=rank, relative_norm=0.15, seed=10 + i, alpha=alpha))
            for i, (name, (names, rank, alpha)) in enumerate(layers.items())}


def _run(mgr: ResidencyManager, inputs: dict[str, Any], loras: Mix | None,
         overrides: Mapping[str, float] | None = None) -> list[torch.Tensor]:
    with torch.no_grad(), mgr.request(loras=loras) as req:
        return [req.enter("stage1")(**inputs)[0], req.enter("stage2", strengths=overrides)(**inputs)[0]]


def _reference(fresh_model: Callable[[], nn.Module], distilled_path: str, files: Mapping[str, str], policy: str,
               inputs: dict[str, Any], loras: Mix, overrides: Mapping[str, float] | None = None) -> list[torch.Tensor]:
    """The same request on a manager built with every LoRA as its own."""
    mgr = ResidencyManager(fresh_model(), "original",
                           [LoRASpec("distilled", path=distilled_path),
                            *(LoRASpec(n, path=p) for n, p in files.items())], policy)
    try:
        return _run(mgr, inputs, loras, overrides)
    finally:
        mgr.close()


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("policy", ["merge", "dynamic", "sglang"])
def test_an_added_lora_runs_as_if_it_were_the_managers_own(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        inputs: dict[str, Any], policy: str) -> None:
    model = fresh_model()
    mgr = ResidencyManager(model, "original", [LoRASpec("distilled", path=distilled_path)], policy)
    clean = weight_bits(mgr.managed_weights)
    for name, path in user_files.items():
        entry = mgr.add_lora(LoRASpec(name, path=path))
        assert isinstance(entry, RegisteredLoRA) and mgr.loras[name] is entry and entry.adapter is None
    mixes: list[Mix] = [{"style": 0.8, "distilled": {"stage2": 1.0}},
                        {"hero": {"stage1": 0.5, "stage2": 1.25}, "ink": 0.3},
                        {"distilled": {"stage2": 1.0}},
                        {"ink": 1.0, "style": {"stage2": 0.4}, "distilled": {"stage2": 0.5}}]
    for mix in mixes:
        got = _run(mgr, inputs, mix)
        _assert_equal(got, _reference(fresh_model, distilled_path, user_files, policy, inputs, mix))
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
    stats = mgr.lora_cache_stats()
    assert stats["device"]["slots"] == 2 and stats["device"]["slots_used"] == 2
    assert stats["device"]["loads"] >= 3 and stats["host"]["hits"] >= 3
    mgr.close()


def test_overrides_and_loras_none(fresh_model: Callable[[], nn.Module], distilled_path: str,
                                  user_files: dict[str, str], inputs: dict[str, Any]) -> None:
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    mgr.add_lora(LoRASpec("style", path=user_files["style"], strengths={"stage1": 0.5}))
    # None: every registered LoRA at its spec's strengths
    _assert_equal(_run(mgr, inputs, None),
                  _reference(fresh_model, distilled_path, {"style": user_files["style"]}, "merge", inputs,
                             {"distilled": {"stage2": 1.0}, "style": {"stage1": 0.5}}))
    # req.enter's overrides apply to the request's own LoRAs only
    _assert_equal(_run(mgr, inputs, {"style": 0.25, "distilled": 0.0}, {"style": 1.0}),
                  _reference(fresh_model, distilled_path, {"style": user_files["style"]}, "merge", inputs,
                             {"style": 0.25, "distilled": 0.0}, {"style": 1.0}))
    with pytest.raises(StrengthError, match="did not choose"), mgr.request(loras={"style": 1.0}) as req:
        req.enter("stage1", strengths={"distilled": 1.0})
    mgr.close()


def test_refusals_register_nothing_and_move_nothing(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        base_model: nn.Module, block_linears: list[str], tmp_path: Path) -> None:
    attn = [n for n in block_linears if ".attn1." in n]
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("own", path=user_files["style"])], "merge",
                           options=ManagerOptions(lora_slot_rank=4, host_lora_cache_bytes=10**6))
    clean = weight_bits(mgr.managed_weights)
    before = dict(mgr.loras)
    outside = save_lora(tmp_path / "outside.safetensors",
                        synthetic_lora(base_model, block_linears[-2:], rank=2, seed=5))
    wide = save_lora(tmp_path / "wide.safetensors", synthetic_lora(base_model, attn, rank=8, seed=6))
    big = save_lora(tmp_path / "big.safetensors", synthetic_lora(base_model, attn, rank=4, seed=7))
    with pytest.raises(LoRANameClashError, match="already registered"):
        mgr.add_lora(LoRASpec("own", path=user_files["style"]))
    with pytest.raises(LoRAFitError, match="does not manage"):
        mgr.add_lora(LoRASpec("outside", path=outside))
    with pytest.raises(LoRAFitError, match="lora_slot_rank=8"):
        mgr.add_lora(LoRASpec("wide", path=wide))
    small = ResidencyManager(fresh_model(), "original", [LoRASpec("own", path=user_files["style"])], "merge",
                             options=ManagerOptions(host_lora_cache_bytes=1000))
    with pytest.raises(LoRAFitError, match="host_lora_cache_bytes"):
        small.add_lora(LoRASpec("big", path=big))
    small.close()
    with pytest.raises(UnknownLoRAError, match="not registered"):
        mgr.request(loras={"nobody": 1.0})
    with pytest.raises(UnknownLoRAError, match="no LoRA named"):
        mgr.remove_lora("nobody")
    with pytest.raises(StrengthError):
        mgr.request(loras={"own": -1.0})
    with pytest.raises(StrengthError, match="phase"):
        mgr.request(loras={"own": {"stage3": 1.0}})
    with pytest.raises(StrengthError, match="mapping"):
        mgr.request(loras=["own"])  # type: ignore[arg-type]
    assert dict(mgr.loras) == before
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()


def test_a_request_runs_at_most_as_many_added_loras_as_there_are_slots(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str]) -> None:
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge")
    for name, path in user_files.items():
        mgr.add_lora(LoRASpec(name, path=path))
    with pytest.raises(LoRACacheError, match="2 slots"):
        mgr.request(loras=dict.fromkeys(user_files, 1.0))
    with pytest.raises(LoRACacheError, match="device_lora_cache_bytes"):
        mgr.request(loras=None)  # every registered LoRA at its default strength: stage 2 at 1.0
    none = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge",
                            options=ManagerOptions(device_lora_cache_bytes=0))
    with pytest.raises(LoRAFitError, match="no slot"):
        none.add_lora(LoRASpec("style", path=user_files["style"]))
    for m in (mgr, none):
        m.close()


def test_a_file_changed_after_registration_is_refused_when_read_again(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        base_model: nn.Module, block_linears: list[str], inputs: dict[str, Any], tmp_path: Path) -> None:
    attn = [n for n in block_linears if ".attn1." in n]
    path = save_lora(tmp_path / "mutable.safetensors", synthetic_lora(base_model, attn, rank=4, seed=20))
    size = os.path.getsize(user_files["style"])
    # a host cache of one LoRA: the second evicts the first, which is then read from disk again
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge",
                           options=ManagerOptions(host_lora_cache_bytes=size))
    mgr.add_lora(LoRASpec("mutable", path=path))
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    assert mgr.lora_cache_stats()["host"]["evictions"] == 1
    clean = weight_bits(mgr.managed_weights)
    save_lora(path, synthetic_lora(base_model, attn, rank=4, seed=21))  # same shapes, other values
    with pytest.raises(LoRAChangedError, match="changed since it was registered"), \
            mgr.request(loras={"mutable": 1.0}) as req:
        req.enter("stage1")
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    # the evicted LoRA comes back from disk, exact, when its file is as registered
    mgr.remove_lora("mutable")
    mgr.add_lora(LoRASpec("mutable", path=path))
    got = _run(mgr, inputs, {"style": 1.0})
    assert mgr.lora_cache_stats()["disk"]["loads"] >= 1
    _assert_equal(got, _reference(fresh_model, distilled_path, {"style": user_files["style"]}, "merge", inputs,
                                  {"style": 1.0}))
    mgr.close()


def test_a_removed_lora_stays_with_the_requests_that_chose_it(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        inputs: dict[str, Any]) -> None:
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "dynamic")
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    scope = mgr.request(loras={"style": 1.0, "distilled": {"stage2": 1.0}})
    mgr.remove_lora("style")
    assert "style" not in mgr.loras
    with torch.no_grad(), scope as req:
        got = [req.enter("stage1")(**inputs)[0], req.enter("stage2")(**inputs)[0]]
    _assert_equal(got, _reference(fresh_model, distilled_path, {"style": user_files["style"]}, "dynamic", inputs,
                                  {"style": 1.0, "distilled": {"stage2": 1.0}}))
    with pytest.raises(UnknownLoRAError):
        mgr.request(loras={"style": 1.0})
    # the name is free again: the new entry is another LoRA, never the old one's slot
    mgr.add_lora(LoRASpec("style", path=user_files["hero"]))
    _assert_equal(_run(mgr, inputs, {"style": 1.0}),
                  _reference(fresh_model, distilled_path, {"style": user_files["hero"]}, "dynamic", inputs,
                             {"style": 1.0}))
    mgr.close()


def test_a_manager_without_loras_takes_added_ones_on_its_block_linears(
        fresh_model: Callable[[], nn.Module], user_files: dict[str, str], inputs: dict[str, Any]) -> None:
    model = fresh_model()
    before = weight_bits(dict(model.named_parameters()))
    mgr = ResidencyManager(model, "original", [], "merge")
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    got = _run(mgr, inputs, {"style": 0.7})
    ref = ResidencyManager(fresh_model(), "original", [LoRASpec("style", path=user_files["style"])], "merge")
    _assert_equal(got, _run(ref, inputs, {"style": 0.7}))
    for m in (mgr, ref):
        m.close()
    assert_same_bits(before, weight_bits(dict(model.named_parameters())))


@pytest.mark.parametrize("policy", ["merge", "dynamic"])
def test_added_loras_on_a_compiled_dit_are_writes_not_graphs(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        block_linears: list[str], inputs: dict[str, Any], policy: str) -> None:
    # slots sized up front: the compiled DiT's modules never change, a new LoRA is a copy into a slot
    # (in float32: the LoRA's effect then stands far above the graph's own rounding)
    model = fresh_model().float()
    inputs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    linears = [model.get_submodule(n) for n in block_linears]
    slot = 128 * sum((m.in_features + m.out_features) * m.weight.element_size() for m in linears)
    mgr = ResidencyManager(model, "original", [LoRASpec("distilled", path=distilled_path)], policy,
                           options=ManagerOptions(device_lora_cache_bytes=2 * slot))
    mgr.compile(CompileSpec(backend="aot_eager"))
    assert mgr.lora_cache_stats()["device"]["slots"] == 2
    mgr.add_lora(LoRASpec("hero", path=user_files["hero"]))
    _run(mgr, inputs, {"hero": 1.0, "distilled": {"stage2": 1.0}})  # warm-up: the graphs
    with no_recompiles():
        mgr.add_lora(LoRASpec("style", path=user_files["style"]))
        got = _run(mgr, inputs, {"style": 2.0, "distilled": {"stage2": 1.0}})
    with torch.compiler.set_stance("force_eager"):
        want = _run(mgr, inputs, {"style": 2.0, "distilled": {"stage2": 1.0}})
        without = _run(mgr, inputs, {"distilled": {"stage2": 1.0}})
    for g, w, base in zip(got, want, without, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert (w - base).abs().mean() > 1e-3
    mgr.close()


@pytest.mark.parametrize("mode", ["resident", "snapshot"])
def test_added_loras_in_the_modes_with_a_stage2_copy(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        inputs: dict[str, Any], mode: str) -> None:
    # the copy holds the distilled LoRA only: a stage 2 with an added LoRA runs dynamic on the base
    mgr = ResidencyManager(fresh_model(), mode, [LoRASpec("distilled", path=distilled_path)], "sglang")
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    clean = weight_bits(mgr.managed_weights)
    for mix in ({"style": 0.5, "distilled": {"stage2": 1.0}}, {"distilled": {"stage2": 1.0}}):
        got = _run(mgr, inputs, mix)
        # the reference's copy holds the distilled LoRA only too (its own style LoRA at 0 by default)
        ref = ResidencyManager(fresh_model(), mode, [LoRASpec("distilled", path=distilled_path),
                                                     LoRASpec("style", path=user_files["style"], strengths={})],
                               "sglang")
        _assert_equal(got, _run(ref, inputs, mix))
        ref.close()
        assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()


def test_files_that_cannot_be_read_are_typed_errors(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        inputs: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from ltx2_residency import LoRAValidationError

    size = os.path.getsize(user_files["style"])
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge",
                           options=ManagerOptions(host_lora_cache_bytes=size))
    with pytest.raises(LoRAValidationError):
        mgr.add_lora(LoRASpec("ghost", path=tmp_path / "missing.safetensors"))
    moved = shutil.copy(user_files["style"], tmp_path / "moved.safetensors")
    mgr.add_lora(LoRASpec("moved", path=moved))
    mgr.add_lora(LoRASpec("ink", path=user_files["ink"]))  # evicts "moved" from the host cache
    os.remove(moved)
    clean = weight_bits(mgr.managed_weights)
    with pytest.raises(LoRAChangedError, match="can no longer be read"), mgr.request(loras={"moved": 1.0}):
        pass
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()


def test_an_interrupted_admission_holds_nothing(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ltx2_residency import lora_cache

    size = os.path.getsize(user_files["style"])
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "merge",
                           options=ManagerOptions(host_lora_cache_bytes=size))
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    mgr.add_lora(LoRASpec("ink", path=user_files["ink"]))  # evicts "style": its admission reads it

    def interrupted(self: Any, entry: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_cache.LoRACache, "_fetch", interrupted)
    with pytest.raises(KeyboardInterrupt), mgr.request(loras={"style": 1.0, "ink": 1.0}):
        pass
    host = mgr._cache.host
    assert not host._users  # every hold let go
    monkeypatch.undo()
    mgr.remove_lora("ink")
    assert "ink" not in [e.name for e in mgr.loras.values()] and mgr.lora_cache_stats()["host"]["loras"] == 0
    mgr.close()


def test_each_request_says_where_its_added_loras_came_from(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str]) -> None:
    """device: already in a slot; host: the host cache; disk: read for this request."""
    size = max(os.path.getsize(p) for p in user_files.values())
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "dynamic",
                           options=ManagerOptions(host_lora_cache_bytes=size))  # holds one LoRA
    mgr.add_lora(LoRASpec("style", path=user_files["style"]))
    mgr.add_lora(LoRASpec("hero", path=user_files["hero"]))  # evicts style from the host cache

    def sources(loras: Mix) -> dict[str, str]:
        with mgr.request(loras=loras) as req:
            return req.lora_sources

    assert sources({"hero": 1.0}) == {"hero": "host"}
    assert sources({"hero": 0.5}) == {"hero": "device"}
    assert sources({"style": 1.0, "hero": 1.0}) == {"style": "disk", "hero": "device"}
    assert sources({"distilled": 1.0}) == {}  # the manager's own LoRAs are not added ones
    stats = mgr.lora_cache_stats()
    assert stats["disk"]["loads"] == 1 and stats["device"]["staged"] == 0  # nothing is staged on a CPU
    mgr.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_waiting_requests_lora_is_staged_on_the_device_and_exact(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        inputs: dict[str, Any]) -> None:
    """Admitted while another request holds the DiT, a request's LoRA is copied to the device on a
    side stream; its bind takes the staged copy, and the result equals the LoRA loaded at bind."""
    import threading

    cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    on_gpu = lambda: fresh_model().cuda()  # noqa: E731
    want = _reference(on_gpu, distilled_path, {"ink": user_files["ink"]}, "dynamic", cuda, {"ink": 0.7})
    size = max(os.path.getsize(p) for p in user_files.values())
    mgr = ResidencyManager(on_gpu(), "original", [LoRASpec("distilled", path=distilled_path)], "dynamic",
                           options=ManagerOptions(host_lora_cache_bytes=size))  # holds one LoRA
    for name in ("ink", "style", "hero"):  # ink is evicted from the host cache: read from disk again
        mgr.add_lora(LoRASpec(name, path=user_files[name]))
    clean = weight_bits(mgr.managed_weights)
    got: list[list[torch.Tensor]] = []
    sources: list[dict[str, str]] = []
    second_admitted = threading.Event()

    def second() -> None:
        with torch.no_grad(), mgr.request(loras={"ink": 0.7}) as req:
            sources.append(req.lora_sources)
            got.append([req.enter("stage1")(**cuda)[0], req.enter("stage2")(**cuda)[0]])

    with mgr.request(loras={"hero": 1.0}) as req:  # hero, from the host cache: staged and taken
        staged = mgr.lora_cache_stats()["device"]["staged"]
        thread = threading.Thread(target=second)
        thread.start()
        while mgr.lora_cache_stats()["device"]["staged"] == staged and thread.is_alive():
            second_admitted.wait(0.01)  # the second request's LoRA is read and staged as it waits
        req.enter("stage1")
    thread.join()
    stats = mgr.lora_cache_stats()["device"]
    assert stats["staged"] == stats["staged_used"] == 2
    assert sources == [{"ink": "disk"}]
    _assert_equal(got[0], want)
    mgr.synchronize()
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()



def test_auto_prices_the_loras_the_request_chose(
        fresh_model: Callable[[], nn.Module], distilled_path: str, user_files: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A small added LoRA costs less both ways than the manager's own rank-8 LoRA on every layer."""
    from ltx2_residency import PhaseWork
    from ltx2_residency.costmodel import CPU, CostModel, DeviceRates

    monkeypatch.setattr(DeviceRates, "measure", classmethod(lambda cls, device: CPU))  # no probe: fixed rates
    for kind in ("merge", "undo"):  # no clock either: the estimates alone
        monkeypatch.setattr(CostModel, f"observe_{kind}", lambda self, ms, adapters=None: None)
    mgr = ResidencyManager(fresh_model(), "original", [LoRASpec("distilled", path=distilled_path)], "auto")
    clean = weight_bits(mgr.managed_weights)
    mgr.add_lora(LoRASpec("ink", path=user_files["ink"]))
    work = PhaseWork(steps=4, tokens=64)
    decisions = {}
    for name in ("distilled", "ink"):
        with mgr.request(loras={name: 1.0}) as req:
            req.enter("stage1", work=work)
            decisions[name] = mgr.policy.last
    own, ink = decisions["distilled"], decisions["ink"]
    assert ink.merge_ms < own.merge_ms and ink.dynamic_ms < own.dynamic_ms
    mgr.synchronize()
    assert_same_bits(clean, weight_bits(mgr.managed_weights))
    mgr.close()
