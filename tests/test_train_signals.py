"""The train stage stopped from outside: signals, dead launchers, closed pipes, groups that
do not form, a second training, a non-finite loss. Real processes, since signals, exit
codes and process counts are what is under test; the run's own behaviour is in
test_train.py (the two files run on different pytest workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_runs import ROOT, env, run_train, train_args, train_here, two_cpu_processes

from pipeline.core.errors import PipelineError

pytestmark = pytest.mark.slow  # every test here runs real training processes


@pytest.fixture(scope="module")
def data_root(stdlib_data) -> Path:
    return stdlib_data


def test_sigterm_writes_a_checkpoint_and_exits_zero(data_root, tmp_path):
    cmd = [sys.executable, "-m", "pipeline.train"] + train_args(
        data_root,
        tmp_path,
        "term",
        "train.max_steps=100000",
        "train.log_every_steps=1",
        "eval.every_steps=100000",
        "checkpoint.every_steps=100000",
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Resume" in stdout
    saved = list((tmp_path / "term" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "meta.json").is_file()
    assert 3 <= json.loads((saved[0] / "meta.json").read_text())["step"] < 100000


@pytest.mark.parametrize("argv", [["--help"], ["--config"], ["train.lr=abc"]])
def test_main_gives_the_signal_handlers_back_however_it_ends(argv, capsys):
    """In a caller's process (a notebook, a test): after main, Ctrl-C interrupts and
    SIGTERM ends it again. --help and a bad argument used to leave train's handlers, which
    only record a signal: a pool forked later by prepare could then never be terminated."""
    from pipeline.train import main

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        main(argv)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_non_finite_loss_stops_naming_the_step(data_root, tmp_path):
    """A PipelineError, which every stage's main prints as one paragraph with exit code 2
    (tests/test_bad_input.py); in this process, since no signal or exit code is under test."""
    with pytest.raises(PipelineError, match="at step"):
        train_here(
            train_args(
                data_root,
                tmp_path,
                "nan",
                "train.max_steps=20",
                "train.lr=1e30",
                "train.grad_clip=null",
                "train.log_every_steps=1",
                "eval.every_steps=1000",
                "checkpoint.every_steps=1000",
            )
        )
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_sigterm_to_one_of_two_processes_stops_both_one_step_later(data_root, tmp_path, free_port):
    """A scheduler may signal only one node: the signalled worker's flag reaches the other
    through the sum that every step starts and the next one reads, so both checkpoint the
    same step, at most the step in flight when the signal came plus one."""
    launcher = [*two_cpu_processes(free_port()), "pipeline.train"]
    args = train_args(
        data_root,
        tmp_path,
        "one",
        "train.max_steps=100000",
        "train.log_every_steps=1",
        "eval.every_steps=100000",
        "checkpoint.every_steps=100000",
        "train.micro_batch_size=16",
    )
    proc = subprocess.Popen(
        launcher + args,
        cwd=ROOT,
        env={**env(), "ACCELERATE_USE_CPU": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _signal_the_second_and_check(proc, tmp_path)
    finally:
        if proc.poll() is None:  # its workers get SIGTERM from the kernel (PDEATHSIG)
            os.killpg(proc.pid, signal.SIGKILL)


def _signal_the_second_and_check(proc: subprocess.Popen, tmp_path: Path) -> None:
    log = tmp_path / "one" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    workers = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if _is_worker_of(pid, proc.pid, rank="1")
    ]
    assert len(workers) == 1, workers
    logged = json.loads(log.read_text().splitlines()[-1])["step"]
    os.kill(workers[0], signal.SIGTERM)  # the second process only
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    (saved,) = (tmp_path / "one" / "checkpoints").glob("step_*")
    stopped = json.loads((saved / "meta.json").read_text())["step"]
    # the step in flight when the signal came (logged + 1), and the one after it
    assert logged < stopped <= logged + 2, (logged, stopped)
    assert "Stopped by a signal to another process" in stdout


def _is_worker_of(pid: int, launcher: int, rank: str) -> bool:
    """Whether `pid` is a pipeline.train worker below `launcher` (torch elastic starts
    its workers in sessions of their own, so by parentage) with LOCAL_RANK `rank`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"pipeline.train" not in cmdline or f"LOCAL_RANK={rank}".encode() not in environ:
        return False
    for _ in range(8):  # up the parent chain to the launcher
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if pid == launcher:
            return True
    return False


@pytest.mark.parametrize("after", [0.3, 3.0])
def test_sigterm_during_startup_is_a_clean_stop(data_root, tmp_path, after):
    """While torch loads (0.3 s) and while the stage sets up (3 s): exit 0, no traceback."""
    cmd = [sys.executable, "-m", "pipeline.train"] + train_args(
        data_root, tmp_path, "early", "train.max_steps=100000", "eval.every_steps=100000"
    )
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Stopped by SIGTERM" in stdout


# Launchers the README names, each started as a user would; the harness SIGKILLs it while
# its worker writes its progress to stderr (log_every_steps=1), then reaps the orphans.
KILLED_LAUNCHERS = {
    # accelerate's simple launcher tees the worker's stderr through a pipe (1.16 on): the
    # worker's next write after the kill meets a broken pipe.
    "accelerate": lambda port: [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "pipeline.train",
    ],
    # accelerate's multi-process path (torch elastic inside the launcher), two workers.
    "multinode.sh": lambda port: [
        "env",
        f"MASTER_PORT={port}",
        "GPUS_PER_NODE=2",
        f"ACCELERATE={Path(sys.executable).parent / 'accelerate'}",
        str(ROOT / "launch" / "multinode.sh"),
        str(ROOT / "configs" / "tiny.yaml"),
    ],
    "torchrun": lambda port: [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(port),
        "-m",
        "pipeline.train",
    ],
}


@pytest.mark.parametrize("launcher", KILLED_LAUNCHERS)
def test_workers_of_a_killed_launcher_checkpoint_and_exit_0(
    data_root, tmp_path, free_port, launcher
):
    command = KILLED_LAUNCHERS[launcher](free_port()) + train_args(
        data_root,
        tmp_path,
        "orphan",
        "train.max_steps=100000",
        "train.log_every_steps=1",
        "eval.every_steps=100000",
        "checkpoint.every_steps=100000",
    )
    harness = [
        sys.executable,
        str(ROOT / "tests" / "launcher_harness.py"),
        str(tmp_path / "orphan"),
        "300",
        "--",
        *command,
    ]
    out = subprocess.run(harness, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    workers = json.loads(out.stdout)["workers"]
    assert workers and set(workers.values()) == {0}, workers  # a clean stop, every one
    saved = list((tmp_path / "orphan" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "meta.json").is_file()
    if launcher == "accelerate":  # the piped stderr broke: its text went on to the run's log
        assert "stderr went away (Broken pipe)" in (tmp_path / "orphan" / "console.log").read_text()


def test_a_run_piped_into_head_finishes_and_exits_0(data_root, tmp_path):
    """`python -m pipeline.train ... | head -1`: head reads one line and exits."""
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            *train_args(
                data_root, tmp_path, "head", "train.max_steps=12", "train.log_every_steps=1"
            ),
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    head = subprocess.run(["head", "-1"], stdin=train.stdout, capture_output=True, timeout=300)
    train.stdout.close()  # only head holds the pipe's reading end, and head is gone
    assert train.wait(timeout=300) == 0 and head.stdout
    meta = json.loads((tmp_path / "head" / "checkpoints" / "step_000012" / "meta.json").read_text())
    assert meta["step"] == 12
    assert "went away (Broken pipe)" in (tmp_path / "head" / "console.log").read_text()


def test_processes_that_form_no_group_are_stopped_with_the_fix(data_root, tmp_path, free_port):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs and
    without ACCELERATE_USE_CPU=1: Accelerate makes no group of the two processes."""
    e = env()
    e.pop("ACCELERATE_USE_CPU", None)
    launcher = two_cpu_processes(free_port())  # but without ACCELERATE_USE_CPU=1
    out = run_train(train_args(data_root, tmp_path, "split", "train.max_steps=2"), launcher, env=e)
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert "launched as one of WORLD_SIZE=2, but Accelerate formed no process group" in message
    assert "ACCELERATE_USE_CPU=1" in message
    assert not (tmp_path / "split" / "metrics.jsonl").exists()


def test_a_second_training_on_the_same_run_is_refused(data_root, tmp_path):
    from pipeline.core.locking import exclusive

    with exclusive(tmp_path / "busy", "training"):
        out = run_train(train_args(data_root, tmp_path, "busy", "train.max_steps=2"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is in use: process" in " ".join(out.stderr.split())
    assert not (tmp_path / "busy" / "metrics.jsonl").exists()
