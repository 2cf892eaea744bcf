"""Stage 1, `python -m pipeline.prepare --config CONFIG [key=value ...] [--force]`:
corpus -> GPT-2 tokens -> train/val shards + manifest.json in `data/<data.name>/`.

Owns the layout of the token stream:

- `split_by: document` (default). A document goes to val when a hash of its text falls
  below `val_fraction`, else to train: the split depends on nothing but the text (not on
  order, worker count or chunking), and duplicates never straddle the split. Every
  document is preceded by <|endoftext|> (50256), as llm.c's and nanoGPT's FineWeb
  scripts do, so each shard begins at a document boundary marker and no window
  crosses from one document into the next without seeing EOT.
- `split_by: text`. The documents joined by EOT are one text (the separators count no
  characters); it is cut at character int((1 - val_fraction) * length), exactly as the
  book does (`train_data = text[:split_idx]`, `val_data = text[split_idx:]`), and each
  side is encoded on its own. No EOT is added at the start of either side, so for a
  single document (the book's the-verdict.txt) the shards hold exactly the book's
  tokens. This mode reads the corpus twice (once to count characters), and the
  document the cut divides counts as a document of both splits.

Documents are tokenized in parallel (`data.num_workers` processes, default all cores),
in chunks whose results are taken back in order: the bytes never depend on the number
of workers. Tokens stream into shards of at most `data.shard_tokens` (a document may
continue in the next shard, as in llm.c), so memory stays bounded whatever the corpus
size. Every shard is written atomically and `manifest.json` last; a directory without
a manifest is an interrupted run, cleaned and redone.

Knows the corpus only as an iterator of strings (corpus.py) and the bytes of a shard
only through shards.py.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from pipeline import corpus, locking
from pipeline.config import Config, load_config
from pipeline.errors import PipelineError, cli_main
from pipeline.fileio import fsync_dir
from pipeline.keys import add_config_arguments, parse_stage_args
from pipeline.loader import windows_per_shard
from pipeline.shards import (MANIFEST, SPLITS, DataError, Manifest, ShardInfo, check_shards,
                             load_manifest, manifest_path, remember_verified, shard_name,
                             token_dtype, write_shard)
from pipeline.tokenizer import ENCODING_NAME, EOT_ID, VOCAB_SIZE, get_tokenizer

TRAIN, VAL = 0, 1  # indices into SPLITS
DTYPE = token_dtype(VOCAB_SIZE)
CHUNK_CHARS = 1 << 19  # characters per task sent to a worker: small enough to balance load
# The token-stream layout above; a change of it must change the fingerprint.
LAYOUT = {"document": "eot before each document", "text": "eot between documents"}

Piece = tuple[int, str, bool]  # (split, text, whether an EOT goes before it)


class PrepareError(PipelineError):
    """Settings or a corpus that cannot make a usable data set."""


# ----------------------------------------------------------------------------- the split


def split_of(text: str, val_fraction: float) -> int:
    """VAL when the document's hash, read as a number in [0, 1), is below val_fraction."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return VAL if int.from_bytes(digest, "big") / 2**64 < val_fraction else TRAIN


def pieces_by_document(docs: Iterable[str], val_fraction: float) -> Iterator[Piece]:
    for doc in docs:
        yield split_of(doc, val_fraction), doc, True


def pieces_by_text(make_docs: Callable[[], Iterable[str]], val_fraction: float) -> Iterator[Piece]:
    """The corpus as one text cut at int((1 - val_fraction) * characters), as the book does."""
    total = sum(len(doc) for doc in make_docs())
    cut = int((1 - val_fraction) * total)
    pos = 0
    for doc in make_docs():
        end = pos + len(doc)
        if end <= cut:
            yield TRAIN, doc, pos > 0
        elif pos >= cut:
            yield VAL, doc, pos > cut  # val is text[cut:]: no EOT before its first character
        else:
            yield TRAIN, doc[:cut - pos], pos > 0
            yield VAL, doc[cut - pos:], False
        pos = end


# ----------------------------------------------------------------------------- tokenizing


def chunks(pieces: Iterable[Piece], chars: int = CHUNK_CHARS) -> Iterator[list[Piece]]:
    chunk, size = [], 0
    for piece in pieces:
        chunk.append(piece)
        size += len(piece[1])
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk: list[Piece]) -> tuple[list[np.ndarray], list[int]]:
    """Tokens of a chunk per split, and how many pieces went to each split."""
    enc = get_tokenizer()
    tokens: list[list[int]] = [[] for _ in SPLITS]
    counts = [0] * len(SPLITS)
    for split, text, eot in chunk:
        if eot:
            tokens[split].append(EOT_ID)
        tokens[split].extend(enc.encode_ordinary(text))
        counts[split] += 1
    return [np.array(t, dtype=DTYPE) for t in tokens], counts


def worker_pool(workers: int):
    """A process pool for `ordered_map`, or None for one worker (no processes at all).

    Made before any corpus reading or progress bar starts: on Linux it forks, which is
    instant and hands the loaded tokenizer to the workers, and at that point no other
    thread (datasets' readers, tqdm's monitor) exists whose locks a child could inherit
    mid-use. Elsewhere it spawns, as fork is unsafe there.
    """
    if workers <= 1:
        return None
    method = "fork" if sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_leave_ctrl_c_to_main)


def _leave_ctrl_c_to_main() -> None:
    """Ctrl-C reaches the whole process group; the main process alone answers it (and
    ends the pool), so the terminal shows one line, not a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(func, items: Iterable, pool, workers: int) -> Iterator:
    """`map(func, items)` over the pool, results in input order. Only a few items are in
    flight at once, so a large corpus is never read ahead into memory (Pool.imap would
    consume its whole input)."""
    if pool is None:
        yield from map(func, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= 2 * workers + 1:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` (the last shorter)."""

    def __init__(self, data_dir: Path, split: str, shard_tokens: int):
        self.data_dir, self.split, self.shard_tokens = data_dir, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[ShardInfo] = []

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        if self.buffered < self.shard_tokens:
            return
        stream = np.concatenate(self.buffer)
        full = len(stream) - len(stream) % self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(stream[start:start + self.shard_tokens])
        self.buffer = [stream[full:]]
        self.buffered = len(stream) - full

    def close(self) -> list[ShardInfo]:
        if self.buffered:
            self._write(np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = shard_name(self.split, len(self.shards))
        sha = write_shard(self.data_dir / name, tokens, DTYPE)
        self.shards.append(ShardInfo(file=name, tokens=len(tokens), sha256=sha))


# ----------------------------------------------------------------------------- idempotence


def fingerprint(config: Config) -> dict:
    """Everything that changes the bytes of the shards (not num_workers, not paths)."""
    d = config.data
    return {"source": corpus.describe(d.source),
            "settings": {"split_by": d.split_by, "val_fraction": d.val_fraction,
                         "shard_tokens": d.shard_tokens, "layout": LAYOUT[d.split_by],
                         "tokenizer": ENCODING_NAME}}


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for section, prefix in (("source", "data.source."), ("settings", "data.")):
        a, b = old.get(section, {}), new[section]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{prefix}{key} was {a.get(key)!r}, now {b.get(key)!r}")
    return diffs


def _intact(data_dir: Path, manifest: Manifest) -> str | None:
    """None when every shard of the manifest is there with its bytes and ids; else why not."""
    infos = [s for shards in manifest.splits.values() for s in shards]
    try:
        check_shards(data_dir, manifest, infos)
    except DataError as e:
        return str(e).split(";")[0]
    return None


def existing_state(data_dir: Path, want: dict, force: bool) -> Manifest | None:
    """The manifest when the data directory already holds exactly this data set; None
    when it must be (re)built (always with --force); PrepareError when it holds another
    one and not --force."""
    manifest = own_manifest(manifest_path(data_dir))
    if force or manifest is None:
        return None
    have = {"source": manifest.source, "settings": manifest.settings}
    if have != want:
        raise PrepareError(
            f"{data_dir} already holds data prepared with other settings: "
            f"{'; '.join(_differences(have, want))}. Rerun with --force to replace it, "
            f"or set data.name to prepare into another directory.")
    damage = _intact(data_dir, manifest)
    if damage:
        print(f"{damage}: preparing {data_dir} again")
        return None
    return manifest


# ----------------------------------------------------------------------------- replacing
#
# A new data set is built in STAGING inside the data directory and swapped in only when
# complete, so the old one stays usable until then (also when the build fails on a full
# disk). Only files that a manifest of this project lists are ever replaced or deleted;
# the old manifest is kept as REPLACED during the swap, so that a kill at any point of it
# leaves a record of which files were ours, and the next prepare finishes the swap.

STAGING = ".staging"
REPLACED = ".replaced-manifest.json"


def own_manifest(path: Path) -> Manifest | None:
    """The manifest at `path`, None when there is none; PrepareError when a file is there
    that is not a manifest this project wrote (it, and the files beside it, are left alone)."""
    if not path.exists():
        return None
    try:
        return load_manifest(path.parent, name=path.name)
    except DataError as e:
        raise PrepareError(
            f"{path} is not a manifest this project wrote ({str(e).split('(', 1)[-1].rstrip(')')}),"
            f" so prepare leaves that directory alone. Set data.name (or data.root) to a "
            f"directory of its own, or move the file away.") from None


def listed_files(manifest: Manifest | None) -> set[str]:
    return {s.file for shards in (manifest.splits.values() if manifest else []) for s in shards}


def refuse_foreign_shards(data_dir: Path) -> None:
    """Files named like shards that no manifest of ours lists belong to someone else (or to
    an older version's interrupted run): the swap would overwrite them, so refuse."""
    ours = listed_files(own_manifest(manifest_path(data_dir))) | listed_files(
        own_manifest(data_dir / REPLACED))
    foreign = sorted(p.name for split in SPLITS for p in data_dir.glob(f"{split}_*.bin")
                     if p.name not in ours)
    if foreign:
        raise PrepareError(
            f"{data_dir} holds {len(foreign)} shard-named file(s) that no {MANIFEST} of this "
            f"project lists ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
            f"so prepare would overwrite files it did not write. Move them away, or set "
            f"data.name to prepare into another directory.")


def swap_in(data_dir: Path) -> Manifest:
    """Make the complete build in STAGING the data set. Every step can be redone, so a
    kill anywhere in here is finished by `finish_interrupted_swap`."""
    staging, current, replaced = data_dir / STAGING, manifest_path(data_dir), data_dir / REPLACED
    new = load_manifest(staging)
    if current.exists() and not replaced.exists():
        os.replace(current, replaced)  # from here on the directory is not a data set
    keep = listed_files(new)
    for name in sorted(keep):
        if (staging / name).exists():
            os.replace(staging / name, data_dir / name)
    for name in sorted(listed_files(own_manifest(replaced)) - keep):
        (data_dir / name).unlink(missing_ok=True)
    fsync_dir(data_dir)
    os.replace(staging / MANIFEST, current)  # now the new data set is there, whole
    fsync_dir(data_dir)
    replaced.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    remember_verified(data_dir, [s for shards in new.splits.values() for s in shards])
    return new


def finish_interrupted_swap(data_dir: Path) -> None:
    """Complete a swap that a kill interrupted; drop a build that never completed."""
    staging = data_dir / STAGING
    if manifest_path(staging).is_file():
        print(f"{data_dir}: finishing the replacement of the data set that an earlier "
              f"prepare began")
        swap_in(data_dir)
    elif staging.exists():
        shutil.rmtree(staging)  # an unfinished build: its files are ours and incomplete
    if (data_dir / REPLACED).exists() and manifest_path(data_dir).exists():
        (data_dir / REPLACED).unlink()


# ----------------------------------------------------------------------------- the stage


def check_windows(shard_tokens: dict[str, list[int]], config: Config) -> None:
    """Each split must hold at least one training window (the loader's rule: inside one
    shard, context_length inputs + 1 target), so that train does not refuse what
    prepare accepted."""
    need = config.model.context_length + 1
    short = [s for s in SPLITS
             if not any(windows_per_shard(shard_tokens.get(s, []), need - 1))]
    if not short:
        return
    have = ", ".join(f"{s} {sum(shard_tokens.get(s, [])):,} in {len(shard_tokens.get(s, []))} "
                     f"shard(s)" for s in SPLITS)
    hints = {("val",): ["raise data.val_fraction"], ("train",): ["lower data.val_fraction"]}
    hint = hints.get(tuple(short), [])
    if config.data.split_by == "document" and short == ["val"]:
        hint.append("use data.split_by=text (it needs no minimum number of documents)")
    if config.data.shard_tokens < need:
        hint.append("raise data.shard_tokens (a window never crosses a shard boundary)")
    hint += ["lower model.context_length", "add data"]
    raise PrepareError(
        f"the corpus is too small: its {' and '.join(short)} "
        f"{'splits hold' if len(short) > 1 else 'split holds'} no window of "
        f"model.context_length + 1 = {need} tokens inside one shard (tokens: {have}). To fix it, "
        f"{', '.join(hint[:-1])} or {hint[-1]}.")


def prepare(config: Config, force: bool = False) -> Manifest:
    """Make `config.data_dir` hold the data set these settings describe; return its manifest.

    Nothing is done when it already does; another data set there is refused unless
    `force`; a damaged one is made again. Another prepare into the same directory is
    refused while it runs.
    """
    data_dir = config.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise PrepareError(f"{data_dir} is a file, not a directory: data.root and data.name "
                           f"must name a directory for the data set.")
    with locking.exclusive(data_dir, "prepare"):
        finish_interrupted_swap(data_dir)
        manifest = existing_state(data_dir, fingerprint(config), force)
        if manifest is not None:
            check_windows({s: [x.tokens for x in manifest.splits.get(s, [])] for s in SPLITS},
                          config)
            print(f"{data_dir} is up to date (its {MANIFEST} matches these settings and its "
                  f"shards their sha256): nothing to do")
            return manifest
        get_tokenizer()  # fail here, before any work, when the tokenizer cannot load
        refuse_foreign_shards(data_dir)
        staging = data_dir / STAGING
        staging.mkdir()
        try:
            manifest, summary = _build_data_set(config, staging, data_dir)
            manifest.save(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # the old data set is untouched
            raise
        swap_in(data_dir)
        print(summary)
        return manifest


def _build_data_set(config: Config, out_dir: Path, data_dir: Path) -> tuple[Manifest, str]:
    """Tokenize the corpus into shards and a manifest in `out_dir` (the staging directory
    of `data_dir`, whose download/ keeps a url source's file)."""
    d = config.data
    workers = d.num_workers or len(os.sched_getaffinity(0))
    if workers < 1:
        raise PrepareError(f"data.num_workers={d.num_workers}: it must be at least 1 (or null)")
    start = time.perf_counter()
    pool = worker_pool(workers)
    try:
        return _tokenize_into_shards(config, out_dir, data_dir, pool, workers, start)
    finally:
        if pool is not None:
            pool.terminate()  # finished or failed: no worker outlives the stage
            pool.join()


def _tokenize_into_shards(config: Config, out_dir: Path, data_dir: Path, pool, workers: int,
                          start: float) -> tuple[Manifest, str]:
    d = config.data
    bar = tqdm(unit="doc", desc=f"prepare {d.name}", file=sys.stderr, dynamic_ncols=True)

    def make_docs():
        return corpus.documents(d.source, data_dir / "download", warn=warn)

    def warn(message: str) -> None:  # above the progress bar, on stderr
        tqdm.write(f"warning: {message}", file=sys.stderr)

    if d.split_by == "text":
        pieces = pieces_by_text(make_docs, d.val_fraction)
    else:
        pieces = pieces_by_document(make_docs(), d.val_fraction)
    writers = [ShardWriter(out_dir, s, d.shard_tokens) for s in SPLITS]
    documents = [0] * len(SPLITS)
    with bar:
        for tokens, counts in ordered_map(encode_chunk, chunks(pieces), pool, workers):
            for i, writer in enumerate(writers):
                writer.add(tokens[i])
                documents[i] += counts[i]
            bar.update(sum(counts))
    shards = {s: w.close() for s, w in zip(SPLITS, writers)}
    totals = {s: sum(x.tokens for x in shards[s]) for s in SPLITS}
    check_windows({s: [x.tokens for x in shards[s]] for s in SPLITS}, config)
    seconds = time.perf_counter() - start
    n_tokens = sum(totals.values())
    summary = (f"prepared {data_dir}: {sum(documents):,} documents (train {documents[TRAIN]:,}, "
               f"val {documents[VAL]:,}), tokens train {totals['train']:,} val "
               f"{totals['val']:,}, {sum(map(len, shards.values()))} shards, {seconds:.1f} s, "
               f"{n_tokens / seconds:,.0f} tokens/s ({workers} workers)")
    manifest = Manifest(tokenizer=ENCODING_NAME, vocab_size=VOCAB_SIZE, dtype=DTYPE.name,
                        eot_token=EOT_ID, splits=shards, documents=dict(zip(SPLITS, documents)),
                        **fingerprint(config))
    return manifest, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare",
        description="Tokenize a corpus into train/val token shards in data/<data.name>/.")
    parser.add_argument("--force", action="store_true",
                        help="rebuild the data directory even if it holds a data set "
                             "(prepared with other settings, or from files changed since)")
    add_config_arguments(parser)
    return parse_stage_args(parser, argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prepare(load_config(args.config, args.overrides), force=args.force)


if __name__ == "__main__":
    main()
