"""Time to a target val loss: our train stage, as `make train` launches it, against Hugging
Face's `Trainer` training `GPT2LMHeadModel` of the same shape on the same windows with the
same batch, schedule and precision (benchmarks/hf_trainer.py), against our best recipe
(configs/tiny-fast.yaml), and the tiny recipe on a Llama-style model (configs/llama-tiny.yaml).

Each contender is a fresh process that trains from scratch on the built-in corpus (the
tiny config's data set, prepared beforehand) and evaluates on the same val windows every
eval.every_steps steps. Its time to the target is the training wall time, evaluations
excluded, at which the val loss crosses the target (linearly interpolated between the two
evaluations around the crossing). Contenders take turns, in a rotated order each round,
and are compared by the ratio of their median times.
Knows the pipeline's configs and command lines, not its internals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import machine, median, print_tables

ROOT = Path(__file__).resolve().parent.parent
TARGET = 4.0  # nats; the tiny recipe reaches it in about 2 minutes on 2 AVX2 cores
# Every contender evaluates on the same first 80 val windows every 20 steps, and saves
# no checkpoint before its end: neither is training time.
VAL_WINDOWS = 80
COMMON = ["eval.every_steps=20", "checkpoint.every_steps=100000"]
# --quick: a model small enough that a run takes seconds (smoke, not a measurement)
QUICK = [
    "model.context_length=32",
    "train.micro_batch_size=2",
    "train.max_steps=20",
    "train.warmup_steps=4",
    "eval.every_steps=5",
    "checkpoint.every_steps=100000",
]
QUICK_VAL_WINDOWS = 4
QUICK_TARGET = 9.8


@dataclass
class Contender:
    name: str
    config: str
    kind: str  # "ours" or "hf"
    overrides: list[str] = field(default_factory=list)


CONTENDERS = [
    Contender("ours, tiny.yaml", "configs/tiny.yaml", "ours"),
    Contender("transformers Trainer, same recipe", "configs/tiny.yaml", "hf"),
    Contender("ours, tiny-fast.yaml (best)", "configs/tiny-fast.yaml", "ours"),
    # the same recipe as tiny.yaml on a Llama-style model of its size (RoPE, RMSNorm,
    # SwiGLU, grouped-query attention)
    Contender("ours, llama-tiny.yaml", "configs/llama-tiny.yaml", "ours"),
]


def command(contender: Contender, work: Path, overrides: list[str], val_windows: int) -> list[str]:
    """The command line that trains one contender, writing its results under `work`."""
    from pipeline.config import load_config

    settings = [*overrides, *contender.overrides]
    batch = load_config(contender.config, settings).train.micro_batch_size
    settings.append(f"eval.batches={max(1, val_windows // batch)}")  # the same val windows
    if contender.kind == "hf":
        return [
            sys.executable,
            "-m",
            "benchmarks.hf_trainer",
            "--config",
            contender.config,
            "--out",
            str(work / "hf.json"),
            *settings,
        ]
    # as the Makefile's LAUNCH does on a machine without a GPU, or with one
    on_gpu = _has_gpu()
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"configs/accelerate/{'single-gpu' if on_gpu else 'cpu'}.yaml",
        "--num_processes",
        "1",
    ]
    if not on_gpu:
        launch += ["--num_cpu_threads_per_process", str(os.cpu_count())]
    return [
        *launch,
        "-m",
        "pipeline.train",
        "--config",
        contender.config,
        f"runs_root={work}",
        "name=run",
        *settings,
    ]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluations(contender: Contender, work: Path) -> list[dict]:
    """[{step, train_s, val_loss}] of a finished run."""
    if contender.kind == "hf":
        return json.loads((work / "hf.json").read_text())["evaluations"]
    out, trained, last_step = [], 0.0, 0
    for line in (work / "run" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        # step_time: seconds per step over the interval since the last row, evaluation excluded
        if "step_time" in row:
            trained += row["step_time"] * (row["step"] - last_step)
            last_step = row["step"]
        if "val_loss" in row:
            out.append({"step": row["step"], "train_s": trained, "val_loss": row["val_loss"]})
    return out


def crossing(evals: list[dict], target: float) -> dict | None:
    """Training seconds and steps at which the val loss first reaches `target`, linear
    between the evaluation before and the one at the crossing; None if never."""
    before = {"step": 0, "train_s": 0.0, "val_loss": None}
    for e in evals:
        if e["val_loss"] <= target:
            if before["val_loss"] is None:
                return {"train_s": e["train_s"], "step": float(e["step"])}
            share = (before["val_loss"] - target) / (before["val_loss"] - e["val_loss"])
            return {k: before[k] + share * (e[k] - before[k]) for k in ("train_s", "step")}
        before = e
    return None


def train_once(contender: Contender, overrides: list[str], val_windows: int, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="ttl-") as tmp:
        work = Path(tmp)
        log = log_dir / f"{contender.kind}-{Path(contender.config).stem}.log"
        env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if not _has_gpu() else dict(os.environ)
        with open(log, "w") as out:
            done = subprocess.run(
                command(contender, work, overrides, val_windows),
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{contender.name} failed (exit {done.returncode}):\n{tail}")
        return {"evaluations": evaluations(contender, work)}


def prepare_data(config: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", "--config", config],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def run(quick: bool = False, rounds: int | None = None) -> dict:
    rounds = rounds or (1 if quick else 2)
    target = QUICK_TARGET if quick else TARGET
    overrides = QUICK if quick else COMMON
    val_windows = QUICK_VAL_WINDOWS if quick else VAL_WINDOWS
    for config in sorted({c.config for c in CONTENDERS}):
        prepare_data(config)
    runs: dict[str, list[dict]] = {c.name: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory(prefix="ttl-logs-") as logs:
        for r in range(rounds):
            order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
            for contender in order:
                print(f"round {r + 1}/{rounds}: {contender.name}", flush=True)
                result = train_once(contender, overrides, val_windows, Path(logs))
                result["to_target"] = crossing(result["evaluations"], target)
                runs[contender.name].append(result)
    rows = [summary_row(c, runs[c.name]) for c in CONTENDERS]
    hf = next(r for r in rows if r["kind"] == "hf")
    for r in rows:
        if r["seconds"] and hf["seconds"]:
            r["x_transformers"] = hf["seconds"] / r["seconds"]
    result = {
        "benchmark": "time_to_loss",
        "quick": quick,
        "machine": machine(),
        "target_val_loss": target,
        "rounds": rounds,
        "common_overrides": overrides,
        "rows": rows,
        "runs": runs,
        "how": "each contender a fresh process trained from scratch; seconds: median "
        "over rounds of the training time (evaluations excluded) at which the val "
        "loss crosses the target, interpolated between evaluations; "
        "x_transformers: transformers' seconds / this contender's",
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    return [
        (
            f"time to val loss {result['target_val_loss']} (training wall time, evaluations "
            f"excluded), {result['rounds']} round(s)",
            result["rows"],
            ["contender", "seconds", "steps", "s_per_step", "final_val_loss", "x_transformers"],
        )
    ]


def summary_row(contender: Contender, results: list[dict]) -> dict:
    reached = [r["to_target"] for r in results if r["to_target"]]
    row = {
        "contender": contender.name,
        "kind": contender.kind,
        "config": contender.config,
        "reached": f"{len(reached)}/{len(results)}",
        "final_val_loss": results[-1]["evaluations"][-1]["val_loss"],
    }
    if len(reached) == len(results):
        row["seconds"] = median([r["train_s"] for r in reached])
        row["steps"] = median([r["step"] for r in reached])
        row["s_per_step"] = row["seconds"] / row["steps"]
    else:
        row["seconds"] = None
    return row
