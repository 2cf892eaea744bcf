"""What the train-stage tests share: the tiny model, the environment of a training
process, the prepared slice of the standard library, and the command that trains."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "model.context_length=64", "model.emb_dim=64", "model.n_heads=4", "model.n_layers=2",
    "model.tie_embeddings=true", "model.drop_rate=0.0",
]


def env() -> dict:
    e = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
         "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("WANDB_API_KEY", None)
    return e


def prepare_stdlib(root: Path) -> Path:
    """About 300k tokens of the Python standard library, prepared by the prepare stage
    into root/stdlib."""
    subprocess.run([sys.executable, "-m", "pipeline.prepare", f"data.root={root}",
                    "data.name=stdlib", "data.source.kind=python-stdlib",
                    "data.source.max_bytes=1000000", "data.num_workers=2"],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    return root


def train_args(data_root: Path, runs: Path, name: str, *extra: str,
               data_name: str = "stdlib") -> list[str]:
    return [f"data.root={data_root}", f"data.name={data_name}", f"runs_root={runs}", f"name={name}",
            *TINY_MODEL, "train.micro_batch_size=4", "train.lr=3e-3", "eval.batches=4",
            "eval.max_new_tokens=8", "checkpoint.keep_last=0", *extra]


def run_train(args: list[str], launcher: list[str] | None = None, **kw):
    cmd = (launcher or [sys.executable, "-m"]) + ["pipeline.train"] + args
    return subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", env()), capture_output=True,
                          text=True, timeout=600, **kw)
