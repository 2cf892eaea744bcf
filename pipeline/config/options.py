"""The command line of the stages that act on a model (evaluate, export, generate), in
train's dialect.

Each of those stages declares its options once, as a dataclass whose fields carry their
own help (`setting(default, "help")`, pipeline/core/schema.py), and gets what train's keys have: `key=value`,
`--key=value` and `--key value` (dashes or underscores), `--help` generated from the
fields, did-you-mean for a mistyped key, and typed values checked before any work, the
paragraph naming the key, the value and what is allowed. Boolean keys also take
`--key` / `--no-key`; list keys take one item per mention (`--prompt a --prompt b`),
so every flag these stages had keeps working as written.

Strings are taken as typed (a prompt `yes` or `1e3` stays that text); every other value
is read as YAML and checked against the field's type, as train's overrides are.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from pipeline.config import coerce, parse_yaml
from pipeline.core.schema import ConfigError, field_help


@dataclass(frozen=True)
class Usage:
    """What a stage's --help says around its options."""

    prog: str
    description: str
    examples: str = ""


def parse_options(schema: type, argv: list[str] | None, usage: Usage):
    """`argv` as an instance of the dataclass `schema`, validated by its __post_init__.
    --help prints the generated help and exits 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(schema, usage))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    given: dict[str, Any] = {}
    args = iter(argv)
    for arg in args:
        name, value = _split(arg, fields, hints, args, usage)
        given[name] = _value(name, value, hints[name], given.get(name))
    try:
        return schema(**given)
    except TypeError as e:  # a field without a default was not given
        missing = re.findall(r"'(\w+)'", str(e))
        raise ConfigError(
            f"{usage.prog}: {_flag(missing[0]) if missing else 'an option'} "
            f"is required (--help lists the options)"
        ) from None


def _split(arg: str, fields: dict, hints: dict, rest, usage: Usage) -> tuple[str, Any]:
    """(field name, raw value) of one argument, taking the next argument as the value of
    `--key value`."""
    if arg.startswith("--"):
        key, sep, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in fields and name.startswith("no_") and _is_bool(hints.get(name[3:])):
            if sep:
                _unknown(arg, fields, usage)
            return name[3:], False
        if name not in fields:
            _unknown(arg, fields, usage)
        if sep:
            return name, value
        if _is_bool(hints[name]):
            return name, True
        value = next(rest, None)
        if value is None:
            raise ConfigError(f"{_flag(name)} needs a value ({_allowed(hints[name])})")
        return name, value
    key, sep, value = arg.partition("=")
    name = key.replace("-", "_")
    if sep and name in fields:
        return name, value
    _unknown(arg, fields, usage)
    raise AssertionError  # _unknown raises


def _value(name: str, text: Any, tp, earlier: Any):
    """The typed value of `name` from its command-line text (booleans from --key/--no-key
    arrive as bool). A list option adds one item per mention."""
    inner, optional = _unwrap(tp)
    if typing.get_origin(inner) is list:
        item_type = typing.get_args(inner)[0]
        return [*(earlier or []), _value(name, text, item_type, None)]
    if isinstance(text, bool) or inner is str:
        value = text if not (optional and text == "null") else None
    else:
        try:
            value = parse_yaml(text) if text != "" else None
        except Exception:  # noqa: BLE001 -- not YAML: checked as the plain text
            value = text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{_flag(name)} needs a value ({_allowed(tp)})")
    return coerce(tp, value, _flag(name))


def _unwrap(tp) -> tuple[Any, bool]:
    """(the type inside Optional[...], whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _is_bool(tp) -> bool:
    return tp is not None and _unwrap(tp)[0] is bool


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _allowed(tp) -> str:
    inner, optional = _unwrap(tp)
    if typing.get_origin(inner) is typing.Literal:
        text = " | ".join(map(str, typing.get_args(inner)))
    elif typing.get_origin(inner) is list:
        text = f"one {typing.get_args(inner)[0].__name__} per mention"
    else:
        text = getattr(inner, "__name__", str(inner))
    return text + (" or null" if optional else "")


def _unknown(arg: str, fields: dict, usage: Usage) -> typing.NoReturn:
    key = arg.lstrip("-").partition("=")[0].replace("-", "_")
    near = difflib.get_close_matches(key, list(fields), n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(_flag(n) for n in near)}?" if near else ""
    raise ConfigError(
        f"{usage.prog}: unknown option {arg!r}{hint} Its options are "
        f"{', '.join(_flag(n) for n in fields)} (each also as key=value; "
        f"--help says what they mean)"
    )


def help_text(schema: type, usage: Usage, width: int = 100) -> str:
    """The stage's --help: its description, then each option with its type, default and
    the field's own help."""
    hints = typing.get_type_hints(schema)
    lines = [
        f"usage: {usage.prog} [--KEY VALUE | KEY=VALUE ...]",
        "",
        *textwrap.wrap(usage.description, width),
        "",
    ]
    if usage.examples:
        lines += [usage.examples.rstrip(), ""]
    lines.append("options (each as --key value, --key=value or key=value; --help shows this):")
    for f in dataclasses.fields(schema):
        head = f"  {_flag(f.name)} {f.metadata.get('metavar') or _metavar(hints[f.name])}"
        if _is_bool(hints[f.name]):
            head = f"  {_flag(f.name)} / --no-{f.name.replace('_', '-')}"
        default = _default(f)
        if default == "required":
            lines.append(head + "  (required)")
        else:
            lines.append(head + (f"  (default: {default})" if default is not None else ""))
        lines += textwrap.wrap(
            field_help(f), width, initial_indent=" " * 8, subsequent_indent=" " * 8
        )
    return "\n".join(lines)


def _metavar(tp) -> str:
    inner, _ = _unwrap(tp)
    if typing.get_origin(inner) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(inner))) + "}"
    if typing.get_origin(inner) is list:
        return _metavar(typing.get_args(inner)[0]) + " (repeatable)"
    return {int: "N", float: "X", str: "TEXT", bool: ""}.get(inner, "VALUE")


def _default(f: dataclasses.Field) -> str | None:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return "required"
    if value is None or value == []:
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)
