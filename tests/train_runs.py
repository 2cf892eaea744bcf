"""What the train-stage tests share: the tiny model, the environment of a training
process, the prepared slice of the standard library (prepared once per run of the suite),
the command that trains, and training in the test's own process where the process is not
what is under test."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "model.context_length=64",
    "model.emb_dim=64",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.tie_embeddings=true",
    "model.drop_rate=0.0",
]


def env() -> dict:
    e = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    e.pop("WANDB_API_KEY", None)
    return e


def prepare_stdlib(root: Path) -> Path:
    """About 300k tokens of the Python standard library, prepared by the prepare stage
    into root/stdlib."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.prepare",
            f"data.root={root}",
            "data.name=stdlib",
            "data.source.kind=python-stdlib",
            "data.source.max_bytes=1000000",
            "data.num_workers=2",
        ],
        cwd=ROOT,
        env=env(),
        check=True,
        capture_output=True,
    )
    return root


def shared_stdlib(tmp_path_factory) -> Path:
    """prepare_stdlib's data set, prepared once for the whole run of the suite: under
    pytest-xdist the workers' temporary roots share a parent, and the first worker to
    arrive prepares it there while the others wait on the lock."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "shared-stdlib"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "stdlib" / "manifest.json").is_file():
            prepare_stdlib(root)
    return root


def train_args(
    data_root: Path, runs: Path, name: str, *extra: str, data_name: str = "stdlib"
) -> list[str]:
    return [
        f"data.root={data_root}",
        f"data.name={data_name}",
        f"runs_root={runs}",
        f"name={name}",
        *TINY_MODEL,
        "train.micro_batch_size=4",
        "train.lr=3e-3",
        "eval.batches=4",
        "eval.max_new_tokens=8",
        "eval.whole_split_at_end=false",  # ~9 s a run here; the 60-step run checks it
        "checkpoint.keep_last=0",
        *extra,
    ]


def two_cpu_processes(port: int) -> list[str]:
    """`accelerate launch` of two CPU processes on this machine (gloo), up to its `-m`:
    what stands in for two GPUs in the tests."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--monitor_interval",
        "1",
        "-m",
    ]


def run_train(args: list[str], launcher: list[str] | None = None, **kw):
    cmd = (launcher or [sys.executable, "-m"]) + ["pipeline.train"] + args
    return subprocess.run(
        cmd, cwd=ROOT, env=kw.pop("env", env()), capture_output=True, text=True, timeout=600, **kw
    )


def run_or_dump_stacks(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd`; if it outlasts `timeout`, SIGABRT every process it started, workers first
    (Python's faulthandler, on through PYTHONFAULTHANDLER, prints each one's stack), and
    fail with that output: a hang in a multi-process test says where each process waited.
    Descendants are found by walking the tree: launchers put workers in sessions of their own."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid)
        everyone = [*reversed(tree.children(recursive=True)), tree]
        for p in everyone:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        psutil.wait_procs(everyone, timeout=20)
        for p in everyone:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} hung for {timeout} s; the stacks:\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_here(
    args: list[str], config_file: Path | None = None, wandb_mode: str | None = "disabled"
) -> dict:
    """Train in this process through the stage's own `run` (what `python -m
    pipeline.train` calls after parsing): for tests of what a run computes and writes,
    which need no interpreter of their own. Accelerate's process state is a singleton, so
    it is reset around each run, as a fresh process would have it. WANDB_MODE is
    `wandb_mode` unless the test set it (None: unset, so the config decides)."""
    from accelerate.state import AcceleratorState

    from pipeline.config import load_config
    from pipeline.train import run

    AcceleratorState._reset_state(reset_partial_state=True)
    before = os.environ.get("WANDB_MODE")
    if before is None and wandb_mode is not None:
        os.environ["WANDB_MODE"] = wandb_mode
    try:
        return run(load_config(config_file, args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if before is None:
            os.environ.pop("WANDB_MODE", None)
