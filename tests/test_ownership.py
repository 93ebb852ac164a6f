"""Ownership of the shared DiT under interrupts: a Ctrl-C while waiting for the DiT, the per-call
timeouts (checked, never an OverflowError or an endless wait), and the release that an
interrupted cleanup still performs."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch

from ltx2_residency import ConfigError, LoRASpec, RequestTimeoutError, ResidencyManager, WeightState
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
