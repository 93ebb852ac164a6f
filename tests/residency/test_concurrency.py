"""Many threads on one manager: requests serialise, phases never interleave, waits are bounded
with clear errors, and nothing deadlocks (every thread is joined with a deadline)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from ltx2_residency import (
    ForwardGuardError,
    LoRASpec,
    RequestStateError,
    RequestTimeoutError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.testing import weight_bits
from untouched import assert_same_bits

DEADLINE = 120.0


def _manager(model, path, policy="merge") -> ResidencyManager:
    return ResidencyManager(model, loras=[LoRASpec("distilled", path, {"stage1": 0.25, "stage2": 1.0})],
                            merge_policy=policy, request_timeout=DEADLINE)


def _join_all(threads: list[threading.Thread]) -> None:
    end = time.monotonic() + DEADLINE
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running (deadlock?): {alive}"


@pytest.mark.parametrize("policy", ["merge", "dynamic"])
def test_many_threads_serialise_and_never_interleave(fresh_model, distilled_path, inputs, policy) -> None:
    model = fresh_model()
    mgr = _manager(model, distilled_path, policy)
    clean = weight_bits(mgr.managed_weights)
    owners: list[int] = []
    events: list[tuple[int, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rng = random.Random(k)
        try:
            for _ in range(3):
                with torch.no_grad(), mgr.request() as req:
                    with lock:
                        owners.append(k)
                        assert len(owners) == 1, f"two owners at once: {owners}"
                        events.append((k, "open"))
                    req.enter("stage1", strengths={"distilled": rng.choice([0.0, 0.25])})(**inputs)
                    events.append((k, "stage1"))
                    time.sleep(rng.random() * 0.002)
                    req.enter("stage2", strengths={"distilled": rng.choice([0.5, 1.0])})(**inputs)
                    events.append((k, "stage2"))
                    with lock:
                        owners.remove(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,), name=f"w{k}") for k in range(6)]
    for t in threads:
        t.start()
    _join_all(threads)
    assert not errors, errors
    assert len(events) == 6 * 3 * 3
    for i in range(0, len(events), 3):  # each request's three events are contiguous
        k = events[i][0]
        assert events[i:i + 3] == [(k, "open"), (k, "stage1"), (k, "stage2")]
    assert mgr.state is WeightState.CLEAN
    assert_same_bits(clean, weight_bits(mgr.managed_weights))


def test_waits_are_bounded_and_then_proceed(fresh_model, distilled_path) -> None:
    mgr = _manager(fresh_model(), distilled_path)
    holding, release = threading.Event(), threading.Event()
    outcomes: dict[str, str] = {}

    def holder() -> None:
        with mgr.request() as req:
            req.enter("stage1")
            holding.set()
            release.wait(DEADLINE)

    def impatient(name: str, timeout: float) -> None:
        try:
            with mgr.request(timeout=timeout):
                outcomes[name] = "served"
        except RequestTimeoutError as exc:
            outcomes[name] = str(exc)

    h = threading.Thread(target=holder, name="holder")
    h.start()
    assert holding.wait(DEADLINE)
    short = [threading.Thread(target=impatient, args=(f"s{i}", 0.05), name=f"s{i}") for i in range(3)]
    patient = threading.Thread(target=impatient, args=("patient", DEADLINE), name="patient")
    for t in [*short, patient]:
        t.start()
    _join_all(short)
    for i in range(3):
        assert "waited 0.05 s for the shared DiT" in outcomes[f"s{i}"]
        assert "raise request_timeout" in outcomes[f"s{i}"]
    assert "patient" not in outcomes  # still waiting, not failed
    release.set()
    _join_all([h, patient])
    assert outcomes["patient"] == "served"
    assert mgr.state is WeightState.CLEAN


def test_other_threads_cannot_run_or_steer_the_owners_dit(fresh_model, distilled_path, inputs) -> None:
    model = fresh_model()
    mgr = _manager(model, distilled_path, "dynamic")
    seen: dict[str, BaseException | None] = {}
    with torch.no_grad(), mgr.request() as req:
        req.enter("stage1")

        def intruder() -> None:
            for what, fn in (("forward", lambda: model(**inputs)),
                             ("enter", lambda: req.enter("stage2"))):
                try:
                    with torch.no_grad():
                        fn()
                    seen[what] = None
                except BaseException as exc:
                    seen[what] = exc

        t = threading.Thread(target=intruder)
        t.start()
        _join_all([t])
        model(**inputs)  # the owner still runs its phase
    assert isinstance(seen["forward"], ForwardGuardError)
    assert isinstance(seen["enter"], RequestStateError)
    assert "another thread" in str(seen["enter"])


def test_verify_from_another_thread_waits_for_the_request(fresh_model, distilled_path) -> None:
    mgr = _manager(fresh_model(), distilled_path)
    inside, done = threading.Event(), threading.Event()
    order: list[str] = []

    def verifier() -> None:
        inside.wait(DEADLINE)
        mgr.verify_clean(timeout=DEADLINE)  # must wait: the weights are merged right now
        order.append("verified")
        done.set()

    t = threading.Thread(target=verifier)
    t.start()
    with mgr.request() as req:
        req.enter("stage1")
        assert mgr.state is WeightState.STAGE1_MERGED
        inside.set()
        time.sleep(0.05)
        order.append("request done")
    _join_all([t])
    assert order == ["request done", "verified"]


def test_an_interrupted_thread_does_not_block_the_others(fresh_model, distilled_path, inputs) -> None:
    mgr = _manager(fresh_model(), distilled_path)
    results: list[str] = []

    def interrupted() -> None:
        try:
            with torch.no_grad(), mgr.request() as req:
                req.enter("stage1")
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            results.append("interrupted")

    def normal() -> None:
        with torch.no_grad(), mgr.request() as req:
            req.enter("stage1")(**inputs)
            req.enter("stage2")(**inputs)
        results.append("served")

    threads = [threading.Thread(target=interrupted), *(threading.Thread(target=normal) for _ in range(3))]
    for t in threads:
        t.start()
    _join_all(threads)
    assert sorted(results) == ["interrupted", "served", "served", "served"]
    assert mgr.state is WeightState.CLEAN
