"""A network guard for tests that must provably never reach a hub.

Import both fixtures into a test module (``from offline import assert_offline, no_network``):
internet connections fail as they would offline, every attempt is recorded, and each test
fails afterwards if any was made (a library may swallow the OSError and fall back quietly).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

_ATTEMPTS: list[Any] = []


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _ATTEMPTS.append(address)
            raise OSError(f"network blocked by the test suite: {address!r}")
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded)
        yield


@pytest.fixture(autouse=True)
def assert_offline() -> Iterator[None]:
    _ATTEMPTS.clear()
    yield
    assert _ATTEMPTS == [], f"network access attempted: {_ATTEMPTS}"
