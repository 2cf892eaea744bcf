"""Shared test fixtures."""
import socket

import pytest


@pytest.fixture
def free_port():
    """A function returning a TCP port free on 127.0.0.1 now: multi-process tests that
    pick fixed ports collide with each other and with ports still in TIME_WAIT."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return pick
