"""What a config section is: a dataclass whose fields carry their own documentation and
which checks itself where it is declared.

Each room declares its section beside the code that reads it (data/config.py,
model/config.py, training/config.py); pipeline/config composes them. A field is
`setting(default, "what it means")`: the text --help prints is the field's own. A
section's `__post_init__` checks its values with `self.require(...)`, and the message
names the full key as the user wrote it (`model.n_heads`, or
`data.sources[1].source.max_bytes` for the same field in a mixture), because the loader
tells the section where it sits (`located`) while building it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

from pipeline.core.errors import PipelineError

HELP = "help"


class ConfigError(PipelineError):
    """A config file, override or option that does not fit the schema."""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    metavar: str = "",
    default_factory: Any = dataclasses.MISSING,
):
    """A documented field: its default (or default_factory) and what it means."""
    meta = {HELP: help, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get(HELP, "")


def require(ok: bool, key: str, value, allowed: str) -> None:
    """ConfigError naming the key, the value and what is allowed, unless ok."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("where", default=None)


@contextlib.contextmanager
def located(where: str):
    """Sections built inside name their keys under `where` (e.g. "data.sources[0].source.")."""
    token = _WHERE.set(where)
    try:
        yield
    finally:
        _WHERE.reset(token)


class Section:
    """Base of a config section. SECTION is its usual place ("model."); a section built
    by the loader somewhere else (a mixture's sources) learns that place from it."""

    SECTION = ""

    def key(self, name: str) -> str:
        where = _WHERE.get()
        return (self.SECTION if where is None else where) + name

    def require(self, ok: bool, name: str, allowed: str) -> None:
        require(ok, self.key(name), getattr(self, name), allowed)

    def require_positive(self, *names: str, nullable: str = "") -> None:
        """Each of `names` a positive number; `nullable`: null is allowed too, and means
        this (e.g. "null for all")."""
        for name in names:
            value = getattr(self, name)
            self.require(
                (bool(nullable) and value is None) or (value is not None and value > 0),
                name,
                "a positive count" + (f", or {nullable}" if nullable else ""),
            )
