"""Reading documents from every source kind, as an iterator of strings.

Owns `data.source`: which files, datasets or URLs make up a corpus, in which order,
and how their bytes become text. Four kinds:

- `files`: files, directories (searched recursively) or glob patterns. A `.txt` file
  (or any other explicitly named file) is one document; `.jsonl`/`.json`/`.parquet`
  hold one document per row in `text_field`, read through `datasets`' streaming loader,
  the same code path that streams a Hub dataset.
- `hf`: a Hugging Face dataset by path, config name and split, streamed by default.
- `url`: a text file downloaded once into the data directory (atomically), then one document.
- `python-stdlib`: the built-in sample that needs no network: the `.py` sources of the
  running Python's standard library (not site-packages), sorted by path, optionally
  capped at `max_bytes`.

Bytes that are not valid in their encoding are replaced by U+FFFD and reported per file
through `warn`, never dropped silently. Empty documents are skipped; a source with no
files or no text at all raises `CorpusError` saying what to change.

Knows nothing about tokens, splits or shards.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import os
import platform
import sys
import sysconfig
import threading
import tokenize
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.config import SOURCE_KEYS, SourceConfig
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_open

TEXT_EXTS = (".txt",)
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
KNOWN_EXTS = TEXT_EXTS + JSON_EXTS + PARQUET_EXTS
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

Warn = Callable[[str], None]


class CorpusError(PipelineError):
    """A source that names no readable files or holds no text."""


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- public


def describe(source: SourceConfig) -> dict:
    """The keys that define this source's documents (used in the prepare fingerprint)."""
    desc = {"kind": source.kind}
    desc.update({k: getattr(source, k) for k in sorted(SOURCE_KEYS[source.kind])})
    if source.kind == "python-stdlib":
        # Another Python has another standard library: other documents.
        desc["python"] = platform.python_version()
    return desc


def documents(source: SourceConfig, download_dir: str | os.PathLike,
              warn: Warn = print_warning) -> Iterator[str]:
    """Every non-empty document of `source`, in a fixed order.

    `download_dir` is where kind=url keeps its download. Raises CorpusError when the
    source names nothing readable or yields no text.
    """
    readers = {
        "files": lambda: _from_files(source, warn),
        "hf": lambda: _from_hf(source),
        "url": lambda: _from_url(source.url, Path(download_dir), warn),
        "python-stdlib": lambda: _from_stdlib(source.max_bytes, warn),
    }
    limit = source.max_documents if source.kind in ("files", "hf") else None
    if limit is not None and limit < 1:
        raise CorpusError(f"data.source.max_documents={limit}: it must be at least 1 (or null)")
    count = 0
    for doc in readers[source.kind]():
        if doc:
            count += 1
            yield doc
            if count == limit:  # stop before reading (or downloading) one more row
                return
    if count == 0:
        raise CorpusError(
            f"the corpus is empty: data.source ({_summary(source)}) gave no text. "
            f"Point it at files that hold text, or check data.source.text_field.")


# ----------------------------------------------------------------------------- decoding

_counter = threading.local()


def _count_and_replace(err: UnicodeDecodeError):
    _counter.replaced += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("pipeline-count-replace", _count_and_replace)


def decode(data: bytes, encoding: str = "utf-8") -> tuple[str, int]:
    """Text of `data`, and how many bytes were invalid and replaced by U+FFFD."""
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        pass
    _counter.replaced = 0
    text = data.decode(encoding, errors="pipeline-count-replace")
    return text, _counter.replaced


def _read_text(path: Path, warn: Warn, encoding: str = "utf-8-sig") -> str:
    text, replaced = decode(path.read_bytes(), encoding)
    if replaced:
        warn(f"{path}: {replaced} undecodable byte{'s' * (replaced != 1)} "
             f"(not {encoding}) replaced with U+FFFD")
    return text


# ----------------------------------------------------------------------------- files


def resolve_files(patterns: Iterable[str]) -> list[Path]:
    """The files that `data.source.paths` names, in order: each entry's matches sorted."""
    files: dict[Path, None] = {}  # ordered, and each file once however often it is named
    for pattern in patterns:
        matches = _expand(pattern)
        if not matches:
            raise CorpusError(
                f"data.source.paths entry '{pattern}' matches no file "
                f"(looked from {Path.cwd()}; directories are searched for "
                f"{', '.join(KNOWN_EXTS)}). Fix the path or the pattern.")
        files.update(dict.fromkeys(matches))
    return list(files)


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        return [f for p in found for f in ([p] if p.is_file() else _in_directory(p))]
    if path.is_dir():
        return _in_directory(path)
    return [path] if path.is_file() else []


def _in_directory(directory: Path) -> list[Path]:
    return sorted((p for p in directory.rglob("*")
                   if p.is_file() and p.suffix.lower() in KNOWN_EXTS),
                  key=lambda p: p.as_posix())


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    return "json" if suffix in JSON_EXTS else "parquet" if suffix in PARQUET_EXTS else "text"


def _from_files(source: SourceConfig, warn: Warn) -> Iterator[str]:
    files = resolve_files(source.paths)
    # Consecutive files of one format go to `datasets` together: one loader, many files.
    group: list[Path] = []
    for path in files + [None]:
        if group and (path is None or _format(path) != _format(group[0])):
            yield from _rows_text(_load_files(_format(group[0]), group), source.text_field,
                                  ", ".join(map(str, group)))
            group = []
        if path is None:
            break
        if _format(path) == "text":
            yield _read_text(path, warn)
        else:
            group.append(path)


def _load_files(builder: str, files: list[Path]):
    import datasets  # imported here: it is slow to import and only these kinds need it
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files],
                                     split="train", streaming=True)
    except Exception as e:  # datasets raises many types for unreadable input
        raise CorpusError(f"could not open {', '.join(map(str, files))} as {builder} "
                          f"({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- hf


def _from_hf(source: SourceConfig) -> Iterator[str]:
    import datasets
    what = f"{source.path}" + (f" ({source.name})" if source.name else "") + f" split {source.split}"
    try:
        ds = datasets.load_dataset(source.path, source.name, split=source.split,
                                   streaming=source.streaming)
    except Exception as e:
        raise CorpusError(
            f"could not load the dataset {what} ({type(e).__name__}: {e}). Check "
            f"data.source.path/name/split; without network, use kind: files with local "
            f"jsonl/parquet files instead.") from None
    return _rows_text(ds, source.text_field, what)


def _rows_text(rows, field: str, what: str) -> Iterator[str]:
    """The `field` of every row; datasets' read errors become CorpusError naming `what`."""
    it = iter(rows)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise CorpusError(f"could not read {what} ({type(e).__name__}: {e})") from None
        if field not in row:
            raise CorpusError(
                f"{what} has no column '{field}' (its columns: {', '.join(row)}); "
                f"set data.source.text_field to the one that holds the text.")
        text = row[field]
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"column '{field}' of {what} holds {type(text).__name__}, "
                              f"not text; set data.source.text_field to a text column.")
        yield text or ""


# ----------------------------------------------------------------------------- url


def download(url: str, directory: Path) -> Path:
    """The file at `url`, fetched once into `directory` (atomically) and reused after."""
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    # The URL's hash in the name: two URLs ending in the same file name never collide.
    target = directory / f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_open(target) as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CorpusError(
            f"could not download data.source.url {url} ({e}). Check the address, or "
            f"download the file yourself and use kind: files with paths: [that file].") from None
    return target


def _from_url(url: str, directory: Path, warn: Warn) -> Iterator[str]:
    yield _read_text(download(url, directory), warn)


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


def _from_stdlib(max_bytes: int | None, warn: Warn) -> Iterator[str]:
    files = stdlib_files(max_bytes)
    if not files:
        raise CorpusError(
            f"data.source.max_bytes={max_bytes} is smaller than the first standard-library "
            f"file; raise it (or set it to null for all ~30 MB).")
    for path in files:
        yield _read_text(path, warn, _source_encoding(path))


def _source_encoding(path: Path) -> str:
    """The encoding a .py file declares (PEP 263); utf-8 where the declaration is broken,
    as in the standard library's own tests of bad declarations."""
    with open(path, "rb") as f:
        try:
            return tokenize.detect_encoding(f.readline)[0]
        except SyntaxError:
            return "utf-8"


def _summary(source: SourceConfig) -> str:
    return ", ".join(f"{k}: {v}" for k, v in describe(source).items())


__all__ = ["CorpusError", "describe", "documents", "decode", "download", "resolve_files",
           "stdlib_files", "print_warning"]
