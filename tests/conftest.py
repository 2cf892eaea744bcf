"""Shared test fixtures."""

import os
import socket
import subprocess
import sys

import pytest


def pytest_configure(config):
    """Under pytest-xdist (make test: one worker per core), each worker's in-process torch
    gets its share of the cores instead of all of them, so workers do not oversubscribe
    the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def free_port():
    """A function returning a TCP port free on 127.0.0.1 now: multi-process tests that
    pick fixed ports collide with each other and with ports still in TIME_WAIT."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture
def stand_in_venv(tmp_path):
    """A stand-in for the venv `make install` makes: its python is this one and its
    install stamp is fresh, so make resolves paths without installing anything."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    (venv / ".installed").touch()
    return venv


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, where the machine lets the tests mount one (root on Linux): a real
    ENOSPC, not a simulated one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        # Mounting needs root (CAP_SYS_ADMIN): a user's machine without it cannot run the
        # test. Where the tests run as root, a failed mount is a real failure, not a skip.
        assert os.geteuid() != 0, f"mount failed as root: {done.stderr.decode().strip()}"
        pytest.skip(f"mounting a tmpfs needs root ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """About 300k tokens of the standard library, prepared by the prepare stage once for
    the whole run of the suite (tests/train_runs.py): the root holding data.name=stdlib."""
    from train_runs import shared_stdlib

    return shared_stdlib(tmp_path_factory)
