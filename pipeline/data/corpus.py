"""The source kinds: which files, datasets or URLs a corpus names, and how bytes become text.

Owns `data.source`: which files, datasets or URLs make up a corpus, in which order,
and how their bytes become text. Four kinds:

- `files`: files, directories (searched recursively) or glob patterns. A `.txt` file
  (or any other explicitly named file) is one document; `.jsonl`/`.json`/`.parquet`
  hold one document per row in `text_field` (`.jsonl` lines and parquet row groups are
  read directly, so parts of one file can be read apart; `.json` through `datasets`).
  With `clean: gutenberg` each `.txt` file is a Project Gutenberg book: its document is
  the text between the START and END lines, and files that are not English text are
  dropped and named (pipeline/data/gutenberg.py; applied where parts are planned).
- `hf`: a Hugging Face dataset by path, config name, split and revision, streamed by default.
- `url`: a text file downloaded once into the data directory (atomically, checked against
  `sha256` when given, stopped past `max_download_bytes`), then one document.
- `python-stdlib`: the built-in sample that needs no network: the `.py` sources of the
  running Python's standard library (not site-packages), sorted by path, optionally
  capped at `max_bytes`.

Bytes that are not valid in their encoding are replaced by U+FFFD and reported per file
through `warn`, never dropped silently. So are rows without text in `text_field`: they
are skipped and counted in one warning per source. Empty documents are skipped; a source
with no files or no text at all raises `CorpusError` saying what to change.

How a source is cut into parts and read part by part is pipeline/data/parts.py's. Knows
nothing about tokens, splits or shards.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import http.client
import os
import platform
import sysconfig
import threading
import tokenize
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.core import log
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import atomic_open, file_sha256
from pipeline.data.config import SOURCE_KEYS, SourceConfig

TEXT_EXTS = (".txt",)
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
KNOWN_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

Warn = Callable[[str], None]


class CorpusError(PipelineError):
    """A source that names no readable files or holds no text."""


# ----------------------------------------------------------------------------- public


# A download limit decides only whether a download succeeds, never which bytes it gives:
# not part of what defines the documents.
NOT_CONTENT_KEYS = {"max_download_bytes"}
# Left out while null: such a source is the one it was before these keys existed, so data
# prepared then keeps its fingerprint.
LEFT_OUT_WHEN_NULL = {"sha256", "revision", "clean"}


def describe(source: SourceConfig) -> dict:
    """The keys that define this source's documents (used in the prepare fingerprint)."""
    desc = {"kind": source.kind}
    for key in sorted(SOURCE_KEYS[source.kind] - NOT_CONTENT_KEYS):
        value = getattr(source, key)
        if value is None and key in LEFT_OUT_WHEN_NULL:
            continue
        desc[key] = value.lower() if key == "sha256" else value
    if source.kind == "python-stdlib":
        # Another Python has another standard library: other documents.
        desc["python"] = platform.python_version()
    return desc


# ----------------------------------------------------------------------------- decoding

_counter = threading.local()


def _count_and_replace(err: UnicodeDecodeError):
    _counter.replaced += err.end - err.start
    return "\ufffd", err.end


COUNT_REPLACE = "pipeline-count-replace"
codecs.register_error(COUNT_REPLACE, _count_and_replace)


def decode(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Text of `data`, and how many bytes were invalid and replaced by U+FFFD."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        pass
    _counter.replaced = 0
    text = data.decode(encoding, errors=COUNT_REPLACE)
    return text, _counter.replaced


def decode_more(decoder: codecs.IncrementalDecoder, data: bytes, final: bool) -> tuple[str, int]:
    """The next text of an incremental decoder made with errors=COUNT_REPLACE, and how
    many bytes it replaced."""
    _counter.replaced = 0
    text = decoder.decode(data, final=final)
    return text, _counter.replaced


# ----------------------------------------------------------------------------- files


def resolve_files(patterns: Iterable[str]) -> list[Path]:
    """The files that `data.source.paths` names, in order: each entry's matches sorted."""
    # Ordered, and each file once however often it is named: by its real path, so a
    # symlink loop under a ** glob (dir/link -> dir) cannot read one file 40 times into
    # both splits.
    files: dict[Path, Path] = {}
    for pattern in patterns:
        matches = _expand(pattern)
        if not matches:
            raise CorpusError(
                f"data.source.paths entry '{pattern}' matches no file "
                f"(looked from {Path.cwd()}; directories are searched for "
                f"{', '.join(KNOWN_EXTS)}). Fix the path or the pattern."
            )
        for match in matches:
            files.setdefault(match.resolve(), match)
    return list(files.values())


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        return [f for p in found for f in ([p] if p.is_file() else _in_directory(p))]
    if path.is_dir():
        return _in_directory(path)
    return [path] if path.is_file() else []


def _in_directory(directory: Path) -> list[Path]:
    return sorted(
        (p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN_EXTS),
        key=lambda p: p.as_posix(),
    )


def file_format(path: Path) -> str:
    """How a file of `data.source.paths` is read: text (one document), jsonl, json or
    parquet (one document per row)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    return "json" if suffix in JSON_EXTS else "parquet" if suffix in PARQUET_EXTS else "text"


def load_files(builder: str, files: list[Path]):
    """`datasets`' streaming loader over local files."""
    import datasets  # imported here: it is slow to import and only these kinds need it

    try:
        return datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True
        )
    except Exception as e:  # datasets raises many types for unreadable input
        raise CorpusError(
            f"could not open {', '.join(map(str, files))} as {builder} ({type(e).__name__}: {e})"
        ) from None


def read_rows(rows, what: str) -> Iterator[dict]:
    """Every row; datasets' read errors become CorpusError naming `what`."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CorpusError(f"could not read {what} ({type(e).__name__}: {e})") from None
        yield row


@dataclass
class RowCheck:
    """The rows of one source whose text field is missing, null or not text, counted
    where they are read (`text_of`) and merged over the parts of the source.

    They are skipped, but never silently: `finish` warns once per source how many, and
    raises CorpusError naming the fields the rows do have when no row had text."""

    rows: int = 0
    missing: int = 0  # rows without the field or with null (datasets reads both as None)
    not_text: dict[str, int] = field(default_factory=dict)  # type name -> rows
    fields: list[str] = field(default_factory=list)  # the fields the skipped rows do have
    read: list[str] = field(default_factory=list)  # what was read, for the messages

    def text_of(self, row: dict, field_name: str) -> str | None:
        """The row's text, counted; None (and the reason counted) when it has none."""
        self.rows += 1
        value = row.get(field_name)
        if isinstance(value, str):
            return value
        if value is None:
            self.missing += 1
        else:
            name = type(value).__name__
            self.not_text[name] = self.not_text.get(name, 0) + 1
        new = {k for k, v in row.items() if v is not None and k != field_name}
        if not new <= set(self.fields):
            self.fields = sorted(set(self.fields) | new)
        return None

    def reading(self, what: str) -> None:
        if what not in self.read:
            self.read.append(what)

    def merge(self, other: "RowCheck") -> None:
        self.rows += other.rows
        self.missing += other.missing
        for name, n in other.not_text.items():
            self.not_text[name] = self.not_text.get(name, 0) + n
        self.fields = sorted(set(self.fields) | set(other.fields))
        for what in other.read:
            self.reading(what)

    def finish(self, field_name: str, warn: Warn) -> None:
        skipped = self.missing + sum(self.not_text.values())
        if skipped and skipped < self.rows:
            warn(self._skipped_message(field_name))
        elif skipped:
            raise self._no_text_error(field_name)

    def _skipped_message(self, field_name: str) -> str:
        of = f"of {self.rows:,} rows of {_some(self.read)}"
        parts = []
        if self.missing:
            parts.append(f"{self.missing:,} {of} had no '{field_name}' field (or a null one)")
        if self.not_text:
            parts.append(
                f"{sum(self.not_text.values()):,} {of} held "
                f"{_types(self.not_text)}, not text, in '{field_name}'"
            )
        return "; ".join(parts) + "; they were skipped"

    def _no_text_error(self, field_name: str) -> CorpusError:
        where = f"{_some(self.read)} ({self.rows:,} rows)"
        if self.not_text:
            return CorpusError(
                f"no row of {where} has text in '{field_name}': it holds "
                f"{_types(self.not_text)} where it is not null; set data.source.text_field "
                f"to a text column."
            )
        return CorpusError(
            f"no row of {where} has a '{field_name}' field (the fields the rows have: "
            f"{', '.join(sorted(self.fields)) or 'none'}); set data.source.text_field to "
            f"the one that holds the text."
        )


def _types(counts: dict[str, int]) -> str:
    return " or ".join(name for name, _ in Counter(counts).most_common())


def _some(names: list[str], shown: int = 3) -> str:
    """`names` for a message: the first few, and how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more:,} more" if more > 0 else "")


# ----------------------------------------------------------------------------- url


def download(
    url: str,
    directory: Path,
    sha256: str | None = None,
    max_bytes: int | None = None,
    warn: Warn = log.warn,
) -> Path:
    """The file at `url`, fetched once into `directory` and reused after.

    With `sha256`, a download must have that hash, and a cached copy is checked again
    before each reuse (hashing reads it once: about a second per GB), so a damaged or
    replaced copy is fetched anew. A download past `max_bytes` stops. A failed download
    leaves nothing behind, and never touches the cached copy."""
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    # The URL's hash in the name: two URLs ending in the same file name never collide.
    target = directory / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
    stale = ""
    if target.is_file():
        if not sha256:
            return target
        actual = file_sha256(target)
        if actual == sha256.lower():
            return target
        stale = f"the cached {target} has sha256 {actual}, not data.source.sha256 {sha256.lower()}"
        warn(f"{stale}: downloading it again")
    try:
        _fetch(url, target, sha256, max_bytes)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise CorpusError(
            f"could not download data.source.url {url} ({e})"
            + (f"; {stale}" if stale else "")
            + ". Check the address, or download the file yourself and use kind: files with "
            "paths: [that file]."
        ) from None
    return target


def _fetch(url: str, target: Path, sha256: str | None, max_bytes: int | None) -> None:
    """Stream `url` to a temporary name beside `target`, renamed onto it only once the
    whole file is there and, with `sha256`, has that hash (atomic_open deletes the
    temporary file when a check below raises)."""
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=60) as response:
        _check_size(url, int(response.headers.get("Content-Length") or 0), max_bytes)
        with atomic_open(target) as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                size += len(block)
                _check_size(url, size, max_bytes)  # a server may send no length, or lie
                digest.update(block)
                f.write(block)
            if sha256 and digest.hexdigest() != sha256.lower():
                raise CorpusError(
                    f"the download of {url} has sha256 {digest.hexdigest()}, but "
                    f"data.source.sha256 expects {sha256.lower()}; it was deleted, and no "
                    f"cached copy was changed. Check the URL, or set data.source.sha256 to "
                    f"the new hash if the file changed on purpose."
                )


def _check_size(url: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise CorpusError(
            f"data.source.url {url} is larger than data.source.max_download_bytes "
            f"({max_bytes:,} bytes); the download was stopped and deleted. If this is the "
            f"right file, raise data.source.max_download_bytes (or set it to null)."
        )


# ----------------------------------------------------------------------------- stdlib


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files sorted by relative path, the first ones whose
    sizes add up to at most `max_bytes` (all when None)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_SKIP_DIRS]
        found.extend(Path(directory, n) for n in names if n.endswith(".py"))
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return found
    chosen, total = [], 0
    for path in found:
        total += path.stat().st_size
        if total > max_bytes:
            break
        chosen.append(path)
    return chosen


def source_encoding(path: Path) -> str:
    """The encoding a .py file declares (PEP 263); utf-8 where the declaration is broken,
    as in the standard library's own tests of bad declarations."""
    with open(path, "rb") as f:
        try:
            return tokenize.detect_encoding(f.readline)[0]
        except SyntaxError:
            return "utf-8"


def summary(source: SourceConfig) -> str:
    return ", ".join(f"{k}: {v}" for k, v in describe(source).items())


__all__ = [
    "CorpusError",
    "RowCheck",
    "describe",
    "decode",
    "decode_more",
    "download",
    "file_format",
    "load_files",
    "read_rows",
    "resolve_files",
    "source_encoding",
    "stdlib_files",
    "summary",
]
