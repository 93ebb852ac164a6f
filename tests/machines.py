"""What the Hypothesis state machines (``test_manager_stateful``, ``test_modes_stateful``) share.

A ``RuleBasedStateMachine`` cannot take pytest fixtures, so the read-only material (the tiny
DiT, real LoRA files, forward inputs) is built once per process here, with the same recipes as
the conftest fixtures. ``step_report`` makes the module fixture that prints how many steps a
module's machine ran, by rule, at the end of its run.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from ltx2_pipeline.tiny import tiny_inputs, tiny_transformer
from ltx2_residency.testing import linear_names, save_lora, synthetic_lora


@dataclass(frozen=True)
class Material:
    base: nn.Module  # never mutated: every example deep-copies it
    lora_paths: Mapping[str, str]
    lora_targets: Mapping[str, tuple[str, ...]]
    inputs: Mapping[str, Any]

    @functools.cached_property
    def base_output(self) -> torch.Tensor:
        """The unwrapped base model's output on ``inputs`` (computed on first use: a forward)."""
        with torch.no_grad():
            return self.base(**self.inputs)[0]


_TMP: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def material() -> Material:
    base = tiny_transformer(seed=0)
    linears = linear_names(base)
    attn = [n for n in linears if ".attn1." in n or ".attn2." in n]
    tmp = tempfile.TemporaryDirectory(prefix="ltx2-stateful-")
    _TMP.append(tmp)  # lives (and is cleaned up) with the process
    root = Path(tmp.name)
    paths = {
        # distilled: every block linear, rank 8, ‖ΔW‖ = 10 % of ‖W‖
        "distilled": save_lora(root / "distilled.safetensors",
                               synthetic_lora(base, linears, rank=8, relative_norm=0.10, seed=1)),
        # user: attention only, rank 4, alpha 8, ‖ΔW‖ = 15 %
        "user": save_lora(root / "user.safetensors",
                          synthetic_lora(base, attn, rank=4, relative_norm=0.15, seed=2, alpha=8.0)),
    }
    return Material(base, paths, {"distilled": tuple(linears), "user": tuple(attn)},
                    tiny_inputs(base, seed=0))


def step_report(steps: Counter[str], name: str,
                tallies: Counter[str] | None = None) -> Callable[..., Iterator[None]]:
    """A module-scoped autouse fixture (assign it to a module attribute) that clears ``steps``
    and prints them when the module is done; the key "examples" counts fresh managers.
    ``tallies`` (events within steps, e.g. faults that fired) are printed after them."""

    @pytest.fixture(scope="module", autouse=True)
    def _report_steps(request: pytest.FixtureRequest) -> Iterator[None]:
        steps.clear()
        if tallies is not None:
            tallies.clear()
        yield
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capture is None or not steps:
            return
        total = sum(n for k, n in steps.items() if k != "examples")
        detail = ", ".join(f"{k}={n}" for k, n in sorted(steps.items()) if k != "examples")
        line = f"\n{name}: {total} steps over {steps['examples']} managers ({detail})"
        if tallies:
            line += "; " + ", ".join(f"{k}={n}" for k, n in sorted(tallies.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return _report_steps


class BodyError(Exception):
    """What a request body raises in the tests."""


def exit_with(cm: contextlib.AbstractContextManager[Any], exc: BaseException) -> None:
    """Leave ``cm`` the way a ``with`` statement does when its body raised ``exc``."""
    try:
        raise exc
    except BaseException as raised:
        if not cm.__exit__(type(raised), raised, raised.__traceback__):
            raise


def injected_fault(kind: str, made: list[BaseException]) -> Callable[[], BaseException]:
    """A fault factory for ``FaultInjector.arm``: each exception it makes is appended to ``made``."""
    def make() -> BaseException:
        exc: BaseException
        if kind == "keyboard_interrupt":
            exc = KeyboardInterrupt()
        elif kind == "oom":
            exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        else:
            exc = RuntimeError("injected failure")
        made.append(exc)
        return exc
    return make


def failing_hit(count: int) -> st.SearchStrategy[int]:
    """Which of ``count`` hits fails: the first, second and last are the edge cases of an undo
    (nothing done yet, one layer done, all but the last done)."""
    return st.sampled_from(sorted({1, min(2, count), count})) | st.integers(1, count)
