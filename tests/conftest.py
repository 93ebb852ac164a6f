"""Shared fixtures: tiny LTX-2 DiTs, realistic LoRA files written as real safetensors,
hypothesis profiles.

Profiles: ``ci`` (derandomized, bounded; chosen automatically when CI is set), ``dev``
(the default locally), ``soak`` (long; ``HYPOTHESIS_PROFILE=soak``).
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when first imported (peft imports it, so before the project is): without
    # a GPU its kernels can only run interpreted. Only tests that opt in with
    # LTX2_RESIDENCY_KERNELS=interpret use them (see the fixture at the end).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora, weight_bits

_common = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               deadline=None)
settings.register_profile("ci", derandomize=True, max_examples=40, stateful_step_count=25,
                          print_blob=True, **_common)
settings.register_profile("dev", max_examples=25, stateful_step_count=25, **_common)
settings.register_profile("soak", max_examples=2000, stateful_step_count=60, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run through the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_model() -> torch.nn.Module:
    """One seeded tiny DiT; tests take deep copies (``fresh_model``) and never mutate this one."""
    return tiny_transformer(seed=0)


@pytest.fixture
def fresh_model(base_model: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    return lambda: copy.deepcopy(base_model)


@pytest.fixture
def model(fresh_model: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    return fresh_model()


@pytest.fixture(scope="session")
def block_linears(base_model: torch.nn.Module) -> list[str]:
    return linear_names(base_model)


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def distilled_path(base_model: torch.nn.Module, block_linears: list[str], lora_dir: Path) -> str:
    """A rank-8 LoRA on every block linear with ‖ΔW‖ = 10 % of ‖W‖, as a real file."""
    tensors = synthetic_lora(base_model, block_linears, rank=8, relative_norm=0.10, seed=1)
    return save_lora(lora_dir / "distilled.safetensors", tensors)


@pytest.fixture(scope="session")
def user_lora_path(base_model: torch.nn.Module, block_linears: list[str], lora_dir: Path) -> str:
    """A second LoRA (attention only, rank 4, alpha 8, ‖ΔW‖ = 15 %) to stack on the distilled one."""
    attn = [n for n in block_linears if ".attn1." in n or ".attn2." in n]
    tensors = synthetic_lora(base_model, attn, rank=4, relative_norm=0.15, seed=2, alpha=8.0)
    return save_lora(lora_dir / "user.safetensors", tensors)


@pytest.fixture
def inputs(base_model: torch.nn.Module) -> dict:
    return tiny_inputs(base_model, seed=0)


@pytest.fixture
def bits_of() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return weight_bits


@pytest.fixture(autouse=True)
def _fused_runs_in_the_triton_interpreter(request: pytest.FixtureRequest,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A test parametrised with restore strategy ``"fused"`` runs its Triton kernels on the CPU
    through the interpreter (compiled, on the device machine's GPU); skipped without Triton."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if "fused" not in params.values():
        return
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("LTX2_RESIDENCY_KERNELS", "interpret")


@pytest.fixture(autouse=True)
def _ctrl_c_reaches_python() -> None:
    """A test run started in the background of a script (``make test &``) inherits SIGINT ignored, and
    so would every process it starts; the tests that send a real Ctrl-C need Python's own handler, as
    in a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
