"""The experiment config: typed dataclasses, YAML loading, `a.b=c` overrides, validation.

Owns the schema every stage reads. One YAML file per experiment; any key can be
overridden on the command line as `section.key=value` (the value is parsed as YAML,
so `train.betas=[0.9,0.95]` and `model.qkv_bias=true` work). Unknown keys and wrong
types fail before any work, naming the key and the valid choices.

Knows nothing about what the stages do with the values.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.errors import PipelineError


class ConfigError(PipelineError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------- schema


@dataclass
class SourceConfig:
    """Where the documents come from. Which keys apply depends on `kind`."""

    kind: Literal["files", "hf", "url", "python-stdlib"] = "python-stdlib"
    # files: files, directories or glob patterns (.txt, .jsonl, .json, .parquet)
    paths: list[str] = field(default_factory=list)
    # files (jsonl/parquet) and hf: the column that holds the text
    text_field: str = "text"
    # hf: dataset path on the Hub (e.g. HuggingFaceFW/fineweb-edu), config name, split
    path: str = ""
    name: Optional[str] = None
    split: str = "train"
    streaming: bool = True
    # files and hf: stop after this many documents (null: all)
    max_documents: Optional[int] = None
    # url: a text file, downloaded once into the data directory
    url: str = ""
    # python-stdlib: stop after this many bytes of source (null: all of it)
    max_bytes: Optional[int] = None


# The keys that mean something for each source kind (besides `kind`).
SOURCE_KEYS = {
    "files": {"paths", "text_field", "max_documents"},
    "hf": {"path", "name", "split", "text_field", "streaming", "max_documents"},
    "url": {"url"},
    "python-stdlib": {"max_bytes"},
}


@dataclass
class DataConfig:
    name: str = "python-stdlib"  # prepared data lives in <root>/<name>/
    root: str = "data"  # parent directory of all prepared data sets
    source: SourceConfig = field(default_factory=SourceConfig)
    val_fraction: float = 0.1  # share of documents (or of characters) held out
    # document: each document goes to val with probability val_fraction (by its hash);
    # text: the whole corpus is one text cut at 1 - val_fraction, as the book does
    split_by: Literal["document", "text"] = "document"
    shard_tokens: int = 100_000_000  # most tokens in one shard file
    num_workers: Optional[int] = None  # tokenizer processes (null: all cores)


@dataclass
class ModelConfig:
    # The book's GPT_CONFIG_124M (chapter 5 uses context 256).
    vocab_size: int = 50257
    context_length: int = 256  # tokens the model sees at once
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False  # share the token embedding with the output head
    # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a model directory
    init_from: str = "scratch"
    # How fresh weights are drawn (init_from: scratch). gpt2: N(0, 0.02) for embeddings
    # and linears, residual projections scaled by 1/sqrt(2 n_layers), zero biases, as
    # GPT-2 and nanoGPT (what real pretraining wants). torch_default: each layer's own
    # PyTorch init (Embedding N(0, 1), Linear kaiming-uniform), which the book keeps.
    init: Literal["gpt2", "torch_default"] = "gpt2"


# The ModelConfig keys that fix the tensors' shapes: a checkpoint resumes, and an export
# reads back, only where these agree.
SHAPE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias",
              "tie_embeddings")


@dataclass
class TrainConfig:
    micro_batch_size: int = 8  # sequences per process per forward pass
    grad_accum_steps: int = 1  # micro batches per optimizer step
    # Length of the run: the first that is set of max_steps, max_tokens, epochs
    # (none set: 1 epoch). Tokens count inputs of the global batch.
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None
    epochs: Optional[float] = None
    stride: Optional[int] = None  # tokens between window starts (null: context_length)
    # shuffle: a seeded permutation per epoch, split over processes, independent of
    # everything else (pretraining). book: torch's DataLoader(shuffle=True,
    # drop_last=True) as the book iterates it, seeds drawn from torch's global generator
    # (so dropout and order interleave as in the book); one process only.
    order: Literal["shuffle", "book"] = "shuffle"
    lr: float = 4e-4  # peak learning rate
    min_lr: Optional[float] = None  # end of the cosine decay (null: lr / 10)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    # matrices: decay linear weights and embeddings only (GPT-2, nanoGPT); all: every
    # parameter, biases and LayerNorms too, as the book's AdamW(model.parameters())
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: Optional[float] = 1.0  # max global grad norm (null: no clipping)
    precision: Literal["no", "bf16", "fp16"] = "no"  # mixed precision through Accelerate
    compile: bool = False  # torch.compile the model
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU (null: known GPUs)
    log_every_steps: int = 10  # write metrics every N optimizer steps


@dataclass
class EvalConfig:
    every_steps: int = 100  # evaluate (and sample) every N optimizer steps
    # Step of the first evaluation, then every every_steps after it (null: every_steps).
    # 1 is the book's schedule: its "Step 000000" is the evaluation after the first update.
    first_step: Optional[int] = None
    batches: int = 10  # micro batches of train and of val per evaluation
    prompt: str = "Every effort moves you"  # start of the sample printed at each eval
    max_new_tokens: int = 50
    temperature: float = 0.0  # 0: greedy, as the book's generate_and_print_sample
    top_k: Optional[int] = None


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # write a checkpoint every N optimizer steps (and at the end)
    keep_last: int = 3  # older checkpoints are deleted (0: keep all)
    resume: str = "auto"  # auto: continue from the latest checkpoint | never | a path


@dataclass
class WandbConfig:
    # null: online when an API key is configured, else offline; WANDB_MODE wins
    mode: Optional[Literal["disabled", "offline", "online"]] = None
    project: str = "gpt-pipeline"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    name: str = "default"  # the run's name: runs/<name>/, and the W&B run name
    seed: int = 1337
    runs_root: str = "runs"  # parent directory of all runs
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

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
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


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
            raw = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def from_dict(raw: dict) -> Config:
    config = _build(Config, raw, "")
    validate(config)
    return config


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
    from pipeline.fileio import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{where}{key}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{where}{key}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
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
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
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


# ----------------------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    src = config.data.source
    given = {f.name for f in dataclasses.fields(src)
             if f.name != "kind" and getattr(src, f.name) != getattr(SourceConfig(), f.name)}
    stray = given - SOURCE_KEYS[src.kind]
    if stray:
        raise ConfigError(
            f"data.source.{sorted(stray)[0]} does not apply to kind '{src.kind}'; "
            f"its keys are: {', '.join(sorted(SOURCE_KEYS[src.kind]))}")
    if src.kind == "files" and not src.paths:
        raise ConfigError("data.source.paths is empty: name files, directories or globs")
    if src.kind == "hf" and not src.path:
        raise ConfigError("data.source.path is empty: name a dataset, e.g. HuggingFaceFW/fineweb-edu")
    if src.kind == "url" and not src.url:
        raise ConfigError("data.source.url is empty")
    _check(0 < config.data.val_fraction < 1, "data.val_fraction must be between 0 and 1")
    _check(config.data.shard_tokens > 0, "data.shard_tokens must be positive")
    m = config.model
    _check(m.emb_dim % m.n_heads == 0,
           f"model.emb_dim ({m.emb_dim}) must be divisible by model.n_heads ({m.n_heads})")
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        _check(getattr(m, key) > 0, f"model.{key} must be positive")
    _check(0 <= m.drop_rate < 1, "model.drop_rate must be in [0, 1)")
    t = config.train
    _check(t.micro_batch_size > 0 and t.grad_accum_steps > 0,
           "train.micro_batch_size and train.grad_accum_steps must be positive")
    _check(t.stride is None or t.stride > 0, "train.stride must be positive")
    _check(t.lr > 0, "train.lr must be positive")
    _check(config.eval.every_steps > 0, "eval.every_steps must be positive")
    _check(config.eval.first_step is None or config.eval.first_step > 0,
           "eval.first_step must be positive (or null: every_steps)")
    _check(config.checkpoint.every_steps > 0, "checkpoint.every_steps must be positive")
    _check(config.checkpoint.keep_last >= 0, "checkpoint.keep_last must be >= 0")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.config --config CONFIG [key=value ...] --get KEY` prints one
    resolved value (the Makefile asks it where a config's data and run live); without
    --get it prints the whole resolved config as YAML."""
    import argparse

    from pipeline.errors import cli_main

    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description=main.__doc__)
    parser.add_argument("--config", help="experiment YAML (default: the schema's defaults)")
    parser.add_argument("--get", metavar="KEY", help="data_dir | run_dir | name | a dotted key")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")

    @cli_main
    def run(args) -> None:
        config = load_config(args.config, args.overrides)
        if args.get is None:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return
        value = get_value(config, args.get)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        if isinstance(value, (list, tuple, dict)):
            value = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                                   default_flow_style=True).strip()
        print(value)

    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
