"""Evaluate: val tokens/s of the evaluate stage (pipeline.evaluate.evaluate, one process)
against the training step's forward alone on the same batches and model:
  evaluate stage                       evaluate(model, windows, batch, accelerator)
  train forward (logits + CE)          the book's loss with autograd on, no backward
  forward(idx, targets), no_grad       the fused loss without gradients: what evaluate
                                       could call instead of logits + F.cross_entropy
Knows evaluate's public function only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import train
from benchmarks.common import interleave, machine, median, print_tables
from benchmarks.data import write_dataset


def run(quick: bool = False) -> dict:
    from accelerate import Accelerator

    from pipeline.data.loader import TokenWindows, fixed_batches
    from pipeline.evaluate import evaluate

    shape = train.QUICK[0] if quick else train.FULL[0]
    cfg, batch = shape.cfg, shape.batch
    n_batches = 2 if quick else 6
    windows_needed = n_batches * batch
    torch.manual_seed(0)
    model = train.GPTModel(cfg)
    accelerator = Accelerator(cpu=True)
    with tempfile.TemporaryDirectory() as root:
        data = write_dataset(
            Path(root), 100_000, val_tokens=windows_needed * cfg.context_length + 1
        )
        windows = TokenWindows(data, "val", cfg.context_length)
        assert len(windows) == windows_needed, len(windows)
        batches = list(fixed_batches(windows, batch))
        tokens = sum(y.numel() for _, y in batches)
        results = {}

        def stage():
            results["stage"] = evaluate(model, windows, batch, accelerator)["loss"]

        def train_forward():
            model.train()
            for x, y in batches:
                F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        def fused_no_grad():
            model.eval()
            total = 0.0
            with torch.no_grad():
                for x, y in batches:
                    total += model(x, targets=y).item() * y.numel()
            results["fused"] = total / tokens

        times = interleave(
            {
                "evaluate stage": stage,
                "train forward (logits + CE)": train_forward,
                "forward(idx, targets), no_grad": fused_no_grad,
            },
            repeats=1 if quick else 3,
        )
    rows = [
        {"contender": name, "tokens_per_s": tokens / median(t), "seconds": t}
        for name, t in times.items()
    ]
    base = rows[1]["tokens_per_s"]
    for r in rows:
        r["x_train_forward"] = r["tokens_per_s"] / base
    result = {
        "benchmark": "evaluate",
        "quick": quick,
        "machine": machine(),
        "shape": shape.name,
        "model": cfg.__dict__,
        "batch": batch,
        "val_tokens": tokens,
        "losses_agree": abs(results["stage"] - results["fused"]) < 1e-4,
        "losses": results,
        "rows": rows,
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    return [
        (
            f"evaluate vs the training forward: {result['val_tokens']:,} val tokens, "
            f"{result['shape']}, fp32",
            result["rows"],
            ["contender", "tokens_per_s", "x_train_forward"],
        )
    ]
