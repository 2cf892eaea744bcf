"""Benchmarks against peers, run side by side on one machine: `python -m benchmarks`.

One module per benchmark, each with `run(quick) -> dict`; `__main__` runs the chosen ones,
prints their tables and writes benchmarks/results/<name>.json.
"""
