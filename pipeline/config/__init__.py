"""The experiment config: the sections composed, YAML loading, `a.b=c` overrides, and the
rules that span sections.

Each section is declared, documented and checked by the room that owns it:
pipeline/data/config.py (data), pipeline/model/config.py (model),
pipeline/training/config.py (train, eval, checkpoint, tracking); pipeline/core/schema.py
says what a section is. This module composes them into one `Config`, loads a YAML file
and applies overrides typed by the schema (the value is parsed as YAML, so
`train.betas=[0.9,0.95]` and `model.qkv_bias=true` work), and checks what no single
section can: names that become directories, the seed, a mixture against the book's order,
eval.top_k against the vocabulary. Unknown keys and wrong types fail before any work,
naming the key and the valid choices.

Knows nothing about what the stages do with the values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.core.schema import ConfigError, Section, check, located, require, setting
from pipeline.data.config import SOURCE_KEYS, DataConfig, SourceConfig, WeightedSource
from pipeline.model.config import SHAPE_KEYS, ModelConfig
from pipeline.training.config import (
    TRACKERS,
    CheckpointConfig,
    EvalConfig,
    SpikeConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "SOURCE_KEYS",
    "SHAPE_KEYS",
    "TRACKERS",
    "CheckpointConfig",
    "SpikeConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "SourceConfig",
    "TrackingConfig",
    "TrainConfig",
    "WandbConfig",
    "WeightedSource",
    "check",
    "require",
]

# A run or data set name becomes a directory and reaches shells: plain names only.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
SEED_MAX = 2**64 - 1  # torch.manual_seed takes a 64-bit seed


@dataclass
class Config(Section):
    name: str = setting("default", "the run's name: runs/<name>/, and the W&B run name")
    seed: int = setting(1337, "seeds the model init, the data order and dropout")
    runs_root: str = setting("runs", "parent directory of all runs")
    data: DataConfig = setting(help="the data set", default_factory=DataConfig)
    model: ModelConfig = setting(help="the model", default_factory=ModelConfig)
    train: TrainConfig = setting(help="training", default_factory=TrainConfig)
    eval: EvalConfig = setting(help="evaluation during training", default_factory=EvalConfig)
    checkpoint: CheckpointConfig = setting(help="checkpoints", default_factory=CheckpointConfig)
    spikes: SpikeConfig = setting(
        help="loss spikes: skip or roll back", default_factory=SpikeConfig
    )
    tracking: TrackingConfig = setting(help="metrics", default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """The rules that span sections; each section has checked its own values."""
        for key, value in (("name", self.name), ("data.name", self.data.name)):
            require(
                bool(PLAIN_NAME.match(value)),
                key,
                value,
                "a plain name: letters, digits, '.', '_' and '-', not starting with '.' or "
                "'-' (it becomes a directory under the runs or data root)",
            )
        for key, value in (("runs_root", self.runs_root), ("data.root", self.data.root)):
            require(bool(value.strip()), key, value, "a directory path")
        require(0 <= self.seed <= SEED_MAX, "seed", self.seed, "0 .. 2**64 - 1")
        if self.data.sources:
            require(
                self.train.order == "shuffle",
                "train.order",
                self.train.order,
                "shuffle with data.sources (the book's order draws from one source)",
            )
        if self.spikes.rollback_loss_z is not None or self.spikes.rollback_nonfinite:
            require(
                self.train.order == "shuffle",
                "train.order",
                self.train.order,
                "shuffle with a spikes.* rollback (the book's order draws each epoch's "
                "permutation from the run's generator, so a range cannot be skipped in it)",
            )
        top_k, vocab = self.eval.top_k, self.model.vocab_size
        require(
            top_k is None or top_k <= vocab,
            "eval.top_k",
            top_k,
            f"null or 1 .. model.vocab_size ({vocab})",
        )

    @property
    def data_dir(self) -> Path:
        return Path(self.data.root) / self.data.name

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2), so `train.precision: no` is
    the string "no" and not False, as YAML 1.1's yes/no/on/off would make it."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (the shipped ones are in configs/)")
        try:
            raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(
                f"{path} is not a config: it nests deeper than any config does"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    return _build(Config, raw, "")


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = parse_yaml(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = value


def to_dict(config: Any) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    from pipeline.core.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            near = nearest_keys(f"{where}{key}")
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise ConfigError(
                f"unknown config key '{where}{key}'; {hint}valid keys here: {', '.join(names)}"
                f" (`gpt-pipeline train --help` lists every key)"
            )
        kwargs[key] = coerce(hints[key], value, f"{where}{key}")
    with located(where):  # the section names its keys where it sits
        return cls(**kwargs)


def coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, (float, str)):  # 1e6 written for a count
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def model_config_from_file(raw, where: str) -> ModelConfig:
    """A ModelConfig from a file this project did not just write itself (a Hugging Face
    config.json, a checkpoint's meta.json): the same types and checks as the YAML's
    `model` section, so `tie_embeddings: "no"` or `n_heads: 5` at width 768 is refused
    by name instead of being believed."""
    try:
        return _build(ModelConfig, raw, "model.")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- CLI


def get_value(config: Config, key: str) -> Any:
    """A resolved value by name: `data_dir`, `run_dir`, or any dotted key like `train.lr`."""
    if key in ("data_dir", "run_dir"):
        return getattr(config, key)
    node: Any = config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise ConfigError(f"--get {key}: no such key (try data_dir, run_dir, name, train.lr)")
        node = getattr(node, part)
    return node


# ----------------------------------------------------------------------------- key names


def schema_keys(cls=None, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, dotted, in schema order."""
    keys = []
    for f in dataclasses.fields(cls or Config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def nearest_keys(key: str, limit: int = 3) -> list[str]:
    """The valid keys most like `key` (a typo's likely meaning), best first."""
    import difflib

    keys = schema_keys()
    close = difflib.get_close_matches(key, keys, n=limit, cutoff=0.6)
    if not close:  # a right leaf under a wrong section: train.temperature -> eval.temperature
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf][:limit]
    return close
