"""The token shard format and the manifest: the one place that knows their bytes.

A shard is llm.c's token file (dev/data/data_common.py), in its two variants:

    header: 256 little-endian int32
        [0], [1]        magic, version: 20240520, 1 for uint16 tokens (GPT-2's files,
                        which llm.c's C loader and modded-nanogpt read, so data prepared
                        here feeds those tools and theirs feeds ours); 20240801, 7 for
                        uint32 tokens (llm.c's llama-3 files, which only its Python
                        writer and this loader know)
        [2] = n         number of tokens
        [3:] = 0
    body:   n tokens, little-endian uint16 (or uint32)

Documents inside are separated by <|endoftext|> (50256).

`manifest.json` describes a prepared data set: tokenizer, vocabulary, dtype, and per split
the shards with their token counts and sha256, plus the source and prepare settings.
It is written last and atomically: a directory without a manifest is not a data set.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_open, atomic_write_json

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) of each token width, as llm.c writes them
FORMATS = {np.dtype("<u2"): (20240520, 1), np.dtype("<u4"): (20240801, 7)}
_DTYPES = {header: dtype for dtype, header in FORMATS.items()}
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DataError(PipelineError):
    """Prepared data that is missing, incomplete or corrupt."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50257 does), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_bytes(tokens: int, dtype: np.dtype) -> int:
    """The size of a shard file holding `tokens` tokens of `dtype`."""
    return HEADER_BYTES + tokens * np.dtype(dtype).itemsize


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


# ----------------------------------------------------------------------------- shards


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> str:
    """Write one shard atomically; return the sha256 of the whole file."""
    dtype = np.dtype(dtype).newbyteorder("<")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (*FORMATS[dtype], len(tokens))
    body = np.asarray(tokens).astype(dtype, copy=False)
    digest = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for chunk in (header.tobytes(), body.tobytes()):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def read_shard(path: str | os.PathLike) -> np.memmap:
    """Memory-map the tokens of a shard, after checking its header against its size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing; rerun the prepare stage to rebuild it")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    dtype = _DTYPES.get((int(header[0]), int(header[1]))) if len(header) >= 3 else None
    if dtype is None:
        raise DataError(f"{path} is not a token shard (bad magic or version)")
    count = int(header[2])
    expected = shard_bytes(count, dtype)
    if path.stat().st_size != expected:
        raise DataError(f"{path} holds {path.stat().st_size} bytes but its header promises "
                        f"{expected}: the file is truncated or corrupt; rerun prepare with --force")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    file: str  # name inside the data directory
    tokens: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: str
    vocab_size: int
    dtype: str  # "uint16" | "uint32"
    eot_token: int
    splits: dict[str, list[ShardInfo]]
    documents: dict[str, int]  # per split
    source: dict  # the data.source config that produced it
    settings: dict  # the prepare settings that change the bytes (the fingerprint)
    format: str = "llm.c token shards v1 (header 256 x int32, magic 20240520)"
    extra: dict = field(default_factory=dict)

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def save(self, data_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(data_dir) / MANIFEST, asdict(self))


def manifest_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MANIFEST


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    path = manifest_path(data_dir)
    if not path.is_file():
        raise DataError(
            f"no prepared data in {data_dir} ({MANIFEST} is missing). Make it with "
            f"`python -m pipeline.prepare --config CONFIG` (or `make data CONFIG=...`).")
    try:
        raw = json.loads(path.read_text())
        raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
        return Manifest(**raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid manifest ({e}); rerun prepare with --force") from None


def open_split(data_dir: str | os.PathLike, split: str) -> list[np.memmap]:
    """Memory-maps of every shard of a split, in order, checked against the manifest."""
    manifest = load_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"{data_dir} has no '{split}' split (it has {', '.join(manifest.splits)})")
    arrays = []
    for info in manifest.splits[split]:
        tokens = read_shard(Path(data_dir) / info.file)
        if len(tokens) != info.tokens:
            raise DataError(f"{info.file} holds {len(tokens)} tokens, the manifest says "
                            f"{info.tokens}; rerun prepare with --force")
        arrays.append(tokens)
    return arrays


def verify(data_dir: str | os.PathLike) -> list[str]:
    """Check every shard's sha256 against the manifest; return the files that differ."""
    manifest = load_manifest(data_dir)
    return [info.file for infos in manifest.splits.values() for info in infos
            if not (Path(data_dir) / info.file).is_file()
            or file_sha256(Path(data_dir) / info.file) != info.sha256]
