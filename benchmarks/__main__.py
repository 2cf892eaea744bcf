"""`python -m benchmarks [--quick] [--out DIR] [--prepare-sizes SIZES] [names...]`: run
benchmarks, print their tables, write <out>/<name>.json (default benchmarks/results/, or
results/quick/ with --quick so a smoke run never overwrites the full figures).

    python -m benchmarks                  # everything, ~40 min on 2 shared cores
    python -m benchmarks --quick          # smoke run of everything, ~4 min
    python -m benchmarks time-to-loss     # ~20 min: our train stage against HF's Trainer
    python -m benchmarks train profile    # some of them
    python -m benchmarks data --prepare-sizes 20MB,50MB --out /tmp/bench
                                          # prepare's peak memory at other corpus sizes
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import time
from pathlib import Path

from benchmarks import quiet
from benchmarks.common import RESULTS, write_result

# name -> module; run in this order
BENCHMARKS = {
    "time-to-loss": "time_to_loss",
    "train": "train",
    "vocab-padding": "vocab_padding",
    "profile": "profile_step",
    "generate": "generate",
    "data": "data",
    "evaluate": "evaluate",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes, one repeat: smoke (measured on any machine)",
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=300,
        metavar="SECONDS",
        help="how long to wait for other processes to leave the CPUs before "
        "each benchmark (default 300)",
    )
    parser.add_argument(
        "--busy-ok",
        action="store_true",
        help="measure on a busy machine anyway; the tables say it was busy",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON files")
    parser.add_argument(
        "--prepare-sizes",
        type=byte_sizes,
        default=None,
        metavar="SIZES",
        help="data: corpus sizes of prepare's peak-memory measurement, "
        "comma-separated, e.g. 20MB,50MB (MB = 10^6 bytes; default "
        "100MB,1GB, with --quick 2MB,4MB)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    if args.prepare_sizes and args.names and "data" not in args.names:
        parser.error("--prepare-sizes is an option of the data benchmark: add 'data' to the names")
    return args


UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def byte_sizes(text: str) -> list[int]:
    """'20MB,1GB' -> [20_000_000, 1_000_000_000] (argparse type of --prepare-sizes)."""
    sizes = []
    for item in text.split(","):
        number = item.strip().rstrip("bBkKmMgGiI")
        unit = item.strip()[len(number) :].upper()
        try:
            size = float(number) * UNITS[unit]
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not a size: write a number and a unit, e.g. 20MB, "
                f"1.5GB or 512MiB"
            ) from None
        if size < 1:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: a size must be positive")
        sizes.append(int(size))
    return sizes


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    for name in args.names or list(BENCHMARKS):
        print(f"\n== {name}{' (quick)' if args.quick else ''}", flush=True)
        if not (args.quick or args.busy_ok):
            try:
                quiet.wait_until_quiet(args.patience)
            except quiet.Busy as e:
                raise SystemExit(
                    f"not measuring {name}: {e}. A busy machine hurts contenders unequally; "
                    f"stop what is running and start again, or pass --busy-ok to measure "
                    f"anyway (the tables then say how busy it was)"
                ) from None
        start = time.perf_counter()
        watch = quiet.Watch().start()
        module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
        options = {"prepare_sizes": args.prepare_sizes} if name == "data" else {}
        result = module.run(quick=args.quick, **options)
        sample = watch.stop()
        result["quiet"] = sample.record()
        result["wall_s"] = time.perf_counter() - start
        result["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        )
        path = write_result(name, result, out)
        print(
            f"{name}: {result['wall_s']:.0f} s, wrote {path}; "
            f"{'quiet' if sample.quiet else 'BUSY'}: {sample.describe()}",
            flush=True,
        )


if __name__ == "__main__":
    main()
