"""prepare's tokens/s on the built-in corpus next to single-process tiktoken, in one run.

    .venv/bin/python -m benchmarks.prepare_speed [--max-bytes N] [--workers 2] [--rounds 2]

The contenders take turns (encode, prepare, prepare, encode, ...) because the machine is
shared and its speed drifts. `encode_ordinary` is timed on documents already in memory;
prepare's time is the whole stage (reading files, worker start, hashing, writing and
fsyncing shards), as its own summary line reports it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from pipeline import corpus
from pipeline.config import load_config
from pipeline.prepare import prepare
from pipeline.tokenizer import get_tokenizer


def encode_all(docs: list[str]) -> int:
    enc = get_tokenizer()
    return sum(len(enc.encode_ordinary(doc)) for doc in docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=None, help="cap (default: all ~31 MB)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    source = [f"data.source.max_bytes={args.max_bytes}"] if args.max_bytes else []
    docs = list(corpus.documents(load_config(None, source).data.source, "."))
    times: dict[str, list[float]] = {"encode_ordinary, 1 process": [],
                                     f"prepare, num_workers={args.workers}": []}
    tokens = encode_all(docs)  # warm-up, and the count both must reach
    with tempfile.TemporaryDirectory() as root:
        cfg = load_config(None, source + [f"data.root={root}",
                                          f"data.num_workers={args.workers}"])
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(times)[::-1]
            for name in order:
                start = time.perf_counter()
                if name.startswith("encode"):
                    encode_all(docs)
                else:
                    manifest = prepare(cfg, force=True)
                    # prepare adds one <|endoftext|> per document
                    assert manifest.tokens("train") + manifest.tokens("val") == tokens + len(docs)
                times[name].append(time.perf_counter() - start)
    print(f"python-stdlib: {len(docs):,} documents, {sum(map(len, docs)):,} characters, "
          f"{tokens:,} tokens; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for name, secs in times.items():
        median = statistics.median(secs)
        print(f"  {name:32s} {median:6.2f} s  {tokens / median:12,.0f} tokens/s")


if __name__ == "__main__":
    main()
