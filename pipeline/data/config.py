"""The `data:` section of the config: where the documents come from (one source or a
weighted mixture) and how they are cut into shards. Declared here, beside the code that
reads it; a new source kind adds its keys to SourceConfig and SOURCE_KEYS.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.core.schema import Section, check, setting

# The keys that mean something for each source kind (besides `kind`).
SOURCE_KEYS = {
    "files": {"paths", "text_field", "max_documents", "clean"},
    "hf": {"path", "name", "split", "revision", "text_field", "streaming", "max_documents"},
    "url": {"url", "sha256", "max_download_bytes"},
    "python-stdlib": {"max_bytes"},
}
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


@dataclass
class SourceConfig(Section):
    """Where the documents come from. Which keys apply depends on `kind`."""

    SECTION = "data.source."

    kind: Literal["files", "hf", "url", "python-stdlib"] = setting(
        "python-stdlib",
        "files: your files | hf: a Hugging Face dataset | url: one text file "
        "downloaded | python-stdlib: this Python's standard library, no network",
    )
    paths: list[str] = setting(
        help="files: files, directories or glob patterns (.txt, .jsonl, .json, .parquet)",
        default_factory=list,
    )
    text_field: str = setting(
        "text", "files (jsonl/parquet) and hf: the column that holds the text"
    )
    path: str = setting("", "hf: dataset path on the Hub (e.g. HuggingFaceFW/fineweb-edu)")
    name: Optional[str] = setting(None, "hf: the dataset's config name")
    split: str = setting("train", "hf: the split to read")
    streaming: bool = setting(True, "hf: stream the dataset instead of downloading it whole")
    revision: Optional[str] = setting(
        None, "hf: the dataset's git revision (branch, tag or commit; null: the default branch)"
    )
    max_documents: Optional[int] = setting(
        None, "files and hf: stop after this many documents (null: all)"
    )
    clean: Optional[Literal["gutenberg"]] = setting(
        None,
        "files (.txt): gutenberg: each file is a Project Gutenberg book: only the text "
        "between its '*** START OF' and '*** END OF' lines is kept, and a file whose "
        "characters are not more than 90% ASCII (not English text) is dropped, named in "
        "prepare's report; null: files as they are",
    )
    url: str = setting("", "url: a text file, downloaded once into the data directory")
    sha256: Optional[str] = setting(
        None,
        "url: the file's sha256 (64 hex digits), checked "
        "after every download and on reuse of a cached one "
        "(null: not checked)",
    )
    max_download_bytes: Optional[int] = setting(
        4 * 2**30,
        "url: a download past this many bytes is stopped and deleted (null: no "
        "limit). The file is read whole into memory as one document; the limit "
        "keeps a wrong URL (an archive, a stream that never ends) from filling the "
        "disk first.",
    )
    max_bytes: Optional[int] = setting(
        None, "python-stdlib: stop after this many bytes of source (null: all of it)"
    )

    def __post_init__(self) -> None:
        stray = sorted(
            name
            for name, default in _defaults(SourceConfig).items()
            if name != "kind"
            and getattr(self, name) != default
            and name not in SOURCE_KEYS[self.kind]
        )
        check(
            not stray,
            f"{self.key(stray[0]) if stray else ''} does not apply to kind "
            f"'{self.kind}'; its keys are: "
            f"{', '.join(sorted(SOURCE_KEYS[self.kind]))}",
        )
        check(
            self.kind != "files" or bool(self.paths),
            f"{self.key('paths')} is empty: name files, directories or globs",
        )
        check(
            self.kind != "hf" or bool(self.path),
            f"{self.key('path')} is empty: name a dataset, e.g. HuggingFaceFW/fineweb-edu",
        )
        check(self.kind != "url" or bool(self.url), f"{self.key('url')} is empty")
        self.require_positive("max_documents", "max_bytes", nullable="null for all")
        self.require(
            self.max_download_bytes is None or self.max_download_bytes > 0,
            "max_download_bytes",
            "a positive number of bytes, or null for no limit",
        )
        self.require(
            self.sha256 is None or bool(re.fullmatch("[0-9a-fA-F]{64}", self.sha256)),
            "sha256",
            "64 hexadecimal digits (as sha256sum prints them), or null",
        )
        self.require(
            self.revision is None or bool(self.revision.strip()),
            "revision",
            "a branch, tag or commit of the dataset, or null for the default",
        )

    def is_default(self) -> bool:
        return all(
            getattr(self, name) == default for name, default in _defaults(SourceConfig).items()
        )


def _defaults(cls) -> dict:
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


@dataclass
class WeightedSource(Section):
    """One source of a mixture: its documents, a name, and its share of training samples."""

    SECTION = "data.sources[]."

    name: str = setting("", "names its shards' directory (data/<name>/<this>/) and its metrics")
    weight: float = setting(1.0, "relative share of the training samples drawn from it")
    source: SourceConfig = setting(
        help="where its documents come from", default_factory=SourceConfig
    )

    def __post_init__(self) -> None:
        self.require(
            bool(SOURCE_NAME.match(self.name)),
            "name",
            "a short plain name (letters, digits, '_' and '-'): it names the source's "
            "shard directory and its metrics",
        )
        self.require(
            math.isfinite(self.weight) and self.weight > 0,
            "weight",
            "a positive number (weights are relative; they need not sum to 1)",
        )


@dataclass
class DataConfig(Section):
    SECTION = "data."

    name: str = setting("python-stdlib", "prepared data lives in <root>/<name>/")
    root: str = setting("data", "parent directory of all prepared data sets")
    source: SourceConfig = setting(
        help="where the documents come from", default_factory=SourceConfig
    )
    val_fraction: float = setting(0.1, "share of documents (or of characters) held out")
    split_by: Literal["document", "text"] = setting(
        "document",
        "document: each document goes to val with probability val_fraction (by "
        "its hash); text: the whole corpus is one text cut at 1 - val_fraction, "
        "as the book does",
    )
    shard_tokens: int = setting(100_000_000, "most tokens in one shard file")
    num_workers: Optional[int] = setting(None, "tokenizer processes (null: all cores)")
    part_bytes: int = setting(
        4_000_000,
        "the unit of work and of resume: the corpus is cut into parts of about "
        "this many bytes (whole small files, ranges of big ones), each read, "
        "tokenized and committed by one worker. Changes no byte of the data set.",
    )
    segment_bytes: int = setting(
        1_000_000,
        "a document longer than this is read and tokenized in pieces of about "
        "this size, cut where no token changes: what bounds a worker's memory. "
        "Changes no byte either.",
    )
    sources: list[WeightedSource] = setting(
        help="a weighted mixture instead of data.source: a list of {name, weight, source}. "
        "Each source gets its own shards; train draws each sample from a source by the "
        "weights.",
        default_factory=list,
    )

    def __post_init__(self) -> None:
        self.require(0 < self.val_fraction < 1, "val_fraction", "between 0 and 1")
        self.require_positive("shard_tokens")
        self.require(self.part_bytes > 0, "part_bytes", "a positive number of bytes")
        self.require(self.segment_bytes >= 4096, "segment_bytes", "at least 4096 bytes")
        self.require(
            self.num_workers is None or self.num_workers >= 1,
            "num_workers",
            "at least 1, or null for all cores",
        )
        if self.sources:
            check(
                self.source.is_default(),
                "data.source and data.sources are both set: a data set has either one "
                "source (data.source) or a weighted mixture (data.sources); move "
                "data.source into the list, or clear it (data.source: null, or the override "
                "data.source=null)",
            )
            names = [entry.name for entry in self.sources]
            check(
                len(set(names)) == len(names),
                f"{self.key('sources')} names={names!r} is not allowed: it must be distinct names",
            )
