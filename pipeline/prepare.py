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

The work (pipeline/data/parts.py, pipeline/data/streams.py): the corpus is cut into parts, each
read, laid out and tokenized by one worker (`data.num_workers` processes, default all
cores; under a launcher, on every machine) into its own token files and committed with
a record. This module plans the parts, hands them out, then cuts the shards of at most
`data.shard_tokens` from the parts' streams in plan order (a document may continue in
the next shard, as in llm.c) and writes `manifest.json` last. The bytes never depend on
the number of workers or machines; a stopped build goes on from its committed parts; a
directory without a manifest is not a data set. A mixture (`data.sources`) is the same
per source, each source's shards in a directory of its own.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from pipeline.config import Config, SourceConfig, load_config
from pipeline.core import locking, log
from pipeline.core.errors import PipelineError, cli_main, describe_os_error
from pipeline.core.fileio import atomic_write_json, fsync_dir
from pipeline.data import corpus, parts, streams
from pipeline.data.parts import Part, document_limit
from pipeline.data.shards import (
    MANIFEST,
    SPLITS,
    DataError,
    Manifest,
    ShardInfo,
    check_shards,
    load_manifest,
    manifest_path,
    remember_verified,
    shard_name,
    windows_per_shard,
)
from pipeline.data.streams import DTYPE, LAYOUT
from pipeline.data.team import Team
from pipeline.data.tokenizer import ENCODING_NAME, EOT_ID, VOCAB_SIZE, get_tokenizer
from pipeline.keys import add_config_arguments, parse_stage_args


class PrepareError(PipelineError):
    """Settings or a corpus that cannot make a usable data set."""


# ----------------------------------------------------------------------------- workers


def worker_pool(workers: int):
    """A process pool for the parts, or None for one worker (no processes at all).

    Made before any corpus reading or progress bar starts: on Linux it forks, which is
    instant and hands the loaded tokenizer to the workers, and at that point no other
    thread (datasets' readers, tqdm's monitor) exists whose locks a child could inherit
    mid-use. Elsewhere it spawns, as fork is unsafe there.
    """
    if workers <= 1:
        return None
    method = "fork" if sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_start_worker)


def _start_worker() -> None:
    """Ctrl-C reaches the whole process group; the main process alone answers it (and
    ends the pool), so the terminal shows one line, not a traceback per worker. SIGTERM
    kills: Pool.terminate ends the workers with it, and a handler a forked worker
    inherited (a caller's that only records the signal) would keep one waiting on the
    pool's queue for ever, and terminate() with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return_freed_memory()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory() -> None:
    """Make large buffers (a segment's bytes and text, its tokens) go back to the OS when
    freed. glibc raises its mmap threshold each time such a buffer is freed, so later ones
    come from the heap, where freed blocks stay resident between live ones: a worker that
    read 1 GB in 1 MB segments held 400 MiB that way. A fixed threshold keeps every
    buffer above 128 KiB an mapping of its own, unmapped when freed (measured: 15 MiB
    instead of 145 MiB after 600 MB of segments)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


# ----------------------------------------------------------------------------- idempotence


def data_sources(config: Config) -> list[tuple[str | None, SourceConfig]]:
    """(name, source) of each source: one unnamed for data.source, else data.sources'."""
    if config.data.sources:
        return [(entry.name, entry.source) for entry in config.data.sources]
    return [(None, config.data.source)]


def fingerprint(config: Config) -> dict:
    """Everything that changes the bytes of the shards (not num_workers, not paths, not a
    mixture's weights: those are the loader's)."""
    d = config.data
    if d.sources:
        source = {
            "mixture": [
                {"name": name, **corpus.describe(src)} for name, src in data_sources(config)
            ]
        }
    else:
        source = corpus.describe(d.source)
    return {
        "source": source,
        "settings": {
            "split_by": d.split_by,
            "val_fraction": d.val_fraction,
            "shard_tokens": d.shard_tokens,
            "layout": LAYOUT[d.split_by],
            "tokenizer": ENCODING_NAME,
        },
    }


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, as config keys with both values."""
    return _source_differences(old.get("source", {}), new["source"]) + _key_differences(
        old.get("settings", {}), new["settings"], "data."
    )


def _source_differences(a: dict, b: dict) -> list[str]:
    if "mixture" not in a and "mixture" not in b:
        return _key_differences(a, b, "data.source.")
    if "mixture" not in a or "mixture" not in b:
        kind = {True: "a mixture (data.sources)", False: "one source (data.source)"}
        return [
            f"the data set was prepared from {kind['mixture' in a]}, now from "
            f"{kind['mixture' in b]}"
        ]
    old, new = a["mixture"], b["mixture"]
    if len(old) != len(new):
        return [
            f"data.sources had {len(old)} sources ({', '.join(s['name'] for s in old)}), "
            f"now {len(new)} ({', '.join(s['name'] for s in new)})"
        ]
    diffs = []
    for i, (x, y) in enumerate(zip(old, new)):
        if x["name"] != y["name"]:
            diffs.append(f"data.sources[{i}].name was {x['name']!r}, now {y['name']!r}")
        diffs += _key_differences(
            {k: v for k, v in x.items() if k != "name"},
            {k: v for k, v in y.items() if k != "name"},
            f"data.sources[{i}].source.",
        )
    return diffs


def _key_differences(a: dict, b: dict, prefix: str) -> list[str]:
    return [
        f"{prefix}{key} was {a.get(key)!r}, now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


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
            f"or set data.name to prepare into another directory."
        )
    damage = _intact(data_dir, manifest)
    if damage:
        log.info(f"{damage}: preparing {data_dir} again")
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
            f"directory of its own, or move the file away."
        ) from None


def listed_files(manifest: Manifest | None) -> set[str]:
    return {s.file for shards in (manifest.splits.values() if manifest else []) for s in shards}


def refuse_foreign_shards(data_dir: Path) -> None:
    """Files named like shards that no manifest of ours lists belong to someone else (or to
    an older version's interrupted run): the swap would overwrite them, so refuse."""
    ours = listed_files(own_manifest(manifest_path(data_dir))) | listed_files(
        own_manifest(data_dir / REPLACED)
    )
    found = [
        p.relative_to(data_dir).as_posix()
        for split in SPLITS
        for pattern in (f"{split}_*.bin", f"*/{split}_*.bin")
        for p in data_dir.glob(pattern)
    ]
    foreign = sorted(name for name in found if name not in ours and not name.startswith("."))
    if foreign:
        raise PrepareError(
            f"{data_dir} holds {len(foreign)} shard-named file(s) that no {MANIFEST} of this "
            f"project lists ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), "
            f"so prepare would overwrite files it did not write. Move them away, or set "
            f"data.name to prepare into another directory."
        )


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
            (data_dir / name).parent.mkdir(exist_ok=True)  # a mixture's source directory
            os.replace(staging / name, data_dir / name)
    for name in sorted(listed_files(own_manifest(replaced)) - keep):
        (data_dir / name).unlink(missing_ok=True)
        if "/" in name and (data_dir / name).parent != data_dir:
            _remove_if_empty((data_dir / name).parent)
    fsync_dir(data_dir)
    os.replace(staging / MANIFEST, current)  # now the new data set is there, whole
    fsync_dir(data_dir)
    replaced.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    remember_verified(data_dir, [s for shards in new.splits.values() for s in shards])
    return new


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (a file of someone else's, or another shard still there)


def finish_interrupted_swap(data_dir: Path) -> None:
    """Complete a swap that a kill interrupted. (A build that never completed stays: its
    committed parts are used again when its plan still fits, see open_plan.)"""
    staging = data_dir / STAGING
    if manifest_path(staging).is_file():
        log.info(
            f"{data_dir}: finishing the replacement of the data set that an earlier prepare began"
        )
        swap_in(data_dir)
    if (data_dir / REPLACED).exists() and manifest_path(data_dir).exists():
        (data_dir / REPLACED).unlink()


def drop_staging(data_dir: Path) -> None:
    """Delete an unfinished build (its files are all ours)."""
    shutil.rmtree(data_dir / STAGING, ignore_errors=True)


# ----------------------------------------------------------------------------- the stage


def check_windows(shard_tokens: dict[str, list[int]], config: Config, where: str = "") -> None:
    """Each split must hold at least one training window (the loader's rule: inside one
    shard, context_length inputs + 1 target), so that train does not refuse what
    prepare accepted."""
    need = config.model.context_length + 1
    short = [s for s in SPLITS if not any(windows_per_shard(shard_tokens.get(s, []), need - 1))]
    if not short:
        return
    have = ", ".join(
        f"{s} {sum(shard_tokens.get(s, [])):,} in {len(shard_tokens.get(s, []))} shard(s)"
        for s in SPLITS
    )
    hints = {("val",): ["raise data.val_fraction"], ("train",): ["lower data.val_fraction"]}
    hint = hints.get(tuple(short), [])
    if config.data.split_by == "document" and short == ["val"]:
        hint.append("use data.split_by=text (it needs no minimum number of documents)")
    if config.data.shard_tokens < need:
        hint.append("raise data.shard_tokens (a window never crosses a shard boundary)")
    hint += ["lower model.context_length", "add data"]
    raise PrepareError(
        f"the corpus{where} is too small: its {' and '.join(short)} "
        f"{'splits hold' if len(short) > 1 else 'split holds'} no window of "
        f"model.context_length + 1 = {need} tokens inside one shard (tokens: {have}). To fix it, "
        f"{', '.join(hint[:-1])} or {hint[-1]}."
    )


def prepare(config: Config, force: bool = False) -> Manifest:
    """Make `config.data_dir` hold the data set these settings describe; return its manifest.

    Nothing is done when it already does; another data set there is refused unless
    `force`; a damaged one is made again; a build that was stopped goes on from the parts
    it committed. Under a launcher (WORLD_SIZE > 1) every machine builds its share of the
    parts and the main one writes the manifest; another prepare into the same directory
    is refused while it runs.
    """
    data_dir = config.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise PrepareError(
            f"{data_dir} is a file, not a directory: data.root and data.name "
            f"must name a directory for the data set."
        )
    team = Team()
    get_tokenizer()  # fails here, before any work, when it cannot load; forked workers share it
    workers = config.data.num_workers or max(1, len(os.sched_getaffinity(0)) // team.local_world)
    return_freed_memory()  # the main process reads segments too when it is the only worker
    pools: list = []

    def pool():
        """The worker pool, forked on first use: alone, once there is work (an up-to-date
        data set forks nothing), before planning reads the corpus; under a launcher,
        before the gloo group's threads exist (see worker_pool)."""
        if not pools:
            pools.append(worker_pool(workers))
        return pools[0]

    if not team.alone:
        pool()
    try:
        team.meet()
        lock = locking.exclusive(data_dir, "prepare") if team.main else nullcontext()
        with lock:
            decision = team.broadcast(_decide(config, force, pool) if team.main else None)
            if "error" in decision:
                raise PrepareError(decision["error"])
            if "done" in decision:
                return load_manifest(data_dir)
            plan = _read_plan(data_dir, team)
            error = _build_share(plan, config, team, pool(), workers)
            errors = [e for e in team.gather(error) if e]
            if errors:
                raise PrepareError(" | ".join(errors) + _kept_note(data_dir))
            outcome = team.broadcast(_finish(plan, config, pool()) if team.main else None)
            if "error" in outcome:
                raise PrepareError(outcome["error"])
            return load_manifest(data_dir)
    finally:
        if pools and pools[0] is not None:
            pools[0].terminate()  # finished or failed: no worker outlives the stage
            pools[0].join()
        team.leave()


def _decide(config: Config, force: bool, pool: Callable) -> dict:
    """On the main process: {"done": ...} when the data set is there already, {"plan":
    ...} when the staging directory holds the plan to build, {"error": ...} otherwise.
    `pool()` gives the worker pool (made on first use)."""
    data_dir = config.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        finish_interrupted_swap(data_dir)
        manifest = existing_state(data_dir, fingerprint(config), force)
        if manifest is not None:
            check_windows(
                {s: [x.tokens for x in manifest.splits.get(s, [])] for s in SPLITS}, config
            )
            drop_staging(data_dir)
            log.info(
                f"{data_dir} is up to date (its {MANIFEST} matches these settings and its "
                f"shards their sha256): nothing to do"
            )
            return {"done": True}
        refuse_foreign_shards(data_dir)
        open_plan(config, pool())
        return {"plan": True}
    except PipelineError as e:
        return {"error": str(e)}


# ----------------------------------------------------------------------------- the plan


PLAN = "plan.json"
SKIP = streams.SKIP
PARTS = "parts"


@dataclass
class PlannedPart:
    """One part of the plan and what its builder needs to know besides the part."""

    part: Part
    limit: int | None = None  # new documents to take (None: all; SKIP: none, not read)
    start_char: int | None = None  # split_by text: its first character within its source

    def to_dict(self) -> dict:
        return {"part": self.part.to_dict(), "limit": self.limit, "start_char": self.start_char}

    @classmethod
    def from_dict(cls, d: dict) -> "PlannedPart":
        return cls(Part.from_dict(d["part"]), d["limit"], d["start_char"])


@dataclass
class Plan:
    """The parts to build and what each needs to know; `.staging/plan.json`. A build
    stopped anywhere goes on with the same plan when the settings and the corpus files
    (size, mtime) are unchanged."""

    id: str  # sha256 of the rest: part records name it
    key: dict  # fingerprint, part and segment sizes, the corpus files' stamps
    parts: list[PlannedPart]
    cuts: list[int]  # split_by text: per source, the character where val begins; else []

    @classmethod
    def load(cls, path: Path) -> "Plan":
        d = json.loads(path.read_text())
        return cls(d["id"], d["key"], [PlannedPart.from_dict(p) for p in d["parts"]], d["cuts"])

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "key": self.key,
            "parts": [p.to_dict() for p in self.parts],
            "cuts": self.cuts,
        }


@dataclass(frozen=True)
class BuildJob:
    """What a worker needs to build one part (it crosses to the worker by pickle)."""

    planned: PlannedPart
    source: SourceConfig
    layout: streams.Layout
    directory: Path
    plan_id: str
    segment_bytes: int


def _read_plan(data_dir: Path, team: Team) -> Plan:
    try:
        return Plan.load(data_dir / STAGING / PLAN)
    except OSError:
        raise PrepareError(
            f"machine {team.rank} of {team.world} cannot read the plan that machine 0 wrote "
            f"to {data_dir / STAGING / PLAN}: preparing on several machines needs data.root on "
            f"a filesystem they all share (or prepare on one machine)."
        ) from None


def open_plan(config: Config, pool) -> Plan:
    """The plan in the staging directory: the one there when it still fits, so committed
    parts are kept; else a new one, in an emptied staging directory."""
    d = config.data
    staging = config.data_dir / STAGING
    sources = [src for _, src in data_sources(config)]
    found: list[Part] = []
    for i, source in enumerate(sources):
        found += parts.plan(
            source,
            i,
            config.data_dir / "download",
            d.part_bytes,
            d.segment_bytes,
            start_index=len(found),
            warn=log.warn,
        )
    listed = [p.to_dict() for p in found]
    key = {
        "fingerprint": fingerprint(config),
        "part_bytes": d.part_bytes,
        "segment_bytes": d.segment_bytes,
        "files": _file_stamps(found),
        "parts": hashlib.sha256(json.dumps(listed).encode()).hexdigest(),
    }
    try:
        old = Plan.load(staging / PLAN)
        if old.key == key:
            done = sum(
                streams.committed(staging / PARTS, i, old.id) is not None
                for i in range(len(old.parts))
            )
            log.info(
                f"{config.data_dir}: going on with the build that an earlier prepare began "
                f"({done} of {len(old.parts)} parts are committed)"
            )
            return old
    except (OSError, ValueError, TypeError, KeyError):  # none, or another version's
        pass
    drop_staging(config.data_dir)
    (staging / PARTS).mkdir(parents=True)
    _add_digests(found, config, pool)
    planned, cuts = _count_parts(found, sources, config, pool)
    plan = Plan("", key, planned, cuts)
    body = {k: v for k, v in plan.to_dict().items() if k != "id"}
    plan.id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    atomic_write_json(staging / PLAN, plan.to_dict())
    return plan


def _file_stamps(found: list[Part]) -> dict[str, list[int]]:
    stamps = {}
    for part in found:
        for item in part.items:
            if "path" in item and item["path"] not in stamps:
                st = os.stat(item["path"])
                stamps[item["path"]] = [st.st_size, st.st_mtime_ns]
    return stamps


def _add_digests(found: list[Part], config: Config, pool) -> None:
    """split_by document: the hash of every document read in segments, once."""
    if config.data.split_by != "document":
        return
    items = [
        item
        for part in found
        for item in part.items
        if parts.needs_digest(item, config.data.segment_bytes)
    ]
    # Once per file, however many parts its byte ranges make.
    jobs = list(
        {
            item["path"]: (
                item["path"],
                item["encoding"],
                config.data.segment_bytes,
                *parts.doc_range(item),
            )
            for item in items
        }.values()
    )
    digests = dict(zip((job[0] for job in jobs), _map(_digest_task, jobs, pool)))
    for item in items:
        item["digest"] = digests[item["path"]]


def _digest_task(job) -> str:
    return parts.file_digest(*job)


def _count_parts(
    found: list[Part], sources: list[SourceConfig], config: Config, pool
) -> tuple[list[PlannedPart], list[int]]:
    """The parts planned: each with the documents to take (max_documents) and, for
    split_by text, its first character within its source; and per source the character
    where val begins. Reads the corpus once more when either is needed: in order, part
    after part, for a source whose documents are limited."""
    d = config.data
    limits: list[int | None] = [None] * len(found)
    counts: dict[int, tuple[int, int]] = {}
    if d.split_by != "text" and all(document_limit(src) is None for src in sources):
        return [PlannedPart(p) for p in found], []
    free = [p for p in found if document_limit(sources[p.source]) is None]
    jobs = [(p, sources[p.source], d.segment_bytes, None) for p in free]
    counts.update(zip((p.index for p in free), _map(_count_task, jobs, pool)))
    dropped: set[int] = set()
    for i, src in enumerate(sources):
        left, past = document_limit(src), False
        for p in (p for p in found if p.source == i and left is not None):
            past = past or (left == 0 and not parts.continues(p))
            if past:
                dropped.add(p.index)  # past max_documents: never read
                continue
            # With left == 0 a part that continues the last document taken still gives
            # that document's rest.
            counts[p.index] = streams.count_part(p, src, d.segment_bytes, left)
            limits[p.index] = left
            left -= counts[p.index][1]
    starts, cuts = [0] * len(found), []
    for i, src in enumerate(sources):
        mine = [p.index for p in found if p.source == i and p.index not in dropped]
        if sum(counts[j][1] for j in mine) == 0:
            raise parts.empty_corpus(src)
        chars = 0
        for j in mine:
            starts[j], chars = chars, chars + counts[j][0]
        cuts.append(int((1 - d.val_fraction) * chars))
    for j in dropped:
        limits[j] = SKIP
    return [PlannedPart(p, limits[p.index], starts[p.index]) for p in found], cuts


def _count_task(job) -> tuple[int, int]:
    return streams.count_part(*job)


def _map(fn, jobs: list, pool, ordered: bool = True) -> Iterator:
    """fn over jobs in the pool's workers (in this process without one); unordered:
    results as they finish."""
    if pool is None:
        return map(fn, jobs)
    return pool.imap(fn, jobs) if ordered else pool.imap_unordered(fn, jobs)


# ----------------------------------------------------------------------------- building


def _build_share(plan: Plan, config: Config, team: Team, pool, workers: int) -> str | None:
    """Build this machine's parts that are not committed yet (every part of the plan
    whose number modulo the machines is this one's rank); the error as text, or None."""
    d = config.data
    directory = config.data_dir / STAGING / PARTS
    mine = [i for i in range(len(plan.parts)) if i % team.world == team.rank]
    todo = [i for i in mine if streams.committed(directory, i, plan.id) is None]
    sources = [src for _, src in data_sources(config)]
    jobs = [
        BuildJob(
            plan.parts[i],
            sources[plan.parts[i].part.source],
            _layout(plan, config, i),
            directory,
            plan.id,
            d.segment_bytes,
        )
        for i in todo
    ]
    where = "" if team.alone else f" (machine {team.rank} of {team.world})"
    if len(todo) < len(mine):
        log.info(
            f"prepare{where}: {len(mine) - len(todo)} of {len(mine)} parts were committed "
            f"by an earlier run; building the other {len(todo)}",
            everywhere=True,
        )
    total = sum(plan.parts[i].part.bytes for i in todo)
    bar = tqdm(
        total=total or None,
        unit="B",
        unit_scale=True,
        desc=f"prepare {d.name}{where}",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    tokens = 0
    try:
        with bar:
            for record in _map(_build_task, jobs, pool, ordered=False):
                tokens += sum(record.tokens.values())
                bar.update(plan.parts[record.part].part.bytes)
    except PipelineError as e:
        return f"{e}"
    except OSError as e:
        return describe_os_error(e)
    if todo:
        seconds = time.perf_counter() - start
        log.info(
            f"prepare{where}: built {len(todo)} parts, {tokens:,} tokens in {seconds:.1f} s, "
            f"{tokens / seconds:,.0f} tokens/s ({workers} workers)",
            everywhere=True,
        )
    return None


def _kept_note(data_dir: Path) -> str:
    """Where the parts committed so far wait for the rerun, and how to give their space back."""
    records = list((data_dir / STAGING / PARTS).glob("*.json"))
    if not records:
        return ""
    size = sum(p.stat().st_size for p in (data_dir / STAGING / PARTS).iterdir() if p.is_file())
    return (
        f" The {len(records)} parts committed so far ({size / 1e6:,.1f} MB) are kept in "
        f"{data_dir / STAGING}: the same command goes on from them (delete that directory "
        f"to free the space instead)."
    )


def _layout(plan: Plan, config: Config, i: int) -> streams.Layout:
    d = config.data
    planned = plan.parts[i]
    if not plan.cuts:
        return streams.Layout(d.split_by, d.val_fraction)
    return streams.Layout(
        d.split_by,
        d.val_fraction,
        cut=plan.cuts[planned.part.source],
        start_char=planned.start_char,
    )


def _build_task(job: BuildJob) -> streams.PartRecord:
    return streams.build_part(
        job.planned.part,
        job.source,
        job.layout,
        job.directory,
        job.plan_id,
        job.segment_bytes,
        job.planned.limit,
    )


# ----------------------------------------------------------------------------- finishing


def _finish(plan: Plan, config: Config, pool) -> dict:
    """On the main process, once every part is committed: cut the shards, write the
    manifest, swap the new data set in. {"done": ...} or {"error": ...}."""
    try:
        manifest, summary = _assemble(plan, config, pool)
        manifest.save(config.data_dir / STAGING)
        swap_in(config.data_dir)
        log.info(summary)
        return {"done": True}
    except PipelineError as e:
        if not isinstance(e, DataError):
            drop_staging(config.data_dir)  # bad input: the parts would not be used again
        return {"error": str(e)}
    except OSError as e:
        return {"error": describe_os_error(e)}


def _assemble(plan: Plan, config: Config, pool) -> tuple[Manifest, str]:
    """The data set from the committed parts: per source and split, the parts' streams
    cut into shards (a mixture's in a directory per source), checked to hold windows."""
    d = config.data
    staging = config.data_dir / STAGING
    records = [streams.committed(staging / PARTS, i, plan.id) for i in range(len(plan.parts))]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise DataError(
            f"parts {missing[:5]} of {staging} are not committed although every "
            f"machine reported its share done: rerun prepare"
        )
    named = data_sources(config)
    by_source = [
        [r for r in records if plan.parts[r.part].part.source == i] for i in range(len(named))
    ]
    shard_plans: dict[tuple[int, str], list[streams.ShardPlan]] = {}
    for i, ((name, source), mine) in enumerate(zip(named, by_source)):
        _report_notes(mine, source)
        if sum(r.documents[s] for r in mine for s in SPLITS) == 0:
            raise parts.empty_corpus(source)
        for split in SPLITS:
            shard_plans[i, split] = streams.cut_into_shards(
                [
                    (streams.stream_path(staging / PARTS, r.part, split), r.tokens[split])
                    for r in mine
                ],
                d.shard_tokens,
                lambda k, split=split, name=name: source_shard_name(name, split, k),
            )
        check_windows(
            {s: [x.tokens for x in shard_plans[i, s]] for s in SPLITS},
            config,
            f" of source '{name}'" if name else "",
        )
    jobs = [(shard, staging) for key in shard_plans for shard in shard_plans[key]]
    infos = iter(list(_map(_shard_task, jobs, pool)))
    written = {key: [next(infos) for _ in shard_plans[key]] for key in shard_plans}
    shards = {s: [x for i in range(len(named)) for x in written[i, s]] for s in SPLITS}
    documents = {s: sum(r.documents[s] for r in records) for s in SPLITS}
    mixture = {}
    if d.sources:
        mixture = {
            name: {
                "splits": {s: [x.file for x in written[i, s]] for s in SPLITS},
                "documents": {s: sum(r.documents[s] for r in by_source[i]) for s in SPLITS},
                "tokens": {s: sum(x.tokens for x in written[i, s]) for s in SPLITS},
            }
            for i, (name, _) in enumerate(named)
        }
    totals = {s: sum(x.tokens for x in shards[s]) for s in SPLITS}
    summary = (
        f"prepared {config.data_dir}: {sum(documents.values()):,} documents (train "
        f"{documents['train']:,}, val {documents['val']:,}), tokens train "
        f"{totals['train']:,} val {totals['val']:,}, "
        f"{sum(map(len, shards.values()))} shards from {len(records)} parts"
        + (f" of {len(named)} sources" if d.sources else "")
    )
    manifest = Manifest(
        tokenizer=ENCODING_NAME,
        vocab_size=VOCAB_SIZE,
        dtype=DTYPE.name,
        eot_token=EOT_ID,
        splits=shards,
        documents=documents,
        sources=mixture,
        **fingerprint(config),
    )
    return manifest, summary


def source_shard_name(source: str | None, split: str, index: int) -> str:
    """A shard's file: `train_000000.bin`, or in its source's directory in a mixture."""
    return shard_name(split, index) if source is None else f"{source}/{shard_name(split, index)}"


def _report_notes(records: list[streams.PartRecord], source: SourceConfig) -> None:
    notes = parts.Notes()
    for record in records:
        notes.merge(parts.Notes.from_dict(record.notes))
    notes.report(source.text_field, log.warn)


def _shard_task(job) -> ShardInfo:
    return streams.write_planned_shard(*job)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare",
        description="Tokenize a corpus into train/val token shards in data/<data.name>/.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the data directory even if it holds a data set "
        "(prepared with other settings, or from files changed since)",
    )
    add_config_arguments(parser)
    return parse_stage_args(parser, argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prepare(load_config(args.config, args.overrides), force=args.force)


if __name__ == "__main__":
    main()
