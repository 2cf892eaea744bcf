"""The config keys as a user meets them on the command line: listed with their types,
defaults and comments (for `--help`), suggested when mistyped, and accepted in the three
spellings other tools taught (`train.lr=3e-3`, nanoGPT's `--train.lr=3e-3`, litgpt's
`--train.lr 3e-3`).

The reference is read from the schema itself: each section's fields, with their
annotation, default and their own help text (`setting(default, "help")`, declared by the
room that owns the section), so the help can never drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import textwrap
from dataclasses import dataclass

from pipeline import config as schema
from pipeline.config import nearest_keys  # noqa: F401 (the did-you-mean the schema owns)
from pipeline.core.schema import field_help


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. train.lr
    type: str  # the annotation as written, e.g. Optional[int]
    default: str  # as YAML would print it
    comment: str


@functools.lru_cache(maxsize=1)
def key_reference() -> tuple[KeyDoc, ...]:
    """Every leaf key of the schema, in schema order."""
    return tuple(_walk(schema.Config, ""))


def _walk(cls, prefix: str):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _walk(type(default), f"{prefix}{f.name}.")
            continue
        yield KeyDoc(f"{prefix}{f.name}", str(f.type), _show(default), field_help(f))


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def help_text(width: int = 100) -> str:
    """The key reference as --help prints it: one entry per key, grouped by section."""
    lines, section = ["config keys (YAML, or overrides key=value, --key=value, --key value):"], None
    for doc in key_reference():
        head = doc.key.rsplit(".", 1)[0] if "." in doc.key else ""
        if head != section:
            section = head
            lines.append(f"\n  {section or '(top level)'}")
        lines.append(f"    {doc.key}: {doc.type} = {doc.default}")
        if doc.comment:
            lines += textwrap.wrap(
                doc.comment, width=width, initial_indent=" " * 8, subsequent_indent=" " * 8
            )
    return "\n".join(lines)


def normalize_overrides(argv: list[str]) -> list[str]:
    """`--a.b=c` and `--a.b c` as `a.b=c`, for any schema key; every other argument (a
    stage's own flags such as --config or --force, a plain `a.b=c`) is left as it is."""
    keys = {doc.key for doc in key_reference()} | _section_names()
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg[2:].partition("=")
        if arg.startswith("--") and (name in keys or name.split(".")[0] in _section_names()):
            if sep:
                out.append(f"{name}={value}")
            elif i + 1 < len(argv):
                out.append(f"{name}={argv[i + 1]}")
                i += 1
            else:
                out.append(f"{name}=")  # refused with the usual message: no value
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


@functools.lru_cache(maxsize=1)
def _section_names() -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(schema.Config)
        if f.default_factory is not dataclasses.MISSING
    )


def add_config_arguments(
    parser: argparse.ArgumentParser,
    config_default: str | None = None,
    config_help: str = "experiment YAML (configs/*.yaml; default: the schema's defaults)",
) -> None:
    """--config and the overrides, with every key listed after the stage's own options."""
    parser.add_argument("--config", default=config_default, help=config_help)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, also as --key=value or --key value "
        "(e.g. --train.lr 3e-3); the keys are listed below",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_text()


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A stage's arguments, its overrides in any of the three spellings and anywhere
    among its options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parser.parse_intermixed_args(normalize_overrides(argv))
