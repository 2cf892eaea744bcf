"""`python -m benchmarks [--quick] [--out DIR] [names...]`: run benchmarks, print their
tables, write <out>/<name>.json (default benchmarks/results/, or results/quick/ with
--quick so a smoke run never overwrites the full figures).

    python -m benchmarks                  # everything, ~15 min on 2 shared cores
    python -m benchmarks --quick          # smoke run of everything, < 2 min
    python -m benchmarks train profile    # some of them
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from benchmarks.common import RESULTS, write_result

# name -> module; run in this order
BENCHMARKS = {"train": "train", "profile": "profile_step", "generate": "generate",
              "data": "data", "evaluate": "evaluate"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat: smoke")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON files")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    for name in args.names or list(BENCHMARKS):
        print(f"\n== {name}{' (quick)' if args.quick else ''}", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
        result = module.run(quick=args.quick)
        result["wall_s"] = time.perf_counter() - start
        path = write_result(name, result, out)
        print(f"{name}: {result['wall_s']:.0f} s, wrote {path}", flush=True)


if __name__ == "__main__":
    main()
