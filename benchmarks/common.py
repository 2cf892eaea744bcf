"""What every benchmark shares: the machine's description, interleaved timing, the table
and the JSON result file.

The machine is shared and its speed drifts, so contenders are timed in turns
(A B C, then B C A, ...) after a warm-up, and compared by the ratio of their medians.
Knows nothing about what is being timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.core.fileio import atomic_write_json

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU model, cores, library versions and device of this run."""
    import transformers

    from pipeline.training.mfu import processor_name

    return {
        "cpu": processor_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_rows": bf16_meaningful(),
        "load_average_1m": os.getloadavg()[0],
    }


def bf16_meaningful() -> bool:
    """bf16 rows are timed only where bf16 is a choice a user would make: on a GPU, or a
    CPU with bf16 matrix units (elsewhere it is ~40x slower than fp32 and only costs time)."""
    from pipeline.training.precision import cpu_bf16_flags

    return torch.cuda.is_available() or bool(cpu_bf16_flags())


def transformers_gpt2(cfg):
    """transformers' GPT2LMHeadModel of a ModelConfig's shape, with its own GPT-2 init."""
    import transformers

    from pipeline.model.gpt2 import hf_config

    settings = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))


def interleave(
    contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turns; the first `warmup` rounds
    are run and thrown away. The order rotates each round so no contender always runs
    right after the same other one."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `rows` (dicts) with the given columns, numbers rounded."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def print_tables(tables: list[tuple[str, list[dict], list[str]]]) -> None:
    """A benchmark's tables, (caption, rows, columns) each, as plain text."""
    for caption, rows, columns in tables:
        print(caption)
        print(table(rows, columns))


def write_result(name: str, result: dict, directory: Path = RESULTS) -> Path:
    """<directory>/<name>.json (default benchmarks/results/), written atomically."""
    path = Path(directory) / f"{name}.json"
    atomic_write_json(path, result)
    return path
