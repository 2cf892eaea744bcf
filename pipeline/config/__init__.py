"""The experiment config: typed dataclasses, YAML loading, `a.b=c` overrides, validation.

Owns the schema every stage reads. One YAML file per experiment; any key can be
overridden on the command line as `section.key=value` (the value is parsed as YAML,
so `train.betas=[0.9,0.95]` and `model.qkv_bias=true` work). Unknown keys and wrong
types fail before any work, naming the key and the valid choices.

Knows nothing about what the stages do with the values.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.core.errors import PipelineError


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
    # hf: the dataset's git revision (branch, tag or commit; null: the default branch)
    revision: Optional[str] = None
    # files and hf: stop after this many documents (null: all)
    max_documents: Optional[int] = None
    # url: a text file, downloaded once into the data directory
    url: str = ""
    # url: the file's sha256 (64 hex digits), checked after every download and on reuse
    # of a cached one (null: not checked)
    sha256: Optional[str] = None
    # url: a download past this many bytes is stopped and deleted (null: no limit). The
    # file is read whole into memory as one document, so one larger than 4 GiB would not
    # prepare on most machines anyway; the limit keeps a wrong URL (an archive, a stream
    # that never ends) from filling the disk first.
    max_download_bytes: Optional[int] = 4 * 2**30
    # python-stdlib: stop after this many bytes of source (null: all of it)
    max_bytes: Optional[int] = None


# The keys that mean something for each source kind (besides `kind`).
SOURCE_KEYS = {
    "files": {"paths", "text_field", "max_documents"},
    "hf": {"path", "name", "split", "revision", "text_field", "streaming", "max_documents"},
    "url": {"url", "sha256", "max_download_bytes"},
    "python-stdlib": {"max_bytes"},
}


@dataclass
class WeightedSource:
    """One source of a mixture: its documents, a name, and its share of training samples."""

    name: str = ""  # names its shards' directory (data/<name>/<this>/) and its metrics
    weight: float = 1.0  # relative share of the training samples drawn from it
    source: SourceConfig = field(default_factory=SourceConfig)


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
    # The unit of work and of resume: the corpus is cut into parts of about this many
    # bytes (whole small files, ranges of big ones), each read, tokenized and committed
    # by one worker. Changes no byte of the data set.
    part_bytes: int = 4_000_000
    # A document longer than this is read and tokenized in pieces of about this size, cut
    # where no token changes: what bounds a worker's memory. Changes no byte either.
    segment_bytes: int = 1_000_000
    # A weighted mixture instead of data.source: a list of {name, weight, source}. Each
    # source gets its own shards; train draws each sample from a source by the weights.
    sources: list[WeightedSource] = field(default_factory=list)


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
    # adamw: AdamW for every parameter. muon: Muon for the transformer blocks' matrices
    # (lr scaled to AdamW's update size, so the same lr and weight_decay apply), AdamW for
    # embeddings, head, biases and norms (pipeline/training/muon.py).
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 4e-4  # peak learning rate
    min_lr: Optional[float] = None  # end of the cosine decay (null: lr / 10)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    # matrices: decay linear weights and embeddings only (GPT-2, nanoGPT); all: every
    # parameter, biases and LayerNorms too, as the book's AdamW(model.parameters())
    weight_decay_on: Literal["matrices", "all"] = "matrices"
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: Optional[float] = 1.0  # max global grad norm (null: no clipping)
    # Mixed precision through Accelerate. auto: bf16 where the hardware has bf16 units
    # (GPUs from Ampere on, CPUs with AVX512_BF16 or AMX), fp16 on older GPUs, else no
    # (fp32): on a CPU without bf16 units bf16 is ~40x slower (pipeline/training/precision.py).
    # fp32 (also written `no`, Accelerate's word): no autocast.
    precision: Literal["auto", "fp32", "no", "bf16", "fp16"] = "no"
    compile: bool = False  # torch.compile the model
    # Recompute each transformer block's activations in backward instead of keeping
    # them: about a third more compute for a fraction of the activation memory (what
    # lets GPT-2 1.5B train at micro batch 64 x 1024 on 80 GB GPUs; docs in the README).
    activation_checkpointing: bool = False
    # fp32 matmuls on GPUs (precision: no) on TF32 tensor cores (Ampere on): ~8x faster,
    # a 10-bit mantissa in the products. false: full fp32. No effect on CPUs.
    tf32: bool = True
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU (null: known GPUs)
    log_every_steps: int = 10  # write metrics every N optimizer steps
    # How long a process waits for the others in a collective (an all-reduce, a barrier)
    # before the run ends with an error naming it: a hung or dead peer then costs minutes,
    # not torch's default of 30. Checkpoint writes and evaluations count as one wait.
    collective_timeout_minutes: float = 10.0


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
    # Multiple-choice tasks scored during training (metrics <task>_acc, <task>_acc_norm):
    # hellaswag (HellaSwag's val set, downloaded once, or task_file) or mc (task_file:
    # one {"context", "choices", "label"} per line). [] for none.
    tasks: list[str] = field(default_factory=list)
    task_file: Optional[str] = None
    task_every_steps: Optional[int] = None  # null: at every evaluation
    task_examples: Optional[int] = 500  # the first N examples, for speed (null: all)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # write a checkpoint every N optimizer steps (and at the end)
    keep_last: int = 3  # older checkpoints are deleted (0: keep all)
    resume: str = "auto"  # auto: continue from the latest checkpoint | never | a path


@dataclass
class WandbConfig:
    # null: online when an API key is configured, else offline; WANDB_MODE wins
    mode: Optional[Literal["disabled", "offline", "online"]] = None
    project: Optional[str] = None  # null: $WANDB_PROJECT, else gpt-pipeline
    entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity
    group: Optional[str] = None  # null: $WANDB_RUN_GROUP, else none
    tags: list[str] = field(default_factory=list)


# The trackers tracking.log_with may name (Accelerate's), and the module each needs.
TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


@dataclass
class TrackingConfig:
    # Where metrics go besides metrics.jsonl and loss.png, through Accelerate's trackers:
    # any of wandb, tensorboard (pip install 'gpt-pipeline[tensorboard]'; event files in
    # runs/<name>/tensorboard/), mlflow, comet_ml, aim, clearml, dvclive. [] for none.
    log_with: list[str] = field(default_factory=lambda: ["wandb"])
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
            raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path} is not a config: it nests deeper than any config "
                              f"does") from None
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
                f" (`gpt-pipeline train --help` lists every key)")
        kwargs[key] = coerce(hints[key], value, f"{where}{key}")
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


# ----------------------------------------------------------------------------- validation


# A run or data set name becomes a directory and reaches shells: plain names only.
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
SEED_MAX = 2**64 - 1  # torch.manual_seed takes a 64-bit seed


def validate(config: Config) -> None:
    """Every value against what is allowed, before any work: ranges of numbers, plain
    names, and the cross-field rules the types alone cannot express."""
    _validate_names(config)
    _validate_source(config.data.source)
    _validate_mixture(config)
    d = config.data
    require(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "between 0 and 1")
    require(d.shard_tokens > 0, "data.shard_tokens", d.shard_tokens, "a positive count")
    require(d.part_bytes > 0, "data.part_bytes", d.part_bytes, "a positive number of bytes")
    require(d.segment_bytes >= 4096, "data.segment_bytes", d.segment_bytes,
             "at least 4096 bytes")
    require(d.num_workers is None or d.num_workers >= 1, "data.num_workers", d.num_workers,
             "at least 1, or null for all cores")
    _validate_model(config.model)
    _validate_train(config.train)
    e = config.eval
    for key in ("every_steps", "batches", "max_new_tokens"):
        require(getattr(e, key) > 0, f"eval.{key}", getattr(e, key), "a positive count")
    require(e.first_step is None or e.first_step > 0, "eval.first_step", e.first_step,
             "a positive step, or null for every_steps")
    require(math.isfinite(e.temperature) and e.temperature >= 0, "eval.temperature",
             e.temperature, "0 (greedy) or a positive number")
    require(e.top_k is None or 0 < e.top_k <= config.model.vocab_size, "eval.top_k", e.top_k,
             f"null or 1 .. model.vocab_size ({config.model.vocab_size})")
    require(all(t in ("hellaswag", "mc") for t in e.tasks), "eval.tasks", e.tasks,
             "a list of hellaswag and mc")
    require("mc" not in e.tasks or bool(e.task_file), "eval.task_file", e.task_file,
             "a jsonl file when eval.tasks has mc")
    for key in ("task_every_steps", "task_examples"):
        require(getattr(e, key) is None or getattr(e, key) > 0, f"eval.{key}",
                 getattr(e, key), "positive, or null")
    c = config.checkpoint
    require(c.every_steps > 0, "checkpoint.every_steps", c.every_steps, "a positive count")
    require(c.keep_last >= 0, "checkpoint.keep_last", c.keep_last, "0 (keep all) or more")
    require(bool(c.resume), "checkpoint.resume", c.resume, "auto, never or a checkpoint path")
    unknown = [t for t in config.tracking.log_with if t not in TRACKERS]
    require(not unknown and len(set(config.tracking.log_with)) == len(config.tracking.log_with),
             "tracking.log_with", config.tracking.log_with,
             f"a list of distinct trackers among {', '.join(TRACKERS)} ([] for none)")
    require(0 <= config.seed <= SEED_MAX, "seed", config.seed, "0 .. 2**64 - 1")


def _validate_names(config: Config) -> None:
    for key, value in (("name", config.name), ("data.name", config.data.name)):
        require(bool(PLAIN_NAME.match(value)), key, value,
                 "a plain name: letters, digits, '.', '_' and '-', not starting with '.' or '-' "
                 "(it becomes a directory under the runs or data root)")
    for key, value in (("runs_root", config.runs_root), ("data.root", config.data.root)):
        require(bool(value.strip()), key, value, "a directory path")


def _validate_mixture(config: Config) -> None:
    mix = config.data.sources
    if not mix:
        return
    check(config.data.source == SourceConfig(),
           "data.source and data.sources are both set: a data set has either one source "
           "(data.source) or a weighted mixture (data.sources); move data.source into the list, "
           "or clear it (data.source: null, or the override data.source=null)")
    names = [entry.name for entry in mix]
    for i, entry in enumerate(mix):
        where = f"data.sources[{i}]."
        require(bool(SOURCE_NAME.match(entry.name)), f"{where}name", entry.name,
                 "a short plain name (letters, digits, '_' and '-'): it names the source's "
                 "shard directory and its metrics")
        require(math.isfinite(entry.weight) and entry.weight > 0, f"{where}weight",
                 entry.weight, "a positive number (weights are relative; they need not sum to 1)")
        _validate_source(entry.source, f"{where}source.")
    require(len(set(names)) == len(names), "data.sources names", names, "distinct names")
    require(config.train.order == "shuffle", "train.order", config.train.order,
             "shuffle with data.sources (the book's order draws from one source)")


def _validate_source(src: SourceConfig, where: str = "data.source.") -> None:
    given = {f.name for f in dataclasses.fields(src)
             if f.name != "kind" and getattr(src, f.name) != getattr(SourceConfig(), f.name)}
    stray = given - SOURCE_KEYS[src.kind]
    if stray:
        raise ConfigError(
            f"{where}{sorted(stray)[0]} does not apply to kind '{src.kind}'; "
            f"its keys are: {', '.join(sorted(SOURCE_KEYS[src.kind]))}")
    if src.kind == "files" and not src.paths:
        raise ConfigError(f"{where}paths is empty: name files, directories or globs")
    if src.kind == "hf" and not src.path:
        raise ConfigError(f"{where}path is empty: name a dataset, e.g. HuggingFaceFW/fineweb-edu")
    if src.kind == "url" and not src.url:
        raise ConfigError(f"{where}url is empty")
    for key in ("max_documents", "max_bytes"):
        value = getattr(src, key)
        require(value is None or value > 0, f"{where}{key}", value,
                 "a positive count, or null for all")
    require(src.max_download_bytes is None or src.max_download_bytes > 0,
             f"{where}max_download_bytes", src.max_download_bytes,
             "a positive number of bytes, or null for no limit")
    require(src.sha256 is None or bool(re.fullmatch("[0-9a-fA-F]{64}", src.sha256)),
             f"{where}sha256", src.sha256,
             "64 hexadecimal digits (as sha256sum prints them), or null")
    require(src.revision is None or bool(src.revision.strip()), f"{where}revision",
             src.revision, "a branch, tag or commit of the dataset, or null for the default")


def _validate_model(m: ModelConfig) -> None:
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "a positive count")
    check(m.emb_dim % m.n_heads == 0,
           f"model.emb_dim ({m.emb_dim}) must be divisible by model.n_heads ({m.n_heads})")
    require(0 <= m.drop_rate < 1, "model.drop_rate", m.drop_rate, "in [0, 1)")


def model_config_from_file(raw, where: str) -> ModelConfig:
    """A ModelConfig from a file this project did not just write itself (a Hugging Face
    config.json, a checkpoint's meta.json): the same types and checks as the YAML's
    `model` section, so `tie_embeddings: "no"` or `n_heads: 5` at width 768 is refused
    by name instead of being believed."""
    try:
        model = _build(ModelConfig, raw, "model.")
        _validate_model(model)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return model


def _validate_train(t: TrainConfig) -> None:
    for key in ("micro_batch_size", "grad_accum_steps", "log_every_steps"):
        require(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "a positive count")
    for key in ("max_steps", "max_tokens", "stride"):
        value = getattr(t, key)
        require(value is None or value > 0, f"train.{key}", value, "positive, or null")
    require(t.epochs is None or (math.isfinite(t.epochs) and t.epochs > 0), "train.epochs",
             t.epochs, "a positive number, or null")
    require(math.isfinite(t.lr) and t.lr > 0, "train.lr", t.lr, "a positive number")
    require(t.min_lr is None or (math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr),
             "train.min_lr", t.min_lr, f"0 .. train.lr ({t.lr}), or null for lr / 10")
    require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "0 or more")
    require(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay",
             t.weight_decay, "0 or more")
    require(all(math.isfinite(b) and 0 <= b < 1 for b in t.betas), "train.betas",
             list(t.betas), "two numbers in [0, 1)")
    require(t.grad_clip is None or (math.isfinite(t.grad_clip) and t.grad_clip > 0),
             "train.grad_clip", t.grad_clip, "a positive norm, or null for no clipping")
    require(t.peak_flops is None or t.peak_flops > 0, "train.peak_flops", t.peak_flops,
             "a positive FLOP/s, or null")
    require(math.isfinite(t.collective_timeout_minutes) and t.collective_timeout_minutes > 0,
             "train.collective_timeout_minutes", t.collective_timeout_minutes,
             "a positive number of minutes")


def require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}")


def check(ok: bool, message: str) -> None:
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
