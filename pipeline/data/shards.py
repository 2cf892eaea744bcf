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
from typing import Iterable

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_open, atomic_write_json, file_sha256

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) of each token width, as llm.c writes them
FORMATS = {np.dtype("<u2"): (20240520, 1), np.dtype("<u4"): (20240801, 7)}
_DTYPES = {header: dtype for dtype, header in FORMATS.items()}
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
VERIFIED = ".verified.json"  # shards checked against the manifest, by size + mtime
# How to mend a damaged data set (prepare rebuilds one whose manifest still matches).
REBUILD = (
    "rerun the prepare stage with the same config (`python -m pipeline.prepare "
    "--config CONFIG`, or `make data`): it rebuilds a damaged data set"
)


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
    return write_shard_from(path, [np.asarray(tokens)], len(tokens), dtype)


def write_shard_from(
    path: str | os.PathLike, chunks: Iterable[np.ndarray], count: int, dtype: np.dtype
) -> str:
    """Write one shard of `count` tokens given in consecutive chunks, atomically; return
    the sha256 of the whole file. Memory is one chunk, whatever the shard's size."""
    dtype = np.dtype(dtype).newbyteorder("<")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (*FORMATS[dtype], count)
    digest, written = hashlib.sha256(), 0
    with atomic_open(path, "wb") as f:
        digest.update(header.tobytes())
        f.write(header.tobytes())
        for chunk in chunks:
            data = chunk.astype(dtype, copy=False).tobytes()
            digest.update(data)
            f.write(data)
            written += len(chunk)
        if written != count:
            raise ValueError(f"{path}: {written} tokens given for a shard of {count}")
    return digest.hexdigest()


def windows_per_shard(
    shard_tokens: list[int], context_length: int, stride: int | None = None
) -> list[int]:
    """The book's window count per shard: starts 0, stride, ... below n - context_length,
    so the last window's target (one token further) still lies inside the shard. Windows
    never cross a shard boundary: a shard needs context_length + 1 tokens to hold one.
    The one statement of that rule; prepare and the loader both ask it."""
    stride = context_length if stride is None else stride
    return [len(range(0, n - context_length, stride)) for n in shard_tokens]


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
        raise DataError(
            f"{path} holds {path.stat().st_size} bytes but its header promises "
            f"{expected}: the file is truncated or corrupt; {REBUILD}"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


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
    # Free-form notes; nothing here reads them, but every manifest written so far has the
    # key, and load_manifest refuses unknown layouts, so the field stays in the format.
    extra: dict = field(default_factory=dict)
    # A mixture (data.sources): per source name, its shard files per split (they are also
    # in `splits`, source after source), documents and tokens. Empty for one source.
    sources: dict = field(default_factory=dict)

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def save(self, data_dir: str | os.PathLike) -> None:
        atomic_write_json(Path(data_dir) / MANIFEST, asdict(self))


def manifest_path(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MANIFEST


def load_manifest(data_dir: str | os.PathLike, name: str = MANIFEST) -> Manifest:
    path = Path(data_dir) / name
    if not path.is_file():
        raise DataError(
            f"no prepared data in {data_dir} ({MANIFEST} is missing). Make it with "
            f"`python -m pipeline.prepare --config CONFIG` (or `make data CONFIG=...`)."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["splits"] = {k: [ShardInfo(**s) for s in v] for k, v in raw["splits"].items()}
        manifest = Manifest(**raw)
        problem = manifest_problem(manifest)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
    if problem:
        raise DataError(
            f"{path} is not a valid manifest ({problem}); rerun prepare with "
            f"--force if this project wrote it"
        )
    return manifest


def manifest_problem(m: Manifest) -> str | None:
    """What makes a parsed manifest unusable here, or None: only GPT-2's tokenizer is
    read (ids of another would train and evaluate as if they were GPT-2's), the dtype
    must fit the vocabulary, and shard names must stay inside the data directory."""
    from pipeline.data.tokenizer import ENCODING_NAME

    if m.tokenizer != ENCODING_NAME:
        return (
            f"its tokenizer is {m.tokenizer!r}; this project reads data tokenized with "
            f"{ENCODING_NAME!r} only"
        )
    if (
        isinstance(m.vocab_size, bool)
        or not isinstance(m.vocab_size, int)
        or not 0 < m.vocab_size <= 2**32
    ):
        return f"vocab_size {m.vocab_size!r} is not a vocabulary size"
    if m.dtype != token_dtype(m.vocab_size).name:
        return f"dtype {m.dtype!r} does not hold a vocabulary of {m.vocab_size}"
    names = [info.file for infos in m.splits.values() for info in infos]
    outside = [
        n for n in names if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts
    ]
    if outside:
        return f"it names shard files outside its directory ({', '.join(map(str, outside[:3]))})"
    return None


def open_split(
    data_dir: str | os.PathLike, split: str, source: str | None = None
) -> list[np.memmap]:
    """Memory-maps of every shard of a split (of one source of a mixture), in order,
    checked against the manifest."""
    manifest = load_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"{data_dir} has no '{split}' split (it has {', '.join(manifest.splits)})")
    infos = manifest.splits[split]
    if source is not None:
        if source not in manifest.sources:
            raise DataError(
                f"{data_dir} has no source '{source}' (it has "
                f"{', '.join(manifest.sources) or 'one unnamed source'}); "
                f"prepare it with these data.sources"
            )
        files = set(manifest.sources[source]["splits"][split])
        infos = [info for info in infos if info.file in files]
    arrays = []
    for info in infos:
        tokens = read_shard(Path(data_dir) / info.file)
        if len(tokens) != info.tokens:
            raise DataError(
                f"{info.file} holds {len(tokens)} tokens, the manifest says "
                f"{info.tokens}; {REBUILD}"
            )
        arrays.append(tokens)
    check_shards(data_dir, manifest, infos)
    return arrays


def verify(data_dir: str | os.PathLike) -> list[str]:
    """Check every shard's sha256 against the manifest (no cache); return the files that differ."""
    manifest = load_manifest(data_dir)
    return [
        info.file
        for infos in manifest.splits.values()
        for info in infos
        if not (Path(data_dir) / info.file).is_file()
        or file_sha256(Path(data_dir) / info.file) != info.sha256
    ]


# ----------------------------------------------------------------------------- integrity
#
# Train and evaluate check every shard they open against the manifest's sha256 and the
# vocabulary. Hashing is ~1 GB/s, so each result is remembered in `.verified.json` beside
# the shards, keyed by the file's size and mtime_ns: a shard is hashed again only when
# its file changed (a byte written in place moves its mtime). prepare records the shards
# it writes, so fresh data is never hashed twice. An unwritable data directory (a shared,
# read-only data set) just means hashing at every open.


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def scan_shard(path: Path) -> tuple[str, int]:
    """(sha256 of the whole file, largest token id); the second read of the file comes
    from the page cache."""
    tokens = read_shard(path)
    largest = int(tokens.max()) if len(tokens) else -1
    return file_sha256(path), largest


def _load_verified(data_dir: Path) -> dict:
    try:
        cache = json.loads((data_dir / VERIFIED).read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_verified(data_dir: str | os.PathLike, infos: list[ShardInfo]) -> None:
    """Record shards known to match their manifest entries (as they are on disk now)."""
    data_dir = Path(data_dir)
    cache = _load_verified(data_dir)
    for info in infos:
        cache[info.file] = {"stamp": _stamp(data_dir / info.file), "sha256": info.sha256}
    try:
        atomic_write_json(data_dir / VERIFIED, cache)
    except OSError:
        pass  # read-only data: verification is then repeated at every open


def check_shards(data_dir: str | os.PathLike, manifest: Manifest, infos: list[ShardInfo]) -> None:
    """DataError naming the first shard whose bytes differ from the manifest or that holds
    a token id outside the vocabulary; shards unchanged since their last check are skipped."""
    data_dir = Path(data_dir)
    cache = _load_verified(data_dir)
    checked = []
    for info in infos:
        path = data_dir / info.file
        known = cache.get(info.file, {})
        if known.get("sha256") == info.sha256 and known.get("stamp") == _stamp(path):
            continue
        sha, largest = scan_shard(path)
        if sha != info.sha256:
            raise DataError(
                f"shard {path} is damaged: its sha256 is {sha[:16]}..., the manifest "
                f"says {info.sha256[:16]}...; {REBUILD}."
            )
        if largest >= manifest.vocab_size:
            raise DataError(
                f"shard {path} holds token id {largest}, outside the vocabulary of "
                f"{manifest.vocab_size}; {REBUILD}."
            )
        checked.append(info)
    if checked:
        remember_verified(data_dir, checked)
