"""Data: the prepare stage against single-process tiktoken, the loader against what the
training step consumes, and the loader's peak memory over a 10M and a 100M token set.

- prepare: tokens/s of `pipeline.prepare.prepare` (num_workers = cores; reading, splitting,
  tokenizing in worker processes, writing shards) and of `encode_ordinary` over the same
  documents already in memory, in turns. The ideal is encode's rate x workers.
- loader: windows/s of TrainBatches(TokenWindows(...)) (shuffled, memory-mapped) against
  windows/s that the fastest training step (ours-fast, benchmarks.train) consumes.
- memory: peak RSS of a fresh process that opens a data set of random tokens and draws
  the same number of batches from it, for two data set sizes; flat is the goal.
Knows the loader and prepare only through their public functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import train
from benchmarks.common import interleave, machine, median, table
from pipeline.shards import Manifest, ShardInfo, write_shard

ROOT = Path(__file__).resolve().parent.parent


def prepare_vs_tiktoken(max_bytes: int | None, workers: int, repeats: int) -> dict:
    from pipeline import corpus
    from pipeline.config import load_config
    from pipeline.prepare import prepare
    from pipeline.tokenizer import get_tokenizer

    source = ["data.source.kind=python-stdlib"]
    if max_bytes is not None:  # None: the whole built-in corpus (~31 MB, ~15M tokens)
        source.append(f"data.source.max_bytes={max_bytes}")
    docs = list(corpus.documents(load_config(None, source).data.source, "."))
    enc = get_tokenizer()
    tokens = sum(len(enc.encode_ordinary(d)) for d in docs)  # also the warm-up
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(None, source + [f"data.root={root}", f"data.num_workers={workers}"])
        times = interleave({
            "encode_ordinary, 1 process": lambda: [enc.encode_ordinary(d) for d in docs],
            f"prepare, {workers} workers": lambda: prepare(cfg, force=True),
        }, repeats, warmup=0)
    rows = [{"contender": name, "tokens_per_s": tokens / median(t), "seconds": t}
            for name, t in times.items()]
    single = rows[0]["tokens_per_s"]
    for r in rows:
        r["x_single"] = r["tokens_per_s"] / single
        r["x_ideal"] = r["tokens_per_s"] / (single * workers)
    return {"documents": len(docs), "characters": sum(map(len, docs)), "tokens": tokens,
            "max_bytes": max_bytes, "workers": workers, "repeats": repeats, "rows": rows}


def write_dataset(directory: Path, tokens: int, val_tokens: int = 0, seed: int = 0) -> Path:
    """A data set of random GPT-2 tokens: one train and one val shard and a manifest."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", tokens), ("val", val_tokens or max(tokens // 100, 1000))):
        name = f"{split}_000000.bin"
        body = rng.integers(0, 50257, size=n, dtype=np.uint16)
        splits[split] = [ShardInfo(name, n, write_shard(directory / name, body, np.uint16))]
    Manifest(tokenizer="gpt2", vocab_size=50257, dtype="uint16", eot_token=50256,
             splits=splits, documents={"train": 1, "val": 1},
             source={"kind": "random tokens (benchmark)"}, settings={}).save(directory)
    return directory


LOADER_SCRIPT = """
import json, resource, sys, time
from pipeline.loader import TokenWindows, TrainBatches
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
    out = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(data_dir), str(context),
                          str(batch), str(batches)], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_consumption(shape: train.Shape, repeats: int = 2) -> float:
    """Windows/s that ours-fast trains on at `shape` (the most demanding consumer)."""
    cfg = shape.cfg
    ours, hf = train.build_models(cfg)
    x = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length))
    step = train.contenders(ours, hf, x, x)["ours-fast"]
    step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return shape.batch / median(seconds)


def loader_and_memory(sizes: list[int], batches: int, shape: train.Shape) -> dict:
    context, batch = shape.cfg.context_length, shape.batch
    consumption = step_consumption(shape)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for tokens in sizes:
            data_dir = write_dataset(Path(root) / f"t{tokens}", tokens)
            measured = loader_process(data_dir, context, batch, batches)
            rows.append({"dataset_tokens": tokens, "batches": batches, **measured,
                         "peak_rss_mib": measured["peak_rss"] / 2 ** 20,
                         "x_step_consumption": measured["windows_per_s"] / consumption})
            (data_dir / "train_000000.bin").unlink()
    flat = rows[-1]["peak_rss"] / rows[0]["peak_rss"]
    return {"context_length": context, "micro_batch": batch,
            "step_windows_per_s": consumption, "consumer": f"ours-fast at {shape.name}",
            "rows": rows, "peak_rss_ratio_largest_to_smallest": flat}


def run(quick: bool = False) -> dict:
    workers = os.cpu_count() or 1
    prep = prepare_vs_tiktoken(max_bytes=300_000 if quick else None, workers=workers,
                               repeats=1 if quick else 3)
    print(f"prepare vs single-process tiktoken: {prep['documents']} documents, "
          f"{prep['tokens']:,} tokens")
    print(table(prep["rows"], ["contender", "tokens_per_s", "x_single", "x_ideal"]))
    shape = train.QUICK[0] if quick else train.FULL[0]
    sizes = [1_000_000, 10_000_000] if quick else [10_000_000, 100_000_000]
    loader = loader_and_memory(sizes, batches=200 if quick else 2000, shape=shape)
    print(f"loader vs the training step ({loader['consumer']}: "
          f"{loader['step_windows_per_s']:.2f} windows/s)")
    print(table(loader["rows"], ["dataset_tokens", "windows_per_s", "x_step_consumption",
                                 "peak_rss_mib"]))
    return {"benchmark": "data", "quick": quick, "machine": machine(), "prepare": prep,
            "loader": loader}
