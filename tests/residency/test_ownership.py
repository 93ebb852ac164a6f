"""Ownership of the shared DiT under interrupts: a Ctrl-C while waiting for the DiT, the per-call
timeouts (checked, never an OverflowError or an endless wait), and the release that an
interrupted cleanup still performs."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch

from ltx2_residency import (
    ConfigError,
    LoRASpec,
    RequestStateError,
    RequestTimeoutError,
    ResidencyManager,
    WeightState,
)
from ltx2_residency.ownership import Ownership

STRENGTHS = {"stage1": 0.0, "stage2": 1.0}


def make(model, path) -> ResidencyManager:
    return ResidencyManager(model, loras=[LoRASpec("distilled", path, STRENGTHS)], merge_policy="merge")


def test_ctrl_c_while_waiting_for_the_dit_loses_nothing(model, distilled_path) -> None:
    """The main thread waits for a DiT another thread holds and is interrupted there: the holder's
    release still reaches a second waiter, and the interrupted thread can take the DiT afterwards."""
    mgr = make(model, distilled_path)
    held, release, second_has_it = threading.Event(), threading.Event(), threading.Event()

    def holder() -> None:
        with mgr.request():
            held.set()
            release.wait(30)

    def second_waiter() -> None:
        with mgr.request(timeout=30):
            second_has_it.set()

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert held.wait(30)
    threads.append(threading.Thread(target=second_waiter))
    threads[1].start()
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    timer = threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        with mgr.request(timeout=30):
            pytest.fail("the DiT is held by another request")
    release.set()
    assert second_has_it.wait(30), "the release never reached the other waiter"
    for t in threads:
        t.join(30)
    with torch.no_grad(), mgr.request(timeout=1) as req:  # the interrupted thread: not left owning anything
        req.enter("stage1")
    assert mgr.state is WeightState.CLEAN


@pytest.mark.parametrize("timeout", [math.nan, -1.0, "5", True])
def test_a_bad_timeout_is_a_typed_error_naming_the_call(model, distilled_path, timeout) -> None:
    mgr = make(model, distilled_path)
    for call, name in ((lambda: mgr.request(timeout=timeout), "request"),
                       (lambda: mgr.verify_clean(timeout=timeout), "verify_clean"),
                       (lambda: mgr.repair(timeout=timeout), "repair"),
                       (lambda: mgr.synchronize(timeout=timeout), "synchronize")):
        with pytest.raises(ConfigError, match=name):
            call()
    with mgr.request(timeout=1):  # nothing was taken
        pass


def test_an_unlimited_timeout_waits_and_zero_only_takes_a_free_dit(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    with mgr.request(timeout=math.inf) as req:  # inf: no OverflowError, no limit
        assert req.id
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with mgr.request():
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    with pytest.raises(RequestTimeoutError):
        mgr.request(timeout=0).__enter__()
    release.set()
    t.join(30)
    with mgr.request(timeout=0):
        pass


def test_release_is_idempotent_and_only_the_owners() -> None:
    own = Ownership()
    own.acquire(1, "test")
    assert own.mine
    done = threading.Event()

    def other() -> None:
        own.release_mine()  # not the owner: a no-op
        done.set()

    threading.Thread(target=other).start()
    assert done.wait(30)
    assert own.mine
    own.release_mine()
    own.release_mine()
    assert not own.mine
    with own.held(1, "test"):
        assert own.mine
    assert not own.mine


def test_a_real_ctrl_c_during_the_cleanup_is_held_until_the_cleanup_is_done(model, distilled_path,
                                                                           monkeypatch) -> None:
    """A SIGINT that arrives while the request's undo runs (on the main thread) cannot cut it, nor
    fall between two cleanup steps: it is delivered once the DiT is CLEAN and free."""
    from ltx2_residency.ops.merge import MergeStack

    mgr = make(model, distilled_path)
    clean = {n: w.clone() for n, w in mgr.managed_weights.items()}
    pop_all = MergeStack.pop_all

    def interrupted_pop_all(self, *args, **kw):
        signal.raise_signal(signal.SIGINT)  # the handler runs at the next bytecode, inside the undo
        return pop_all(self, *args, **kw)

    monkeypatch.setattr(MergeStack, "pop_all", interrupted_pop_all)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), mgr.request() as req:
        req.enter("stage1")
        req.enter("stage2")
    assert signal.getsignal(signal.SIGINT) is before
    assert mgr.state is WeightState.CLEAN
    assert all(torch.equal(clean[n], w) for n, w in mgr.managed_weights.items())
    monkeypatch.setattr(MergeStack, "pop_all", pop_all)
    with mgr.request(timeout=0):
        pass


def test_a_request_scope_is_left_only_by_its_with_block(model, distilled_path) -> None:
    mgr = make(model, distilled_path)
    scope = mgr.request()
    with scope as req:
        req.enter("stage1")
        for take_out in (scope.pop_all, scope.close):
            with pytest.raises(RequestStateError):
                take_out()
    assert mgr.state is WeightState.CLEAN
    with mgr.request(timeout=0):
        pass
