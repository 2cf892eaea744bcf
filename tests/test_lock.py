"""`make install` installs exactly the lock: the venv the suite runs in holds every
package of requirements/ at its locked version, and nothing else (but torch, pinned by
the Makefile, the project itself and pip)."""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
NOT_IN_A_LOCK_FILE = {"torch", "gpt-pipeline", "pip"}

pytestmark = pytest.mark.skipif(
    os.environ.get("GPT_PIPELINE_UNLOCKED") == "1" or Path(sys.prefix) != ROOT / ".venv",
    reason="the suite runs outside the locked .venv (make test-latest, or another env)",
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    """name -> version of a `uv pip compile` output (`name==version \\` lines)."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", path.read_text(), re.M)
    return {normalize(name): version for name, version in pins}


def installed() -> dict[str, str]:
    """What the venv holds: its site-packages only. sys.path is not it: importing setuptools
    (torch's compile does) appends setuptools/_vendor, whose dist-info directories would
    read as installed packages in whichever test process imported it first."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}


def the_lock() -> dict[str, str]:
    machine = "cpu" if "+cpu" in metadata.version("torch") else "cuda"
    pins = {}
    for name in (f"lock-{machine}.txt", "uv.txt", "book.txt"):
        pins.update(locked(REQUIREMENTS / name))
    return pins


def test_every_locked_package_is_installed_at_its_version():
    have = installed()
    wrong = {
        name: (version, have.get(name))
        for name, version in the_lock().items()
        if have.get(name) != version
    }
    assert not wrong, f"locked (want, have): {wrong}; run `make install`"


def test_nothing_outside_the_lock_is_installed():
    extra = set(installed()) - set(the_lock()) - NOT_IN_A_LOCK_FILE
    assert not extra, f"installed but not locked: {sorted(extra)}"


def test_torch_is_the_version_the_makefile_pins():
    pinned = re.search(r"^TORCH_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert metadata.version("torch").split("+")[0] == pinned
