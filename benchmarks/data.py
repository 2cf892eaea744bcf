"""Data: the prepare stage against single-process tiktoken, the loader against what the
training step consumes, and the loader's peak memory over a 10M and a 100M token set.

- prepare: tokens/s of `pipeline.prepare.prepare` (num_workers = cores; reading, splitting,
  tokenizing in worker processes, writing shards) and of `encode_ordinary` over the same
  documents already in memory, in turns. The ideal is encode's rate x workers.
- loader: windows/s of TrainBatches(TokenWindows(...)) (shuffled, memory-mapped) against
  windows/s that the fastest training step (ours-fast, benchmarks.train) consumes.
- memory: peak RSS of a fresh process that opens a data set of random tokens and draws
  the same number of batches from it, for two data set sizes; flat is the goal.
- prepare memory: peak RSS, summed over the process tree (main process and tokenizer
  workers, sampled every 50 ms), of `python -m pipeline.prepare` on a corpus of a few huge
  files and one single-line file of 20% of it (write_huge_corpus), at 100 MB and 1 GB
  (`--prepare-sizes` picks others). The target: under 1 GiB, and flat (largest / smallest
  below 1.25).
Knows the loader and prepare only through their public functions and command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from benchmarks import train
from benchmarks.common import interleave, machine, median, print_tables
from pipeline.data.shards import Manifest, ShardInfo, load_manifest, write_shard

ROOT = Path(__file__).resolve().parent.parent


def prepare_vs_tiktoken(max_bytes: int | None, workers: int, repeats: int) -> dict:
    from pipeline.config import load_config
    from pipeline.data import parts
    from pipeline.data.tokenizer import get_tokenizer
    from pipeline.prepare import prepare

    source = ["data.source.kind=python-stdlib"]
    if max_bytes is not None:  # None: the whole built-in corpus (~31 MB, ~15M tokens)
        source.append(f"data.source.max_bytes={max_bytes}")
    docs = list(parts.documents(load_config(None, source).data.source, "."))
    enc = get_tokenizer()
    tokens = sum(len(enc.encode_ordinary(d)) for d in docs)  # also the warm-up
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(None, source + [f"data.root={root}", f"data.num_workers={workers}"])
        times = interleave(
            {
                "encode_ordinary, 1 process": lambda: [enc.encode_ordinary(d) for d in docs],
                f"prepare, {workers} workers": lambda: prepare(cfg, force=True),
            },
            repeats,
            warmup=0,
        )
    rows = [
        {"contender": name, "tokens_per_s": tokens / median(t), "seconds": t}
        for name, t in times.items()
    ]
    single = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_single"] = r["tokens_per_s"] / single
        r["x_ideal"] = r["tokens_per_s"] / (single * workers)
    return {
        "documents": len(docs),
        "characters": sum(map(len, docs)),
        "tokens": tokens,
        "max_bytes": max_bytes,
        "workers": workers,
        "repeats": repeats,
        "rows": rows,
    }


def write_dataset(directory: Path, tokens: int, val_tokens: int = 0, seed: int = 0) -> Path:
    """A data set of random GPT-2 tokens: one train and one val shard and a manifest."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", tokens), ("val", val_tokens or max(tokens // 100, 1000))):
        name = f"{split}_000000.bin"
        body = rng.integers(0, 50257, size=n, dtype=np.uint16)
        splits[split] = [ShardInfo(name, n, write_shard(directory / name, body, np.uint16))]
    Manifest(
        tokenizer="gpt2",
        vocab_size=50257,
        dtype="uint16",
        eot_token=50256,
        splits=splits,
        documents={"train": 1, "val": 1},
        source={"kind": "random tokens (benchmark)"},
        settings={},
    ).save(directory)
    return directory


LOADER_SCRIPT = """
import json, resource, sys, time
from pipeline.data.loader import TokenWindows, TrainBatches
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status('VmRSS')
data, context, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stream = TrainBatches(TokenWindows(data, 'train', context), batch, seed=1)
start = time.perf_counter()
for _ in range(batches):
    x, y = next(stream)
seconds = time.perf_counter() - start
print(json.dumps({'rss_before': before, 'peak_rss': status('VmHWM'),
                  'rss_anon_end': status('RssAnon'), 'rss_file_end': status('RssFile'),
                  'seconds': seconds, 'windows_per_s': batches * batch / seconds}))
"""


def loader_process(data_dir: Path, context: int, batch: int, batches: int) -> dict:
    """Run the loader in a fresh process (so its RSS is its own); return what it measured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LOADER_SCRIPT,
            str(data_dir),
            str(context),
            str(batch),
            str(batches),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_consumption(shape: train.Shape, repeats: int = 2) -> tuple[float, str]:
    """Windows/s that our fastest step trains on at `shape` (the most demanding consumer),
    and its name (ours-fast, benchmarks.train)."""
    cfg = shape.cfg
    ours, hf = train.build_models(cfg)
    x = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length))
    steps = train.contenders(ours, hf, x, x)
    name = "ours-fast"
    step = steps[name]
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return shape.batch / median(seconds), name


def loader_and_memory(sizes: list[int], batches: int, shape: train.Shape) -> dict:
    context, batch = shape.cfg.context_length, shape.batch
    consumption, consumer = step_consumption(shape)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for tokens in sizes:
            data_dir = write_dataset(Path(root) / f"t{tokens}", tokens)
            measured = loader_process(data_dir, context, batch, batches)
            rows.append(
                {
                    "dataset_tokens": tokens,
                    "batches": batches,
                    **measured,
                    "peak_rss_mib": measured["peak_rss"] / 2**20,
                    "x_step_consumption": measured["windows_per_s"] / consumption,
                }
            )
            (data_dir / "train_000000.bin").unlink()
    flat = rows[-1]["peak_rss"] / rows[0]["peak_rss"]
    return {
        "context_length": context,
        "micro_batch": batch,
        "step_windows_per_s": consumption,
        "consumer": f"{consumer} at {shape.name}",
        "rows": rows,
        "peak_rss_ratio_largest_to_smallest": flat,
    }


# ----------------------------------------------------------------------------- prepare's memory
#
# The target: the peak RSS of prepare on a 1 GB corpus made of a few huge files and
# one 200 MB single-line file stays under 1 GiB, and flat from 100 MB to 1 GB.

HUGE_FILES = 4  # "a few huge files": 80% of the corpus, 200 MB each at 1 GB
SINGLE_LINE_SHARE = 0.2  # the single-line file: 200 MB at 1 GB
SMALL_FILES = 100  # small documents (2 kB each) so the document split always has val text
SMALL_BYTES = 2000
PEAK_TARGET = 2**30  # bytes of summed RSS
FLAT_TARGET = 1.25  # peak at the largest size / peak at the smallest
SAMPLE_S = 0.05
PSS_EVERY = 10  # samples: PSS every 0.5 s
NEWLINES_TO_SPACES = bytes.maketrans(b"\r\n", b"  ")


def stdlib_texts() -> Iterator[bytes]:
    """The standard library's .py sources as UTF-8 bytes, one file at a time, in
    `stdlib_files` order and then again, forever. The 4 files that are not UTF-8 get
    U+FFFD for their undecodable bytes, so every yielded byte string is valid UTF-8."""
    from pipeline.data.corpus import stdlib_files

    files = stdlib_files()
    while True:
        for path in files:
            text = path.read_bytes().decode("utf-8-sig", "replace").encode("utf-8")
            if text:  # an empty __init__.py adds nothing
                yield text


def _char_boundary(data: bytes, cut: int) -> int:
    """The largest i <= cut at which `data` can be cut without splitting a UTF-8 character."""
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return cut


def write_huge_corpus(directory: Path, total_bytes: int) -> list[Path]:
    """A corpus of `total_bytes` of real text (the standard library's sources, repeated):
    HUGE_FILES .txt files of 80% of it between them, one single-line .txt file of the other
    20% (every CR and LF made a space), and SMALL_FILES files of SMALL_BYTES each in
    small/ (~0.2 MB, not counted in `total_bytes`) so that a 0.1 document split holds val
    documents whatever the huge files' hashes. Deterministic for a given Python; written one
    source file at a time, so the generator's own memory stays small at any size."""
    directory.mkdir(parents=True, exist_ok=True)
    single = int(total_bytes * SINGLE_LINE_SHARE)
    rest = total_bytes - single
    sizes = [rest // HUGE_FILES + (i < rest % HUGE_FILES) for i in range(HUGE_FILES)]
    names = [f"huge_{i}.txt" for i in range(HUGE_FILES)] + ["single_line.txt"]
    texts = stdlib_texts()
    paths = []
    for i in range(SMALL_FILES):
        text = next(texts)
        paths.append(directory / "small" / f"small_{i:03d}.txt")
        paths[-1].parent.mkdir(exist_ok=True)
        paths[-1].write_bytes(text[: _char_boundary(text, SMALL_BYTES)])
    pending = b""
    for name, size in zip(names, sizes + [single]):
        paths.append(directory / name)
        with open(paths[-1], "wb") as f:
            while size > 0:
                pending = pending or next(texts)
                cut = _char_boundary(pending, min(size, len(pending)))
                block, pending = (pending[:cut], pending[cut:]) if cut else (b" " * size, pending)
                if name == "single_line.txt":
                    block = block.translate(NEWLINES_TO_SPACES)
                f.write(block)
                size -= len(block)
    return paths


def _kib_fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of a /proc file of "Key: N kB" lines, in bytes; {} once the process is gone."""
    try:
        with open(path) as f:
            return {
                k: int(v.split()[0]) * 1024
                for k, v in (line.split(":", 1) for line in f)
                if k in keys
            }
    except (OSError, ValueError):
        return {}


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (by the parent pid in /proc/<pid>/stat; this kernel
    may lack /proc/<pid>/task/*/children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def peak_memory(command: list[str], log: Path, project: Path = ROOT) -> dict:
    """Run `command` (in `project`, whose pipeline it imports; output to `log`) and sample
    its process tree every SAMPLE_S seconds: the summed VmRSS; each process's VmHWM, its
    own peak kept by the kernel, so one sample after the peak reads it exactly; and every
    PSS_EVERY-th sample the summed Pss (RSS counts the pages that forked workers share with
    the main process once in each of them, PSS splits them; smaps_rollup costs ~6 ms a
    process, hence less often). Not wait4's ru_maxrss: after vfork + exec it holds the
    launching process's peak, this benchmark's own."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=project, env=env)
    tree_rss, tree_pss, hwm, samples = 0, 0, {}, 0
    try:
        while proc.poll() is None:
            tree = process_tree(proc.pid)
            fields = {p: _kib_fields(f"/proc/{p}/status", ("VmRSS", "VmHWM")) for p in tree}
            tree_rss = max(tree_rss, sum(f.get("VmRSS", 0) for f in fields.values()))
            for p, f in fields.items():
                hwm[p] = max(hwm.get(p, 0), f.get("VmHWM", 0))
            if samples % PSS_EVERY == 0:
                tree_pss = max(
                    tree_pss,
                    sum(
                        _kib_fields(f"/proc/{p}/smaps_rollup", ("Pss",)).get("Pss", 0) for p in tree
                    ),
                )
            samples += 1
            time.sleep(SAMPLE_S)
    finally:
        if proc.poll() is None:
            proc.kill()  # the benchmark was interrupted: leave no prepare behind
            proc.wait()
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{tail}")
    workers = [v for p, v in hwm.items() if p != proc.pid]
    return {
        "seconds": seconds,
        "samples": samples,
        "processes": len(hwm),
        "peak_tree_rss": tree_rss,
        "peak_tree_pss": tree_pss,
        "peak_process_rss": max(hwm.values(), default=0),
        "peak_main_rss": hwm.get(proc.pid, 0),
        "peak_worker_rss": max(workers, default=0),
    }


def prepare_memory(sizes: list[int], workers: int, project: Path = ROOT) -> dict:
    """Peak memory of `python -m pipeline.prepare` (a fresh process, `workers` tokenizer
    processes) on a write_huge_corpus of each size; corpus and data are deleted after each.
    `project`: the checkout whose pipeline/ and configs/ run (another one, to compare)."""
    sizes = sorted(set(sizes))
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
            corpus_dir = Path(tmp) / "corpus"
            start = time.perf_counter()
            files = write_huge_corpus(corpus_dir, size)
            written = time.perf_counter() - start
            overrides = [
                "data.source.kind=files",
                f"data.source.paths=[{corpus_dir}]",
                "data.source.max_bytes=null",
                f"data.root={tmp}",
                "data.name=huge",
                f"data.num_workers={workers}",
                "data.val_fraction=0.1",
            ]
            measured = peak_memory(
                [
                    sys.executable,
                    "-m",
                    "pipeline.prepare",
                    "--config",
                    "configs/tiny.yaml",
                    *overrides,
                ],
                Path(tmp) / "prepare.log",
                project,
            )
            manifest = load_manifest(Path(tmp) / "huge")
            tokens = sum(s.tokens for shards in manifest.splits.values() for s in shards)
            rows.append(
                {
                    "corpus_mb": size / 1e6,
                    "files": len(files),
                    "corpus_bytes": sum(p.stat().st_size for p in files),
                    "single_line_mb": (corpus_dir / "single_line.txt").stat().st_size / 1e6,
                    "corpus_write_s": written,
                    "tokens": tokens,
                    **measured,
                    **{f"{k}_mib": v / 2**20 for k, v in measured.items() if k.startswith("peak_")},
                    "under_1gib": measured["peak_tree_rss"] < PEAK_TARGET,
                }
            )
    ratio = rows[-1]["peak_tree_rss"] / rows[0]["peak_tree_rss"] if len(rows) > 1 else None
    under = all(r["under_1gib"] for r in rows)
    flat = ratio is not None and ratio < FLAT_TARGET
    return {
        "sizes": sizes,
        "workers": workers,
        "config": "configs/tiny.yaml",
        "corpus": f"{HUGE_FILES} huge .txt files + 1 single-line .txt file of "
        f"{SINGLE_LINE_SHARE:.0%} + {SMALL_FILES} files of {SMALL_BYTES} bytes; "
        f"stdlib .py sources repeated",
        "peak": f"max over samples every {SAMPLE_S} s of the summed VmRSS of prepare's "
        f"process tree",
        "rows": rows,
        "peak_rss_ratio_largest_to_smallest": ratio,
        "target": {"peak_tree_rss_below": PEAK_TARGET, "ratio_below": FLAT_TARGET},
        "under_1gib": under,
        "flat": flat,
        "target_met": under and flat,
    }


def run(quick: bool = False, prepare_sizes: list[int] | None = None) -> dict:
    workers = os.cpu_count() or 1
    prep = prepare_vs_tiktoken(
        max_bytes=300_000 if quick else None, workers=workers, repeats=1 if quick else 3
    )
    shape = train.QUICK[0] if quick else train.FULL[0]
    sizes = [1_000_000, 10_000_000] if quick else [10_000_000, 100_000_000]
    loader = loader_and_memory(sizes, batches=200 if quick else 2000, shape=shape)
    sizes = prepare_sizes or ([2_000_000, 4_000_000] if quick else [100_000_000, 1_000_000_000])
    memory = prepare_memory(sizes, workers)
    result = {
        "benchmark": "data",
        "quick": quick,
        "machine": machine(),
        "workers": workers,
        "prepare": prep,
        "loader": loader,
        "prepare_memory": memory,
    }
    print_tables(tables(result))
    print(memory_verdict(memory))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    prep, loader, memory = result["prepare"], result["loader"], result["prepare_memory"]
    return [
        (
            f"prepare vs single-process tiktoken: {prep['documents']} documents, "
            f"{prep['tokens']:,} tokens",
            prep["rows"],
            ["contender", "tokens_per_s", "x_single", "x_ideal"],
        ),
        (
            f"loader vs the training step ({loader['consumer']}: "
            f"{loader['step_windows_per_s']:.2f} windows/s)",
            loader["rows"],
            ["dataset_tokens", "windows_per_s", "x_step_consumption", "peak_rss_mib"],
        ),
        (
            f"prepare's peak memory, {result.get('workers', '?')} workers; corpus: "
            f"{memory['corpus']}",
            memory["rows"],
            [
                "corpus_mb",
                "single_line_mb",
                "tokens",
                "seconds",
                "peak_tree_rss_mib",
                "peak_tree_pss_mib",
                "peak_process_rss_mib",
                "peak_worker_rss_mib",
                "under_1gib",
            ],
        ),
    ]


def memory_verdict(memory: dict) -> str:
    """One line: whether prepare's peak memory meets the target, and by which numbers."""
    ratio = memory["peak_rss_ratio_largest_to_smallest"]
    flat = (
        "needs two sizes"
        if ratio is None
        else f"{ratio:.2f} ({'yes' if memory['flat'] else 'no'}, target < {FLAT_TARGET})"
    )
    peak = max(r["peak_tree_rss_mib"] for r in memory["rows"])
    return (
        f"target {'met' if memory['target_met'] else 'NOT met'}: highest peak "
        f"{peak:,.0f} MiB ({'under' if memory['under_1gib'] else 'over'} 1 GiB), "
        f"flat: peak at the largest / smallest size = {flat}"
    )
