"""Golden losses: what a one-process, one-thread reference run computes, kept in
tests/golden/losses.json so that parity tests compare against the file instead of
training their own reference each time.

A value is only as good as the machine that made it: fp32 matmuls round differently on
other CPU kinds (AVX2, AVX512, AMX) and torch versions, and the data differ with the
Python whose standard library was tokenized. So each entry is keyed by the CPU
capability, the torch version and the digests of the data's shards; where the file has
no entry for this machine, the reference is trained as before (a slower run, the same
check). `make golden` retrains every reference and rewrites the entries of this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

FILE = Path(__file__).parent / "golden" / "losses.json"
WRITE = os.environ.get("GOLDEN_WRITE") == "1"  # set by `make golden`


def machine_key(data_dir: Path) -> str:
    return (
        f"{torch.backends.cpu.get_cpu_capability()} torch {torch.__version__} "
        f"data {data_digest(data_dir)}"
    )


def data_digest(data_dir: Path) -> str:
    """The shards' recorded sha256s, hashed: the tokens, not where they were prepared."""
    digests: list[str] = []

    def collect(node) -> None:
        if isinstance(node, dict):
            digests.extend(v for k, v in sorted(node.items()) if k == "sha256")
            for k, v in sorted(node.items()):
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(json.loads((data_dir / "manifest.json").read_text())["splits"])
    for manifest in sorted(data_dir.glob("*/manifest.json")):  # a mixture's sources
        collect(json.loads(manifest.read_text())["splits"])
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def reference_losses(name: str, data_dir: Path, train: Callable[[], list[float]]) -> list[float]:
    """The per-step losses of reference `name` on this machine: from the file, or from
    `train()` (on one thread, as the file's were made) when the file has none; under
    GOLDEN_WRITE=1 always trained, and written."""
    key = machine_key(data_dir)
    golden = json.loads(FILE.read_text()) if FILE.is_file() else {}
    known = golden.get(name, {}).get(key)
    if known is not None and not WRITE:
        return known
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = train()
    finally:
        torch.set_num_threads(threads)
    if WRITE:
        golden.setdefault(name, {})[key] = losses
        FILE.parent.mkdir(exist_ok=True)
        FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    return losses
