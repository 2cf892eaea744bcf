"""The token stream: its layout, built part by part, and cut into shards.

Owns the layout of the token stream (documented in prepare.py): which split a document
goes to and where <|endoftext|> goes. A worker turns one part (pipeline/data/parts.py) into one
raw token file per split, `parts/NNNNNN.<split>.tok` (little-endian token ids, no header),
and commits it with a record `parts/NNNNNN.json` written last: a part with a record is
done, whatever happens to the process later. The data set's shards are then the
concatenation of every part's stream in plan order, cut every `shard_tokens` tokens, so
their bytes depend on the corpus and the settings only: never on which worker or machine
built which part, or in which order they finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.core.fileio import atomic_write_json, fsync_dir
from pipeline.data import parts
from pipeline.data.config import SourceConfig
from pipeline.data.parts import Notes, Part, Segment
from pipeline.data.shards import SPLITS, ShardInfo, token_dtype, write_shard_from
from pipeline.data.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

TRAIN, VAL = 0, 1  # indices into SPLITS
DTYPE = token_dtype(VOCAB_SIZE)
# The token-stream layout; a change of it must change prepare's fingerprint.
LAYOUT = {"document": "eot before each document", "text": "eot between documents"}
SKIP = -1  # a part's document limit when it lies wholly past max_documents
COPY_TOKENS = 1 << 22  # tokens copied at once when cutting shards: memory stays flat

Piece = tuple[int, str, bool, bool]  # (split, text, EOT before it, counts as a document)


@dataclass
class Layout:
    """What a worker needs to know to lay out one part's tokens."""

    split_by: str  # document | text
    val_fraction: float
    cut: int = 0  # split_by text: the character where val begins, in the whole corpus
    start_char: int = 0  # split_by text: the part's first character in the whole corpus


@dataclass
class PartRecord:
    """What a committed part holds; the last file a part writes."""

    part: int
    plan: str  # the plan's id: a record of another plan is never taken
    tokens: dict[str, int]
    documents: dict[str, int]
    sha256: dict[str, str]
    chars: int
    notes: dict

    def save(self, directory: Path) -> None:
        atomic_write_json(record_path(directory, self.part), asdict(self))


def record_path(directory: Path, index: int) -> Path:
    return directory / f"{index:06d}.json"


def stream_path(directory: Path, index: int, split: str) -> Path:
    return directory / f"{index:06d}.{split}.tok"


def committed(directory: Path, index: int, plan_id: str) -> PartRecord | None:
    """The record of a part committed under this plan whose files are all there with
    their sizes; None otherwise (the part is to be built)."""
    try:
        record = PartRecord(**json.loads(record_path(directory, index).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if record.plan != plan_id:
        return None
    for split, n in record.tokens.items():
        path = stream_path(directory, index, split)
        if not path.is_file() or path.stat().st_size != n * DTYPE.itemsize:
            return None
    return record


# ----------------------------------------------------------------------------- the layout


def split_of(text: str, val_fraction: float) -> int:
    """VAL when the document's hash, read as a number in [0, 1), is below val_fraction."""
    digest = hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=parts.DIGEST_SIZE
    ).digest()
    return split_of_digest(digest, val_fraction)


def split_of_digest(digest: bytes, val_fraction: float) -> int:
    return VAL if int.from_bytes(digest, "big") / 2**64 < val_fraction else TRAIN


def pieces_by_document(segments: Iterator[Segment], val_fraction: float) -> Iterator[Piece]:
    """A document goes where its hash says; EOT before each document."""
    for seg in segments:
        split = (
            split_of_digest(seg.digest, val_fraction)
            if seg.digest is not None
            else split_of(seg.text, val_fraction)
        )
        yield split, seg.text, seg.new_document, seg.new_document


def pieces_by_text(segments: Iterator[Segment], cut: int, start: int) -> Iterator[Piece]:
    """The corpus as one text cut at character `cut`, as the book does; this part begins
    at character `start`. EOT between documents, none at the start of either side; the
    document the cut divides counts as a document of both splits."""
    pos = start
    for seg in segments:
        text, end = seg.text, pos + len(seg.text)
        if end <= cut:
            yield TRAIN, text, seg.new_document and pos > 0, seg.new_document
        elif pos >= cut:
            first_val = pos == cut and not seg.new_document  # the cut document's val side
            yield VAL, text, seg.new_document and pos > cut, seg.new_document or first_val
        else:
            yield TRAIN, text[: cut - pos], seg.new_document and pos > 0, seg.new_document
            yield VAL, text[cut - pos :], False, True
        pos = end


# ----------------------------------------------------------------------------- one part


class TokenFile:
    """Raw tokens appended to a temporary file, hashed as written; `commit` makes it
    durable under its name."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.file = open(self.tmp, "wb", buffering=1 << 20)
        self.digest, self.tokens = hashlib.sha256(), 0

    def write(self, tokens: list[int]) -> None:
        data = np.asarray(tokens, dtype=DTYPE).tobytes()
        self.digest.update(data)
        self.file.write(data)
        self.tokens += len(tokens)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def build_part(
    part: Part,
    source: SourceConfig,
    layout: Layout,
    directory: Path,
    plan_id: str,
    segment_bytes: int,
    limit: int | None = None,
) -> PartRecord:
    """Read, lay out and tokenize one part into its token files, then commit its record.
    With `limit`, at most that many documents are begun (data.source.max_documents; the
    rest of a document the part continues is always read; SKIP reads nothing)."""
    enc = get_tokenizer()
    notes = Notes()
    files = [TokenFile(stream_path(directory, part.index, s)) for s in SPLITS]
    documents, chars = [0] * len(SPLITS), 0
    try:
        if limit == SKIP:  # past max_documents: nothing to read
            segments: Iterator[Segment] = iter(())
        else:
            segments = _limited(parts.read(part, source, segment_bytes, notes), limit)
        if layout.split_by == "text":
            pieces = pieces_by_text(segments, layout.cut, layout.start_char)
        else:
            pieces = pieces_by_document(segments, layout.val_fraction)
        for split, text, eot, new_document in pieces:
            tokens = enc.encode_ordinary(text)
            files[split].write([EOT_ID, *tokens] if eot else tokens)
            documents[split] += new_document
            chars += len(text)
        for f in files:
            f.commit()
    except BaseException:
        for f in files:
            f.discard()
        raise
    fsync_dir(directory)
    record = PartRecord(
        part=part.index,
        plan=plan_id,
        tokens={s: f.tokens for s, f in zip(SPLITS, files)},
        documents=dict(zip(SPLITS, documents)),
        sha256={s: f.digest.hexdigest() for s, f in zip(SPLITS, files)},
        chars=chars,
        notes=asdict(notes),
    )
    record.save(directory)
    return record


def count_part(
    part: Part, source: SourceConfig, segment_bytes: int, limit: int | None = None
) -> tuple[int, int]:
    """(characters, documents) of a part: split_by text needs every part's start."""
    chars = docs = 0
    for seg in _limited(parts.read(part, source, segment_bytes, Notes()), limit):
        chars += len(seg.text)
        docs += seg.new_document
    return chars, docs


def _limited(segments: Iterator[Segment], limit: int | None) -> Iterator[Segment]:
    """The segments of the first `limit` documents (all when None); no segment past them
    is read."""
    seen = 0
    for seg in segments:
        if seg.new_document:
            if seen == limit:
                return
            seen += 1
        yield seg


# ----------------------------------------------------------------------------- shards


@dataclass
class ShardPlan:
    """One shard to write: its file and the stream slices it is made of, in order."""

    file: str
    slices: list[tuple[str, int, int]]  # (token file, first token, end token)

    @property
    def tokens(self) -> int:
        return sum(stop - start for _, start, stop in self.slices)


def cut_into_shards(streams: list[tuple[Path, int]], shard_tokens: int, name) -> list[ShardPlan]:
    """The shards of the concatenation of `streams` ((token file, tokens) in order): every
    `shard_tokens` tokens, the last shorter. `name(k)` is the k-th shard's file name."""
    shards: list[ShardPlan] = []
    current: list[tuple[str, int, int]] = []
    room = shard_tokens
    for path, n in streams:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append((str(path), start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(ShardPlan(name(len(shards)), current))
                current, room = [], shard_tokens
    if current:
        shards.append(ShardPlan(name(len(shards)), current))
    return shards


def write_planned_shard(shard: ShardPlan, out_dir: Path) -> ShardInfo:
    """Write one shard from its slices, copying at most COPY_TOKENS at a time."""

    def chunks():
        for path, start, stop in shard.slices:
            tokens = np.memmap(path, dtype=DTYPE, mode="r")
            for at in range(start, stop, COPY_TOKENS):
                yield np.asarray(tokens[at : min(at + COPY_TOKENS, stop)])
            del tokens

    sha = write_shard_from(out_dir / shard.file, chunks(), shard.tokens, DTYPE)
    return ShardInfo(file=shard.file, tokens=shard.tokens, sha256=sha)
