"""The manager's options: every field of :class:`ManagerOptions` is checked when the options are
built, the manager's own arguments (``mode``, ``loras``, ``merge_policy``) by
``options.checked_arguments`` and every per-call ``timeout=`` by ``options.checked_timeout``.

Contract under test: a bad value raises :class:`OptionError` (a ``ConfigError``, so a
``ResidencyError`` and a ``ValueError``) whose ``argument`` and message name the field or argument; a
value of the wrong type is refused, never taken for its truthiness (``strict="no"`` is not ``True``);
a timeout of ``math.inf`` (or longer than any lock can wait) means no limit, normalised to ``None``.
``ResidencyManager(transformer, mode, loras, merge_policy, *, options=None, **keywords)`` takes the
0.1 keywords (every field, and ``restore=`` for ``exact_kernel``) with a ``DeprecationWarning``,
applied on top of ``options``; an unknown keyword or an ``options`` that is not a ``ManagerOptions``
is an ``OptionError``. Whenever ``ResidencyManager(...)`` refuses, the model is left untouched: same
module types, parameter names and bits.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import threading
import warnings
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ltx2_residency import (
    ConfigError,
    LoRASpec,
    ManagerOptions,
    MergePolicyName,
    ResidencyError,
    ResidencyManager,
    ResidencyMode,
    WeightState,
)
from ltx2_residency.errors import OptionError
from ltx2_residency.faults import FaultInjector
from ltx2_residency.options import checked_arguments, checked_timeout
from ltx2_residency.testing import synthetic_lora
from strategies import bad_timeouts, huge_ints, not_bools, unlimited_timeouts
from untouched import assert_model_untouched, snapshot

NAN, INF = float("nan"), float("inf")
FLAGS = ("native_ltx23", "check_layers", "strict")
OPTIONAL_FLAGS = ("low_vram", "overlap_restore")
#: the manager's own arguments, valid: each BAD_ARGUMENTS case replaces one
GOOD_ARGUMENTS: dict[str, Any] = {"mode": "original", "loras": (), "merge_policy": "sglang"}
#: 0.1 keywords that are not a field's name, by the field they set
RENAMED = {"restore": "exact_kernel"}

BAD_ARGUMENTS = [
    ("mode", 1), ("mode", None), ("mode", "turbo"), ("mode", b"original"),
    ("loras", "user.safetensors"), ("loras", None), ("loras", iter(())), ("loras", [object()]),
    ("merge_policy", 1), ("merge_policy", None), ("merge_policy", "often"),
]
BAD_OPTIONS = [
    ("native_ltx23", 1.0), ("native_ltx23", "yes"), ("native_ltx23", None),
    ("exact_kernel", 1), ("exact_kernel", "undo"),
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
    ("lora_slot_rank", 0), ("lora_slot_rank", True), ("lora_slot_rank", 8.0),
    ("device_lora_cache_bytes", -1), ("device_lora_cache_bytes", 1.5), ("device_lora_cache_bytes", "1GB"),
    ("host_lora_cache_bytes", None), ("host_lora_cache_bytes", -1), ("host_lora_cache_bytes", 2**64),
    ("collective_timeout", 0), ("collective_timeout", -1), ("collective_timeout", NAN), ("collective_timeout", "5"),
    ("collective_timeout", True),
]
#: the deprecated keyword path: every bad option, and the 0.1 name of ``exact_kernel``
BAD_LEGACY_KEYWORDS = [*BAD_OPTIONS, ("restore", 1), ("restore", "undo")]

#: a valid value, other than the default, for every field (strings not yet normalised)
LEGACY_VALUES: dict[str, Any] = {
    "native_ltx23": True, "exact_kernel": " Recompute ", "check_layers": True, "strict": False,
    "verify": "ALWAYS", "clean_source": None, "request_timeout": 5, "trace_maxlen": 7, "faults": FaultInjector(),
    "low_vram": True, "activation_reserve_gib": 2, "overlap_restore": False, "dynamic_forward": " PEFT ",
    "lora_slot_rank": 16, "device_lora_cache_bytes": 0, "host_lora_cache_bytes": 2**20, "collective_timeout": 30,
}


def _id(arg: str, value: Any) -> str:
    text = repr(value) if isinstance(value, (str, bytes, int, float, type(None))) else type(value).__name__
    return f"{arg}={text}"[:40]  # no object address: ids stay the same from run to run


def _ids(cases: list[tuple[str, Any]]) -> list[str]:
    return [_id(a, v) for a, v in cases]


def _refused(arg: str, call: Any) -> OptionError:
    with pytest.raises(OptionError) as exc:
        call()
    err = exc.value
    assert isinstance(err, ConfigError) and isinstance(err, ResidencyError) and isinstance(err, ValueError)
    assert err.argument == arg
    assert arg in str(err), f"the message does not name {arg!r}: {err}"
    return err


def _deprecations(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, DeprecationWarning)]


# ---------------------------------------------------------------------------------- ManagerOptions
@pytest.mark.parametrize(("arg", "value"), BAD_OPTIONS, ids=_ids(BAD_OPTIONS))
def test_a_bad_option_is_refused_naming_it(arg: str, value: Any) -> None:
    _refused(arg, lambda: ManagerOptions(**{arg: value}))


@pytest.mark.parametrize(("arg", "value"), [("strict", "no"), ("exact_kernel", "undo"), ("trace_maxlen", 0)])
def test_a_replaced_option_is_checked_again(arg: str, value: Any) -> None:
    # dataclasses.replace builds new options: they are checked like any others
    _refused(arg, lambda: dataclasses.replace(ManagerOptions(), **{arg: value}))


@pytest.mark.parametrize("arg", FLAGS + OPTIONAL_FLAGS)
@given(value=not_bools)
def test_flags_are_never_read_for_their_truthiness(arg: str, value: Any) -> None:
    err = _refused(arg, lambda: ManagerOptions(**{arg: value}))
    assert f"pass {arg}=True or {arg}=False" in str(err)


@pytest.mark.parametrize("arg", FLAGS + OPTIONAL_FLAGS)
@pytest.mark.parametrize("value", [True, False])
def test_flags_keep_their_bool(arg: str, value: bool) -> None:
    assert getattr(ManagerOptions(**{arg: value}), arg) is value


@pytest.mark.parametrize("arg", OPTIONAL_FLAGS)
def test_optional_flags_take_none_for_auto(arg: str) -> None:
    assert getattr(ManagerOptions(**{arg: None}), arg) is None


@given(value=st.one_of(bad_timeouts, st.just(0), st.just(0.0)))
def test_request_timeout_must_be_positive(value: Any) -> None:
    _refused("request_timeout", lambda: ManagerOptions(request_timeout=value))


@given(value=unlimited_timeouts)
def test_request_timeout_beyond_any_wait_means_no_limit(value: Any) -> None:
    assert ManagerOptions(request_timeout=value).request_timeout is None


@pytest.mark.parametrize(("value", "seconds"), [(None, None), (5, 5.0), (2.5, 2.5), (1e-3, 1e-3)])
def test_request_timeout_in_seconds(value: Any, seconds: float | None) -> None:
    got = ManagerOptions(request_timeout=value).request_timeout
    assert got == seconds and (got is None or type(got) is float)


@given(value=huge_ints)
def test_numbers_beyond_float_range_raise_no_overflow_error(value: int) -> None:
    _refused("activation_reserve_gib", lambda: ManagerOptions(activation_reserve_gib=value))
    if value < 0:
        _refused("request_timeout", lambda: ManagerOptions(request_timeout=value))
    else:
        assert ManagerOptions(request_timeout=value).request_timeout is None


@pytest.mark.parametrize(("value", "gib"), [(0, 0.0), (16, 16.0), (0.5, 0.5)])
def test_activation_reserve_gib(value: Any, gib: float) -> None:
    got = ManagerOptions(activation_reserve_gib=value).activation_reserve_gib
    assert got == gib and type(got) is float


@pytest.mark.parametrize("value", [1, 256, 10_000])
def test_trace_maxlen(value: int) -> None:
    assert ManagerOptions(trace_maxlen=value).trace_maxlen == value


def test_settings_are_normalised() -> None:
    faults = FaultInjector()
    options = ManagerOptions(exact_kernel=" Recompute ", verify="ALWAYS", clean_source=None,  # type: ignore[arg-type]
                             dynamic_forward=" PEFT ", faults=faults)
    assert (options.exact_kernel, options.verify, options.clean_source, options.dynamic_forward) == (
        "recompute", "always", None, "peft")
    assert options.faults is faults
    assert checked_arguments("original", (), " MERGE ")[2] is MergePolicyName.MERGE


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ManagerOptions().strict = False  # type: ignore[misc]


def test_option_error_survives_pickling() -> None:
    # serving engines hand errors across processes
    err = _refused("strict", lambda: ManagerOptions(strict="no"))  # type: ignore[arg-type]
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is OptionError and back.argument == "strict" and str(back) == str(err)


# ------------------------------------------------------------------------------- checked_arguments
@pytest.mark.parametrize(("arg", "value"), BAD_ARGUMENTS, ids=_ids(BAD_ARGUMENTS))
def test_a_bad_argument_is_refused_naming_it(arg: str, value: Any) -> None:
    _refused(arg, lambda: checked_arguments(**{**GOOD_ARGUMENTS, arg: value}))


@pytest.mark.parametrize(("value", "mode"), [
    ("auto", "auto"), (" AUTO ", "auto"), ("original", ResidencyMode.ORIGINAL), (" Snapshot ", ResidencyMode.SNAPSHOT),
    (ResidencyMode.RESIDENT, ResidencyMode.RESIDENT),
])
def test_mode_is_a_residency_mode_or_auto(value: Any, mode: Any) -> None:
    got, _, _ = checked_arguments(value, (), "sglang")
    assert got == mode and (got == "auto") == (mode == "auto")
    assert mode == "auto" or got is mode


def test_loras_become_a_tuple_of_unique_specs() -> None:
    a, b = LoRASpec("a", tensors={}), LoRASpec("b", tensors={})
    assert checked_arguments("original", [a, b], "sglang")[1] == (a, b)
    assert checked_arguments("original", (a,), "sglang")[1] == (a,)
    err = _refused("loras", lambda: checked_arguments("original", [a, LoRASpec("a", tensors={})], "sglang"))
    assert "LoRA names must be unique; repeated: a" in str(err)
    assert "loras=[spec]" in str(_refused("loras", lambda: checked_arguments("original", a, "sglang")))


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


@pytest.fixture
def user(lora: dict) -> list[LoRASpec]:
    return [LoRASpec("user", tensors=lora)]


def test_the_constructor_takes_its_arguments_then_options() -> None:
    params = inspect.signature(ResidencyManager.__init__).parameters
    assert list(params) == ["self", "transformer", "mode", "loras", "merge_policy", "options", "process_group",
                            "keywords"]
    kinds = [p.kind for p in params.values()]
    assert kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 5 + [inspect.Parameter.KEYWORD_ONLY] * 2 + [
        inspect.Parameter.VAR_KEYWORD]
    assert params["options"].default is None and params["process_group"].default is None
    defaults = {name: params[name].default for name in GOOD_ARGUMENTS}
    assert checked_arguments(**defaults) == (ResidencyMode.ORIGINAL, (), MergePolicyName.SGLANG)


def test_no_options_means_the_defaults_without_a_warning(model: nn.Module, user: list[LoRASpec]) -> None:
    given_options = ManagerOptions(strict=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = ResidencyManager(model, loras=user)
        assert plain.options == ManagerOptions()
        plain.close()
        mgr = ResidencyManager(model, loras=user, options=given_options)
        assert mgr.options is given_options
        mgr.close()
    assert not [str(w.message) for w in _deprecations(caught)]


def test_every_option_field_has_a_legacy_value() -> None:
    assert list(LEGACY_VALUES) == [f.name for f in dataclasses.fields(ManagerOptions)]
    for name, value in LEGACY_VALUES.items():  # none is the default: the keyword visibly changes the options
        assert getattr(ManagerOptions(**{name: value}), name) != getattr(ManagerOptions(), name), name


@pytest.mark.parametrize("field", list(LEGACY_VALUES))
def test_every_field_is_a_deprecated_keyword(field: str, model: nn.Module, user: list[LoRASpec]) -> None:
    value = LEGACY_VALUES[field]
    with pytest.warns(DeprecationWarning, match="ManagerOptions"):
        mgr = ResidencyManager(model, loras=user, **{field: value})
    assert mgr.options == ManagerOptions(**{field: value})
    mgr.close()


def test_restore_is_the_deprecated_name_of_exact_kernel(model: nn.Module, user: list[LoRASpec]) -> None:
    with pytest.warns(DeprecationWarning, match="exact_kernel"):
        mgr = ResidencyManager(model, loras=user, restore=" Recompute ")
    assert mgr.options == ManagerOptions(exact_kernel="recompute")
    assert mgr.exact_kernel == "recompute"
    mgr.close()


def test_a_legacy_keyword_warns_once_naming_manager_options(model: nn.Module, user: list[LoRASpec]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = ResidencyManager(model, loras=user, strict=False, restore="copy")
    deprecations = _deprecations(caught)
    assert len(deprecations) == 1, [str(w.message) for w in deprecations]
    message = str(deprecations[0].message)
    assert "ManagerOptions" in message and "strict" in message and "restore" in message
    assert deprecations[0].filename == __file__  # it points at the caller, not into the package
    assert mgr.options == ManagerOptions(strict=False, exact_kernel="copy")
    mgr.close()


def test_legacy_keywords_apply_on_top_of_options(model: nn.Module, user: list[LoRASpec]) -> None:
    given_options = ManagerOptions(strict=False, request_timeout=1)
    with pytest.warns(DeprecationWarning, match="ManagerOptions"):
        mgr = ResidencyManager(model, loras=user, options=given_options, request_timeout=5, check_layers=True)
    assert mgr.options == ManagerOptions(strict=False, request_timeout=5, check_layers=True)
    assert given_options == ManagerOptions(strict=False, request_timeout=1)  # the caller's options are kept
    mgr.close()


@pytest.mark.parametrize("keyword", ["retsore", "timeout", "options_", "mode_"])
def test_an_unknown_keyword_is_refused_untouched(keyword: str, model: nn.Module, user: list[LoRASpec]) -> None:
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _refused(keyword, lambda: ResidencyManager(model, loras=user, strict=False, **{keyword: "copy"}))
    assert "ManagerOptions" in str(err) and "exact_kernel" in str(err)  # it lists what is taken
    assert not _deprecations(caught)  # refused before any keyword is taken
    assert_model_untouched(before, model)


@pytest.mark.parametrize("options", ["fast", {"strict": False}, ManagerOptions], ids=["str", "dict", "class"])
def test_options_must_be_manager_options(options: Any, model: nn.Module, user: list[LoRASpec]) -> None:
    before = snapshot(model)
    err = _refused("options", lambda: ResidencyManager(model, loras=user, options=options))
    assert "ManagerOptions" in str(err)
    assert_model_untouched(before, model)


@pytest.mark.parametrize(("arg", "value"), BAD_ARGUMENTS, ids=_ids(BAD_ARGUMENTS))
def test_the_manager_refuses_a_bad_argument_untouched(arg: str, value: Any, model: nn.Module,
                                                      user: list[LoRASpec]) -> None:
    kwargs = {"loras": user, arg: value}
    before = snapshot(model)
    _refused(arg, lambda: ResidencyManager(model, **kwargs))
    assert_model_untouched(before, model)


@pytest.mark.parametrize(("arg", "value"), BAD_OPTIONS, ids=_ids(BAD_OPTIONS))
def test_the_manager_refuses_a_bad_option_untouched(arg: str, value: Any, model: nn.Module,
                                                    user: list[LoRASpec]) -> None:
    before = snapshot(model)
    # the options are refused as they are built: the manager never sees the model
    _refused(arg, lambda: ResidencyManager(model, loras=user, options=ManagerOptions(**{arg: value})))
    assert_model_untouched(before, model)


@pytest.mark.parametrize(("arg", "value"), BAD_LEGACY_KEYWORDS, ids=_ids(BAD_LEGACY_KEYWORDS))
def test_the_manager_refuses_a_bad_legacy_keyword_untouched(arg: str, value: Any, model: nn.Module,
                                                            user: list[LoRASpec]) -> None:
    before = snapshot(model)
    with pytest.warns(DeprecationWarning, match="ManagerOptions"):
        # the error names the field the keyword sets (restore= sets exact_kernel)
        _refused(RENAMED.get(arg, arg), lambda: ResidencyManager(model, loras=user, **{arg: value}))
    assert_model_untouched(before, model)


def test_the_manager_waits_without_limit_for_an_infinite_timeout(model: nn.Module, user: list[LoRASpec]) -> None:
    mgr = ResidencyManager(model, loras=user, options=ManagerOptions(request_timeout=math.inf))
    assert mgr.options.request_timeout is None
    with mgr.request(timeout=math.inf) as req:
        req.enter("stage1")
    assert mgr.state is WeightState.CLEAN


CALLS = ["request", "verify_clean", "repair", "synchronize"]
_HANG_GUARD_S = 2.0


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("value", [NAN, -1.0, True, "5"], ids=repr)
def test_a_bad_call_timeout_is_refused_before_the_dit_is_taken(call: str, value: Any, model: nn.Module,
                                                                user: list[LoRASpec]) -> None:
    mgr = ResidencyManager(model, loras=user)
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


def test_the_0_1_names_remain_as_deprecated_aliases(model: nn.Module, user: list[LoRASpec]) -> None:
    mgr = ResidencyManager(model, loras=user, options=ManagerOptions(exact_kernel="copy"))
    with pytest.warns(DeprecationWarning, match="manager.exact_kernel"):
        assert mgr.restore == "copy"
    assert WeightState.PREMERGING is WeightState.MERGING_AHEAD and WeightState.PREMERGING.value == "merging_ahead"
    assert "PREMERGING" not in [s.name for s in WeightState]  # an alias: not a state of its own
    mgr.close()
