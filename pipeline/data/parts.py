"""A corpus cut into parts: the units of work that prepare's workers (on one machine or
many) read, tokenize and commit one at a time.

A plan lists a source's parts in corpus order; it depends on the source and on
`data.part_bytes` alone, never on how many workers or machines read it:

- text files (`.txt` and the built-in sample's `.py` files): consecutive files grouped
  until they reach `part_bytes`; a file larger than that is cut into byte ranges of about
  `part_bytes`, each starting at a *token-safe* byte (pipeline/data/textcut.py), so the pieces'
  tokens, joined, are the whole file's tokens;
- `.jsonl`: byte ranges of about `part_bytes` that start after a newline (rows are never cut);
- `.parquet`: row groups, consecutive ones grouped until `part_bytes` (uncompressed);
- `.json` (one JSON document per file): one file per part, through `datasets`;
- `hf`: the shards of the (streamed) dataset, `IterableDataset.shard(n_shards, i)`;
- `url`: the downloaded file, as a text file.

Reading a part yields *segments*: a whole document, or a piece of one when the document is
longer than `segment_bytes`. Such a document is read in blocks and cut at token-safe bytes,
so a worker's memory is bounded by `segment_bytes` whatever the file size or line length;
the decoder's state is carried across blocks, so the text is the same as decoding the file
whole. Where a document's train/val split needs a hash of its whole text, the plan carries
that hash (`digest`), computed once by `file_digest`.

A document is what `corpus` defines (a text file, a row); `documents()` joins the segments
back and is the whole corpus as one iterator of strings, for callers that want that.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from pipeline.core import log
from pipeline.data import corpus, gutenberg, textcut
from pipeline.data.config import SourceConfig
from pipeline.data.corpus import CorpusError, Warn

# How far past a nominal cut of a large file to look for a token-safe byte before cutting
# anyway (counted, and reported: text with no space, newline or change between letters,
# digits and punctuation for this long is not prose or code).
SAFE_CUT_WINDOW = 1 << 20
DIGEST_SIZE = 8  # bytes of blake2b: the document hash that decides its split


@dataclass
class Part:
    """One unit of work: `items` of one source, read in order."""

    index: int  # position in the plan: the order of the token stream
    source: int  # index into the data set's sources
    kind: str  # text | jsonl | parquet | json | hf
    items: list[dict]  # text: path, start, stop, size, encoding[, digest]; jsonl: path,
    #                   start, stop; parquet: path, row_groups; json: path; hf: shard, of
    bytes: int  # bytes of input (0 when unknown), for progress and balance

    @classmethod
    def from_dict(cls, d: dict) -> "Part":
        return cls(**d)

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: its deep copy of every item took 0.5 s for the
        # built-in corpus's 1,762 files.
        return {
            "index": self.index,
            "source": self.source,
            "kind": self.kind,
            "items": [dict(item) for item in self.items],
            "bytes": self.bytes,
        }


@dataclass
class Segment:
    text: str
    new_document: bool  # the first segment of a document (it gets the EOT, the count)
    whole: bool  # the whole document (else a piece of one read in segments)
    digest: bytes | None = None  # the whole document's hash, for a piece in document mode


@dataclass
class Notes:
    """What reading a part found besides text: undecodable bytes per file, rows without
    text (corpus.RowCheck), cuts made where no token-safe byte was near. Merged over
    parts in plan order and reported once per source."""

    replaced: dict[str, list] = field(default_factory=dict)  # path -> [bytes replaced, encoding]
    rows: corpus.RowCheck = field(default_factory=corpus.RowCheck)
    unsafe_cuts: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Notes":
        """As a part record stores them (dataclasses.asdict)."""
        return cls(
            replaced=d["replaced"], rows=corpus.RowCheck(**d["rows"]), unsafe_cuts=d["unsafe_cuts"]
        )

    def count_replaced(self, path: str, n: int, encoding: str) -> None:
        self.replaced[path] = [self.replaced.get(path, [0])[0] + n, encoding]

    def merge(self, other: "Notes") -> None:
        for path, (n, encoding) in other.replaced.items():
            self.count_replaced(path, n, encoding)
        self.rows.merge(other.rows)
        self.unsafe_cuts += other.unsafe_cuts

    def report(self, field_name: str, warn: Warn) -> None:
        """One warning per file with replaced bytes and one for skipped rows; CorpusError
        when rows were read and none had text."""
        for path, (n, encoding) in self.replaced.items():
            warn(
                f"{path}: {n} undecodable byte{'s' * (n != 1)} (not {encoding}) "
                f"replaced with U+FFFD"
            )
        if self.unsafe_cuts:
            warn(
                f"{self.unsafe_cuts} cut(s) of very long lines were made where no "
                f"token-safe byte lay within {SAFE_CUT_WINDOW:,} bytes; the tokens at those "
                f"cuts may differ from tokenizing the line whole"
            )
        if self.rows.rows:
            self.rows.finish(field_name, warn)


# ----------------------------------------------------------------------------- planning


def plan(
    source: SourceConfig,
    source_index: int,
    download_dir: Path,
    part_bytes: int,
    segment_bytes: int,
    start_index: int = 0,
    warn: Warn = log.warn,
) -> list[Part]:
    """The parts of one source, numbered from `start_index`. Reads file sizes and a few
    bytes around cuts; hashes of long documents are added by `needs_digest`/`file_digest`."""
    planner = _Planner(source_index, part_bytes, start_index)
    if source.kind == "files" and source.clean == "gutenberg":
        _add_books(planner, corpus.resolve_files(source.paths), warn)
    elif source.kind == "files":
        for path in corpus.resolve_files(source.paths):
            planner.add_file(path, corpus.file_format(path))
    elif source.kind == "url":
        path = corpus.download(
            source.url, download_dir, source.sha256, source.max_download_bytes, warn
        )
        planner.add_file(path, "text")
    elif source.kind == "python-stdlib":
        files = corpus.stdlib_files(source.max_bytes)
        if not files:
            raise CorpusError(
                f"data.source.max_bytes={source.max_bytes} is smaller than the first "
                f"standard-library file; raise it (or set it to null for all ~30 MB)."
            )
        for path in files:
            planner.add_file(path, "text", corpus.source_encoding(path))
    else:
        planner.add_hf(source)
    return planner.finish()


def _add_books(planner: "_Planner", files: list[Path], warn: Warn) -> None:
    """clean: gutenberg: each file's book as a byte range (pipeline/data/gutenberg.py); a
    file that is not English text is dropped. Both kinds of exception are named."""
    dropped, unmarked = [], []
    for path in files:
        if corpus.file_format(path) != "text":
            raise CorpusError(
                f"data.source.clean: gutenberg reads Project Gutenberg's .txt books, but "
                f"{path} is {corpus.file_format(path)}; name only .txt files in "
                f"data.source.paths, or set data.source.clean to null"
            )
        book = gutenberg.read_book(path)
        if not book.english:
            dropped.append(f"{path} ({book.ascii_share:.0%} ASCII)")
            continue
        if not book.marked:
            unmarked.append(str(path))
        planner.add_file(path, "text", body=(book.start, book.stop))
    if dropped:
        warn(
            f"data.source.clean gutenberg: dropped {len(dropped)} of {len(files)} files as "
            f"not English text (not more than 90% of their characters ASCII): "
            f"{', '.join(dropped)}"
        )
    if unmarked:
        warn(
            f"data.source.clean gutenberg: {len(unmarked)} of {len(files)} files lack Project "
            f"Gutenberg's '*** START OF' or '*** END OF' line, and were kept from their "
            f"beginning or to their end: {', '.join(unmarked)}"
        )


class _Planner:
    def __init__(self, source_index: int, part_bytes: int, start_index: int):
        self.source, self.part_bytes = source_index, part_bytes
        self.parts: list[Part] = []
        self.next_index = start_index
        self.open: Part | None = None  # the part that small files are being grouped into

    def finish(self) -> list[Part]:
        self._close()
        return self.parts

    def add_file(
        self,
        path: Path,
        fmt: str,
        encoding: str = "utf-8-sig",
        body: tuple[int, int] | None = None,
    ) -> None:
        """`body`: a text file's document is only these bytes [first, last) of it."""
        size = path.stat().st_size
        first, last = body or (0, size)
        text = {"size": size, "encoding": encoding, **({"doc": [first, last]} if body else {})}
        if fmt == "parquet":
            self._add_parquet(path)
        elif fmt == "json":
            self._close()
            self._emit("json", [{"path": str(path)}], size)
        elif last - first > self.part_bytes and (fmt == "jsonl" or _cuttable(encoding)):
            self._close()
            for start, stop in _byte_ranges(path, first, last, self.part_bytes, fmt):
                item = {"path": str(path), "start": start, "stop": stop}
                if fmt == "text":
                    item.update(text)
                self._emit(fmt, [item], stop - start)
        else:
            item = {"path": str(path), "start": first, "stop": last}
            if fmt == "text":
                item.update(text)
            self._group(fmt, item, last - first)

    def _add_parquet(self, path: Path) -> None:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        for group in range(meta.num_row_groups):
            size = meta.row_group(group).total_byte_size
            if (
                self.open is not None
                and self.open.kind == "parquet"
                and self.open.items[-1]["path"] == str(path)
            ):
                self.open.items[-1]["row_groups"].append(group)
                self.open.bytes += size
                if self.open.bytes >= self.part_bytes:
                    self._close()
                continue
            self._group("parquet", {"path": str(path), "row_groups": [group]}, size)

    def add_hf(self, source: SourceConfig) -> None:
        ds = open_hf(source)
        shards = getattr(ds, "n_shards", None)  # a streamed (iterable) dataset
        if shards is None and hasattr(ds, "data"):  # one in memory: about part_bytes each
            shards = -(-int(ds.data.nbytes) // self.part_bytes)
        shards = max(1, shards or 1)
        for i in range(shards):
            self._emit("hf", [{"shard": i, "of": shards}], 0)

    def _group(self, kind: str, item: dict, size: int) -> None:
        if self.open is None or self.open.kind != kind:
            self._close()
            self.open = Part(self.next_index, self.source, kind, [], 0)
            self.next_index += 1
        self.open.items.append(item)
        self.open.bytes += size
        if self.open.bytes >= self.part_bytes:
            self._close()

    def _emit(self, kind: str, items: list[dict], size: int) -> None:
        self.parts.append(Part(self.next_index, self.source, kind, items, size))
        self.next_index += 1

    def _close(self) -> None:
        if self.open is not None:
            self.parts.append(self.open)
            self.open = None


def _cuttable(encoding: str) -> bool:
    """Whether a file in this encoding may be cut at ASCII bytes (they are then whole
    characters): UTF-8, and the single-byte encodings that extend ASCII."""
    name = codecs.lookup(encoding).name
    return name in ("utf-8", "utf-8-sig", "latin-1", "iso8859-1", "ascii") or name.startswith("cp")


def _byte_ranges(
    path: Path, first: int, last: int, part_bytes: int, fmt: str
) -> list[tuple[int, int]]:
    """[start, stop) ranges of about part_bytes covering bytes [first, last) of the file,
    each start a token-safe byte (text) or the byte after a newline (jsonl)."""
    cuts = [first]
    with open(path, "rb") as f:
        nominal = first + part_bytes
        while nominal < last:
            cut = _cut_after(f, nominal, last, fmt)
            if cut is None:  # no cut point in a whole window: the part grows past it
                nominal += SAFE_CUT_WINDOW
                continue
            if cut >= last:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            nominal = max(cut, nominal) + part_bytes
    return list(zip(cuts, cuts[1:] + [last]))


def _cut_after(f, offset: int, last: int, fmt: str) -> int | None:
    """The first cut point at or after `offset` and before `last`; None when there is none.
    A text file with no token-safe byte in SAFE_CUT_WINDOW is not cut there (the part
    grows instead): planning never makes an unsafe cut."""
    f.seek(offset)
    window = f.read(min(SAFE_CUT_WINDOW, last - offset))
    if fmt == "jsonl":
        at = window.find(b"\n")
        return None if at < 0 else offset + at + 1
    at = textcut.first_safe_cut(window, 1, len(window) - 1)
    return None if at is None else offset + at


def open_hf(source: SourceConfig):
    import datasets  # slow to import; only this kind needs it

    try:
        ds = datasets.load_dataset(
            source.path,
            source.name,
            split=source.split,
            streaming=source.streaming,
            revision=source.revision,
        )
    except Exception as e:  # datasets raises many types for unreadable input
        raise CorpusError(
            f"could not load the dataset {_hf_name(source)} ({type(e).__name__}: {e}). Check "
            f"data.source.path/name/split/revision; without network, use kind: files with "
            f"local jsonl/parquet files instead."
        ) from None
    columns = getattr(ds, "features", None)
    if columns is not None and source.text_field not in columns:
        raise CorpusError(
            f"{_hf_name(source)} has no column '{source.text_field}' (its columns: "
            f"{', '.join(columns)}); set data.source.text_field to the one that holds the text."
        )
    return ds


def _hf_name(source: SourceConfig) -> str:
    return (
        f"{source.path}"
        + (f" ({source.name})" if source.name else "")
        + (f" at revision {source.revision}" if source.revision else "")
        + f" split {source.split}"
    )


def continues(part: Part) -> bool:
    """Whether the part begins inside a document (a later byte range of a text file)."""
    return part.kind == "text" and part.items[0]["start"] > doc_range(part.items[0])[0]


def doc_range(item: dict) -> tuple[int, int]:
    """The bytes [first, last) of a text item's file that are its document: the whole file,
    or the part data.source.clean keeps (a Gutenberg book without its boilerplate)."""
    first, last = item.get("doc", (0, item["size"]))
    return first, last


def needs_digest(item: dict, segment_bytes: int) -> bool:
    """Whether a text item's document is read in pieces, a byte range or segments (so its
    split needs the hash of the whole file, computed once for the plan)."""
    return "size" in item and not _read_whole(item, segment_bytes)


def _read_whole(item: dict, segment_bytes: int) -> bool:
    first, last = doc_range(item)
    return item["start"] == first and item["stop"] == last and last - first <= segment_bytes


def file_digest(
    path: str, encoding: str, segment_bytes: int, first: int = 0, last: int | None = None
) -> str:
    """blake2b of a text file's decoded text, or of its bytes [first, last) (as UTF-8,
    surrogates passed), read in segments: the hash `split_of` would compute on the whole
    text."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    size = os.path.getsize(path)
    last = size if last is None else last
    item = {"path": path, "start": first, "stop": last, "size": size, "encoding": encoding}
    for text in _text_segments(item, segment_bytes, Notes()):
        digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading


def read(part: Part, source: SourceConfig, segment_bytes: int, notes: Notes) -> Iterator[Segment]:
    """The segments of a part, in order; what else it finds goes into `notes`."""
    readers: dict[str, Callable[[], Iterator[dict]]] = {
        "jsonl": lambda: _jsonl_rows(part.items, notes),
        "parquet": lambda: _parquet_rows(part.items, source.text_field, notes),
        "json": lambda: _json_rows(part.items, notes),
        "hf": lambda: _hf_rows(source, part.items[0], notes),
    }
    if part.kind == "text":
        yield from _read_text_items(part.items, segment_bytes, notes)
    else:
        yield from _rows_as_segments(readers[part.kind](), source.text_field, notes)


def _read_text_items(items: list[dict], segment_bytes: int, notes: Notes) -> Iterator[Segment]:
    for item in items:
        if _read_whole(item, segment_bytes):
            text = _decode_whole(item, notes)
            if text:
                yield Segment(text, True, True)
            continue
        digest = bytes.fromhex(item["digest"]) if item.get("digest") else None
        first = item["start"] == doc_range(item)[0]
        for text in _text_segments(item, segment_bytes, notes):
            if text:
                yield Segment(text, first, False, digest)
                first = False


def _decode_whole(item: dict, notes: Notes) -> str:
    with open(item["path"], "rb") as f:
        f.seek(item["start"])
        data = f.read(item["stop"] - item["start"])
    encoding = item["encoding"] if item["start"] == 0 else _without_bom(item["encoding"])
    text, replaced = corpus.decode(data, encoding)
    if replaced:
        notes.count_replaced(item["path"], replaced, item["encoding"])
    return text


def _text_segments(item: dict, segment_bytes: int, notes: Notes) -> Iterator[str]:
    """The text of bytes [start, stop) of a file in pieces of about segment_bytes, each cut
    at a token-safe byte. The incremental decoder carries its state across the cuts, so
    the pieces join to the text of decoding the range whole."""
    encoding = item["encoding"] if item["start"] == 0 else _without_bom(item["encoding"])
    decoder = codecs.getincrementaldecoder(encoding)(errors=corpus.COUNT_REPLACE)
    with open(item["path"], "rb") as f:
        f.seek(item["start"])
        left = item["stop"] - item["start"]
        pending = b""
        while left > 0 or pending:
            block = f.read(min(segment_bytes, left)) if left > 0 else b""
            if left > 0 and not block:
                raise CorpusError(
                    f"{item['path']} became shorter while it was read "
                    f"(expected {item['size']:,} bytes); rerun prepare"
                )
            left -= len(block)
            data = pending + block
            cut = len(data)
            if left > 0:
                cut = textcut.last_safe_cut(data, 1, len(data) - 1)
                if cut is None and len(data) < SAFE_CUT_WINDOW:
                    pending = data  # read on until a safe byte, or the window is full
                    continue
                if cut is None:
                    cut = len(data)
                    notes.unsafe_cuts += 1
            text, replaced = corpus.decode_more(decoder, data[:cut], final=left <= 0)
            if replaced:
                notes.count_replaced(item["path"], replaced, item["encoding"])
            yield text
            pending = data[cut:]


def _without_bom(encoding: str) -> str:
    return "utf-8" if codecs.lookup(encoding).name == "utf-8-sig" else encoding


def _rows_as_segments(rows: Iterator[dict], field_name: str, notes: Notes) -> Iterator[Segment]:
    for row in rows:
        text = notes.rows.text_of(row, field_name)
        if text:
            yield Segment(text, True, True)


def _jsonl_rows(items: list[dict], notes: Notes) -> Iterator[dict]:
    for item in items:
        _note_read(notes, item["path"])
        with open(item["path"], "rb") as f:
            f.seek(item["start"])
            offset = item["start"]
            while offset < item["stop"]:
                line = f.readline()
                if not line:
                    break
                at, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise CorpusError(
                        f"{item['path']}: the line at byte {at:,} is not JSON "
                        f"({e}); fix or remove it."
                    ) from None
                yield row if isinstance(row, dict) else {}


def _parquet_rows(items: list[dict], field_name: str, notes: Notes) -> Iterator[dict]:
    """Rows of the row groups, read in batches of the text column only (a skipped row
    names the file's other columns as the fields it has)."""
    import pyarrow.parquet as pq

    for item in items:
        _note_read(notes, item["path"])
        pf = pq.ParquetFile(item["path"])
        names = pf.schema_arrow.names
        if field_name not in names:
            raise CorpusError(
                f"{item['path']} has no column '{field_name}' (its columns: "
                f"{', '.join(names)}); set data.source.text_field to the one that holds the text."
            )
        others = dict.fromkeys((n for n in names if n != field_name), True)
        for batch in pf.iter_batches(
            batch_size=256, row_groups=item["row_groups"], columns=[field_name]
        ):
            for value in batch.column(0).to_pylist():
                yield (
                    {field_name: value} if isinstance(value, str) else {field_name: value, **others}
                )


def _json_rows(items: list[dict], notes: Notes) -> Iterator[dict]:
    for item in items:
        _note_read(notes, item["path"])
        yield from corpus.read_rows(corpus.load_files("json", [Path(item["path"])]), item["path"])


def _hf_rows(source: SourceConfig, item: dict, notes: Notes) -> Iterator[dict]:
    ds = open_hf(source)
    _note_read(notes, _hf_name(source))
    if item["of"] > 1:  # only datasets that have shards are cut into several parts
        ds = ds.shard(num_shards=item["of"], index=item["shard"], contiguous=True)
    yield from corpus.read_rows(ds, _hf_name(source))


def _note_read(notes: Notes, what: str) -> None:
    notes.rows.reading(what)


# ----------------------------------------------------------------------------- documents


def documents(
    source: SourceConfig,
    download_dir: str | os.PathLike,
    warn: Warn = log.warn,
    part_bytes: int = 1 << 30,
    segment_bytes: int = 1 << 24,
) -> Iterator[str]:
    """Every non-empty document of `source`, whole, in corpus order (at most
    max_documents). Raises CorpusError when the source names nothing readable or yields
    no text."""
    limit = document_limit(source)
    notes, count = Notes(), 0
    for part in plan(source, 0, Path(download_dir), part_bytes, segment_bytes, warn=warn):
        for doc in whole_documents(read(part, source, segment_bytes, notes)):
            count += 1
            yield doc
            if count == limit:  # stop before reading (or downloading) one more row
                break
        if count == limit:
            break
    notes.report(source.text_field, warn)
    if count == 0:
        raise empty_corpus(source)


def whole_documents(segments: Iterator[Segment]) -> Iterator[str]:
    """Segments joined back into documents. A document is yielded as soon as it is known
    to be complete: at once for a whole one, at the next document for a cut one."""
    pieces: list[str] = []
    for segment in segments:
        if segment.new_document and pieces:
            yield "".join(pieces)
            pieces = []
        if segment.whole:
            yield segment.text
        else:
            pieces.append(segment.text)
    if pieces:
        yield "".join(pieces)


def document_limit(source: SourceConfig) -> int | None:
    limit = source.max_documents if source.kind in ("files", "hf") else None
    if limit is not None and limit < 1:
        raise CorpusError(f"data.source.max_documents={limit}: it must be at least 1 (or null)")
    return limit


def empty_corpus(source: SourceConfig) -> CorpusError:
    return CorpusError(
        f"the corpus is empty: data.source ({corpus.summary(source)}) gave no text. "
        f"Point it at files that hold text, or check data.source.text_field."
    )
