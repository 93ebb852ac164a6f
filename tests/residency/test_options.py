"""The manager's options: every keyword of ``ResidencyManager(...)`` is checked by
``options.manager_options`` and every per-call ``timeout=`` by ``options.checked_timeout``.

Contract under test: a bad value raises :class:`OptionError` (a ``ConfigError``, so a
``ResidencyError`` and a ``ValueError``) whose ``argument`` and message name the keyword; a value of
the wrong type is refused, never taken for its truthiness (``strict="no"`` is not ``True``); a
timeout of ``math.inf`` (or longer than any lock can wait) means no limit, normalised to ``None``.
Through ``ResidencyManager(...)`` the model is left untouched: same module types, parameter names
and bits.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ltx2_residency import (
    ConfigError,
    LoRASpec,
    MergePolicyName,
    ResidencyError,
    ResidencyManager,
    ResidencyMode,
    WeightState,
)
from ltx2_residency.errors import OptionError
from ltx2_residency.faults import FaultInjector
from ltx2_residency.options import ManagerOptions, checked_timeout, manager_options
from ltx2_residency.testing import synthetic_lora
from strategies import bad_timeouts, huge_ints, not_bools, unlimited_timeouts
from untouched import assert_model_untouched, snapshot

NAN, INF = float("nan"), float("inf")
FLAGS = ("native_ltx23", "check_layers", "strict")
OPTIONAL_FLAGS = ("low_vram", "overlap_restore")

BAD = [
    ("mode", 1), ("mode", None), ("mode", "turbo"), ("mode", b"original"),
    ("loras", "user.safetensors"), ("loras", None), ("loras", iter(())), ("loras", [object()]),
    ("merge_policy", 1), ("merge_policy", None), ("merge_policy", "often"),
    ("native_ltx23", 1.0), ("native_ltx23", "yes"), ("native_ltx23", None),
    ("restore", 1), ("restore", "undo"),
    ("check_layers", "false"), ("check_layers", 0),
    ("strict", "no"), ("strict", None), ("strict", 1),
    ("verify", True), ("verify", "sometimes"),
    ("clean_source", False), ("clean_source", "host"),
    ("request_timeout", NAN), ("request_timeout", 0), ("request_timeout", -1.0), ("request_timeout", -INF),
    ("request_timeout", True), ("request_timeout", "5"),
    ("trace_maxlen", 0), ("trace_maxlen", -1), ("trace_maxlen", True), ("trace_maxlen", 10.0),
    ("trace_maxlen", "10"), ("trace_maxlen", 2**64),
    ("faults", object()), ("faults", "faults"), ("faults", FaultInjector),
    ("low_vram", "yes"), ("low_vram", 0),
    ("activation_reserve_gib", -1), ("activation_reserve_gib", NAN), ("activation_reserve_gib", INF),
    ("activation_reserve_gib", True), ("activation_reserve_gib", "16"), ("activation_reserve_gib", 1e300),
    ("activation_reserve_gib", 10**400),
    ("overlap_restore", 1), ("overlap_restore", "auto"),
    ("dynamic_forward", None), ("dynamic_forward", "triton"),
]


def _id(arg: str, value: Any) -> str:
    text = repr(value) if isinstance(value, (str, bytes, int, float, type(None))) else type(value).__name__
    return f"{arg}={text}"[:40]  # no object address: ids stay the same from run to run


BAD_IDS = [_id(a, v) for a, v in BAD]


def _refused(arg: str, call: Any) -> OptionError:
    with pytest.raises(OptionError) as exc:
        call()
    err = exc.value
    assert isinstance(err, ConfigError) and isinstance(err, ResidencyError) and isinstance(err, ValueError)
    assert err.argument == arg
    assert arg in str(err), f"the message does not name {arg!r}: {err}"
    return err


# ---------------------------------------------------------------------------------- manager_options
@pytest.mark.parametrize(("arg", "value"), BAD, ids=BAD_IDS)
def test_a_bad_option_is_refused_naming_it(arg: str, value: Any) -> None:
    _refused(arg, lambda: manager_options(**{arg: value}))


@pytest.mark.parametrize("arg", FLAGS + OPTIONAL_FLAGS)
@given(value=not_bools)
def test_flags_are_never_read_for_their_truthiness(arg: str, value: Any) -> None:
    err = _refused(arg, lambda: manager_options(**{arg: value}))
    assert f"pass {arg}=True or {arg}=False" in str(err)


@pytest.mark.parametrize("arg", FLAGS + OPTIONAL_FLAGS)
@pytest.mark.parametrize("value", [True, False])
def test_flags_keep_their_bool(arg: str, value: bool) -> None:
    assert getattr(manager_options(**{arg: value}), arg) is value


@pytest.mark.parametrize("arg", OPTIONAL_FLAGS)
def test_optional_flags_take_none_for_auto(arg: str) -> None:
    assert getattr(manager_options(**{arg: None}), arg) is None


@given(value=st.one_of(bad_timeouts, st.just(0), st.just(0.0)))
def test_request_timeout_must_be_positive(value: Any) -> None:
    _refused("request_timeout", lambda: manager_options(request_timeout=value))


@given(value=unlimited_timeouts)
def test_request_timeout_beyond_any_wait_means_no_limit(value: Any) -> None:
    assert manager_options(request_timeout=value).request_timeout is None


@pytest.mark.parametrize(("value", "seconds"), [(None, None), (5, 5.0), (2.5, 2.5), (1e-3, 1e-3)])
def test_request_timeout_in_seconds(value: Any, seconds: float | None) -> None:
    got = manager_options(request_timeout=value).request_timeout
    assert got == seconds and (got is None or type(got) is float)


@given(value=huge_ints)
def test_numbers_beyond_float_range_raise_no_overflow_error(value: int) -> None:
    _refused("activation_reserve_gib", lambda: manager_options(activation_reserve_gib=value))
    if value < 0:
        _refused("request_timeout", lambda: manager_options(request_timeout=value))
    else:
        assert manager_options(request_timeout=value).request_timeout is None


@pytest.mark.parametrize(("value", "gib"), [(0, 0.0), (16, 16.0), (0.5, 0.5)])
def test_activation_reserve_gib(value: Any, gib: float) -> None:
    got = manager_options(activation_reserve_gib=value).activation_reserve_gib
    assert got == gib and type(got) is float


@pytest.mark.parametrize("value", [1, 256, 10_000])
def test_trace_maxlen(value: int) -> None:
    assert manager_options(trace_maxlen=value).trace_maxlen == value


@pytest.mark.parametrize(("value", "mode"), [
    ("auto", "auto"), (" AUTO ", "auto"), ("original", ResidencyMode.ORIGINAL), (" Snapshot ", ResidencyMode.SNAPSHOT),
    (ResidencyMode.RESIDENT, ResidencyMode.RESIDENT),
])
def test_mode_is_a_residency_mode_or_auto(value: Any, mode: Any) -> None:
    options = manager_options(mode=value)
    assert options.mode == mode and options.auto == (mode == "auto")
    assert mode == "auto" or options.mode is mode


def test_settings_are_normalised() -> None:
    faults = FaultInjector()
    options = manager_options(merge_policy=" MERGE ", restore=" Recompute ", verify="ALWAYS", clean_source=None,
                              dynamic_forward=" PEFT ", faults=faults)
    assert options.merge_policy is MergePolicyName.MERGE
    assert (options.restore, options.verify, options.clean_source, options.dynamic_forward) == (
        "recompute", "always", None, "peft")
    assert options.faults is faults


def test_loras_become_a_tuple_of_unique_specs() -> None:
    a, b = LoRASpec("a", tensors={}), LoRASpec("b", tensors={})
    assert manager_options(loras=[a, b]).loras == (a, b)
    assert manager_options(loras=(a,)).loras == (a,)
    err = _refused("loras", lambda: manager_options(loras=[a, LoRASpec("a", tensors={})]))
    assert "LoRA names must be unique; repeated: a" in str(err)
    assert "loras=[spec]" in str(_refused("loras", lambda: manager_options(loras=a)))


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        manager_options().strict = False  # type: ignore[misc]


def test_fields_and_defaults_are_the_constructor_keywords() -> None:
    params = dict(inspect.signature(ResidencyManager.__init__).parameters)
    del params["self"], params["transformer"]
    assert [f.name for f in dataclasses.fields(ManagerOptions)] == list(params)
    assert manager_options(**{n: p.default for n, p in params.items()}) == ManagerOptions() == manager_options()


def test_option_error_survives_pickling() -> None:
    # serving engines hand errors across processes
    err = _refused("strict", lambda: manager_options(strict="no"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is OptionError and back.argument == "strict" and str(back) == str(err)


# ---------------------------------------------------------------------------------- checked_timeout
@given(value=bad_timeouts)
def test_a_bad_call_timeout_is_refused_naming_the_call(value: Any) -> None:
    _refused("request(timeout=)", lambda: checked_timeout(value, "request(timeout=)"))


@given(value=unlimited_timeouts)
def test_a_call_timeout_beyond_any_wait_means_no_limit(value: Any) -> None:
    assert checked_timeout(value, "repair(timeout=)") is None


@pytest.mark.parametrize(("value", "seconds"), [(None, None), (0, 0.0), (0.25, 0.25), (3, 3.0)])
def test_a_call_timeout_in_seconds(value: Any, seconds: float | None) -> None:
    # 0 takes the DiT only if it is free now
    assert checked_timeout(value, "synchronize(timeout=)") == seconds


# ------------------------------------------------------------------------- through ResidencyManager
@pytest.fixture(scope="module")
def lora(base_model: nn.Module, block_linears: list[str]) -> dict:
    return synthetic_lora(base_model, block_linears[:2], rank=2, seed=3)


@pytest.mark.parametrize(("arg", "value"), BAD, ids=BAD_IDS)
def test_the_manager_refuses_a_bad_option_untouched(arg: str, value: Any, model: nn.Module, lora: dict) -> None:
    kwargs = {"loras": [LoRASpec("user", tensors=lora)], arg: value}
    before = snapshot(model)
    _refused(arg, lambda: ResidencyManager(model, **kwargs))
    assert_model_untouched(before, model)


def test_the_manager_waits_without_limit_for_an_infinite_timeout(model: nn.Module, lora: dict) -> None:
    mgr = ResidencyManager(model, loras=[LoRASpec("user", tensors=lora)], request_timeout=math.inf)
    assert mgr.request_timeout is None
    with mgr.request(timeout=math.inf) as req:
        req.enter("stage1")
    assert mgr.state is WeightState.CLEAN


CALLS = ["request", "verify_clean", "repair", "synchronize"]
_HANG_GUARD_S = 2.0


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("value", [NAN, -1.0, True, "5"], ids=repr)
def test_a_bad_call_timeout_is_refused_before_the_dit_is_taken(call: str, value: Any, model: nn.Module,
                                                                lora: dict) -> None:
    mgr = ResidencyManager(model, loras=[LoRASpec("user", tensors=lora)])
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:  # another thread owns the DiT: a checked timeout is refused, not waited on
        with mgr.request():
            held.set()
            # only an unchecked timeout waits here (NaN would spin for ever): let go in the end, so
            # that such a call fails the test instead of hanging it
            release.wait(_HANG_GUARD_S)

    owner = threading.Thread(target=hold)
    owner.start()
    held.wait()
    try:
        method = getattr(mgr, call)

        def run() -> None:
            result = method(timeout=value)
            if call == "request":
                with result:
                    pass

        _refused(f"{call}(timeout=)", run)
    finally:
        release.set()
        owner.join()
    assert mgr.state is WeightState.CLEAN
