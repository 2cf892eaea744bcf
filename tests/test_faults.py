"""Faults injected into real processes: SIGKILL at random moments of prepare and of train
(checkpoint writes included), then the same command again.

What must hold: prepare's data set is byte-identical to an uninterrupted prepare's (and a
killed --force rebuild leaves the old data set or the new one, never a mix); train's last
weights are bit-exact with an uninterrupted run's, and metrics.jsonl holds every step
once. `make test` runs FAULT_TRIALS=2 trials of each (FAULT_SEED fixes the kill times);
`make faults` runs FAULT_TRIALS=10. Each trial prints where its kill landed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.shards import load_manifest, verify

ROOT = Path(__file__).resolve().parents[1]
TRIALS = int(os.environ.get("FAULT_TRIALS", "2"))
KILLS = 5 * TRIALS  # the kills of prepare's chain: 10 in `make test`, 50 in `make faults`
PARTS = 28  # what prepare_args' corpus is cut into (1 MB of stdlib, data.part_bytes=40000)
SEED = int(os.environ.get("FAULT_SEED", "20261122"))
pytestmark = pytest.mark.slow

TRAIN = [
    "model.context_length=32",
    "model.emb_dim=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.drop_rate=0.1",
    "train.micro_batch_size=4",
    "train.lr=3e-3",
    "train.warmup_steps=3",
    "train.max_steps=12",
    "train.log_every_steps=1",
    "eval.every_steps=6",
    "eval.batches=2",
    "eval.max_new_tokens=4",
    "eval.whole_split_at_end=false",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=2",
]


def env() -> dict:
    e = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    e.pop("WANDB_API_KEY", None)
    return e


def stage(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{name}", *args]


def prepare_args(root: Path, *extra: str) -> list[str]:
    # Small parts and shards: many commits and atomic writes, so that kills land in every
    # phase.
    return [
        f"data.root={root}",
        "data.name=std",
        "data.source.kind=python-stdlib",
        "data.source.max_bytes=1000000",
        "data.shard_tokens=5000",
        "data.num_workers=2",
        "data.part_bytes=40000",
        "model.context_length=32",
        *extra,
    ]


def kill_at(cmd: list[str], when, poll: float = 0.001) -> tuple[float, bool]:
    """Start `cmd`, SIGKILL its whole process group once `when(elapsed)` is true; return
    (seconds until the kill, whether it finished before)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    start = time.monotonic()
    while proc.poll() is None and not when(time.monotonic() - start):
        time.sleep(poll)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - start, finished


def completed(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return out


def data_set(directory: Path) -> dict:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.glob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def reference_data(tmp_path_factory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    completed(stage("prepare", *prepare_args(root)))
    return root / "std", time.monotonic() - start


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkilled_prepare_reruns_to_identical_bytes(reference_data, tmp_path, trial):
    reference, seconds = reference_data
    rng = random.Random(SEED + trial)
    at = rng.uniform(0.2, 1.0) * seconds
    args = prepare_args(tmp_path)
    killed_after, finished = kill_at(stage("prepare", *args), lambda t: t >= at)
    print(
        f"prepare trial {trial}: killed after {killed_after:.2f} s of {seconds:.2f} s"
        + (" (it had finished)" if finished else "")
    )
    completed(stage("prepare", *args))
    assert data_set(tmp_path / "std") == data_set(reference)
    assert not (tmp_path / "std" / ".staging").exists()


def committed_parts(data_dir: Path) -> dict[str, tuple[int, int]]:
    """The part records of an unfinished build, by name: (inode, mtime_ns)."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (data_dir / ".staging" / "parts").glob("*.json")
    }


def test_prepare_killed_again_and_again_redoes_only_uncommitted_parts(reference_data, tmp_path):
    """KILLS SIGKILLs, each a random few milliseconds after 1 to 3 more parts have been
    committed (once all are, at a random moment of what follows: cutting the shards, the
    swap); every part committed before a kill is still there untouched after the next
    run, the final run says how many it took over, and the bytes are the reference's."""
    reference, _ = reference_data
    rng = random.Random(SEED + 3000)
    args = prepare_args(tmp_path)
    data_dir = tmp_path / "std"
    kept: dict[str, tuple[int, int]] = {}
    for kill in range(KILLS):
        target = min(PARTS, len(kept) + rng.randint(1, 3))
        delay = rng.uniform(0, 0.03) if len(kept) < PARTS else rng.uniform(0.3, 1.5)
        since: list[float] = []

        def when(t):
            if not since and len(committed_parts(data_dir)) >= target:
                since.append(t)
            return bool(since) and t - since[0] >= delay

        killed_after, finished = kill_at(stage("prepare", *args), when)
        now = committed_parts(data_dir)
        print(
            f"kill {kill}: at {killed_after:.2f} s, {len(now)} of {PARTS} parts committed"
            + (" (it had finished)" if finished else "")
        )
        assert all(now.get(name) == stamp for name, stamp in kept.items()) or not now, (
            "a part committed before the kill was rebuilt or lost"
        )
        kept = now
        if finished or not (data_dir / ".staging").exists():
            break
    resumable = (data_dir / ".staging" / "plan.json").exists()
    out = completed(stage("prepare", *args))
    if resumable:
        assert (
            f"{len(kept)} of {PARTS} parts were committed by an earlier run; building "
            f"the other {PARTS - len(kept)}"
        ) in out.stdout
    assert data_set(data_dir) == data_set(reference)
    assert not (data_dir / ".staging").exists()


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_sigkilled_force_rebuild_leaves_one_whole_data_set(reference_data, tmp_path, trial):
    reference, seconds = reference_data
    old_args = prepare_args(tmp_path, "data.val_fraction=0.2")
    completed(stage("prepare", *old_args))
    old = data_set(tmp_path / "std")
    rng = random.Random(SEED + 1000 + trial)
    at = rng.uniform(0.2, 1.1) * seconds
    new_args = [*prepare_args(tmp_path), "--force"]
    killed_after, finished = kill_at(stage("prepare", *new_args), lambda t: t >= at)
    after = data_set(tmp_path / "std")
    state = "old" if after == old else "new" if after == data_set(reference) else "mid-swap"
    print(f"force trial {trial}: killed after {killed_after:.2f} s, left the {state} data set")
    if state != "mid-swap":  # the data set there is whole, and every shard checks out
        assert verify(tmp_path / "std") == []
        assert load_manifest(tmp_path / "std").settings["val_fraction"] == (
            0.2 if state == "old" else 0.1
        )
    completed(stage("prepare", *new_args))
    assert data_set(tmp_path / "std") == data_set(reference)


# ----------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    completed(stage("prepare", *prepare_args(root)))
    return root


# The architectures the fault trials run: trial 1 (a kill as a checkpoint write begins) on
# the Llama-style model, whose checkpoint holds other tensors; every other trial on GPT-2
ARCHS = {"gpt2": [], "llama": ["model.arch=llama", "model.n_kv_heads=1"]}
ARCH_TRIALS = [("llama" if t == 1 else "gpt2", t) for t in range(TRIALS)]


@pytest.fixture(scope="module")
def reference_runs(train_data, tmp_path_factory):
    """arch -> (the uninterrupted run's directory, its seconds), each trained once."""
    done: dict[str, tuple[Path, float]] = {}

    def reference(arch: str) -> tuple[Path, float]:
        if arch not in done:
            runs = tmp_path_factory.mktemp(f"runs-{arch}")
            start = time.monotonic()
            completed(stage("train", *train_args(train_data, runs, *ARCHS[arch])))
            done[arch] = (runs / "run", time.monotonic() - start)
        return done[arch]

    return reference


def train_args(data_root: Path, runs: Path, *extra: str) -> list[str]:
    common = [f"data.root={data_root}", "data.name=std", f"runs_root={runs}", "name=run"]
    return [*common, *TRAIN, *extra]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "step_000012" / "model.safetensors"))


@pytest.mark.parametrize("arch, trial", ARCH_TRIALS)
def test_sigkilled_training_resumes_bit_exact(train_data, reference_runs, tmp_path, arch, trial):
    """Even trials kill at a random moment; odd ones the moment a checkpoint write begins
    (its temporary directory appears) plus a random few milliseconds."""
    reference, seconds = reference_runs(arch)
    rng = random.Random(SEED + 2000 + trial)
    checkpoints = tmp_path / "run" / "checkpoints"
    if trial % 2 == 0:
        at = rng.uniform(0.3, 1.0) * seconds
        when = lambda t: t >= at  # noqa: E731
    else:
        writes_seen = rng.randrange(1, 5)
        delay = rng.uniform(0, 0.05)
        seen: list[float] = []

        def when(t):
            if (
                not seen
                and len(list(checkpoints.glob("*step_*"))) >= writes_seen
                and any(checkpoints.glob(".tmp_step_*"))
            ):
                seen.append(t)
            return bool(seen) and t >= seen[0] + delay

    args = train_args(train_data, tmp_path, *ARCHS[arch])
    killed_after, finished = kill_at(stage("train", *args), when)
    left = sorted(p.name for p in checkpoints.glob("*")) if checkpoints.exists() else []
    print(
        f"train trial {trial} ({arch}): killed after {killed_after:.2f} s of {seconds:.2f} s, "
        f"leaving {left}" + (" (it had finished)" if finished else "")
    )
    completed(stage("train", *args))
    expected, actual = final_weights(reference), final_weights(tmp_path / "run")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 12
