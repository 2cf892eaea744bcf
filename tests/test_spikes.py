"""Loss spikes (spikes.*): a poisoned range of the data stream, windows of random tokens
in a stream a tiny model learns quickly, met by the train stage's own loop.

Skipping leaves the poisoned steps' updates out and logs each; rolling back reloads the
newest checkpoint, replays the steps after it and leaves out exactly the poisoned
samples, ending where a clean run ends; a run killed during or after a rollback resumes
to the same weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import write_data_set
from safetensors.torch import load_file
from train_runs import ROOT, env, run_train, train_here

from pipeline.data.loader import stream_indices
from pipeline.training.spikes import SpikeGuard, z_score

pytestmark = pytest.mark.slow  # every test here trains

CONTEXT, BATCH, SEED = 16, 4, 1337
POISONED = (160, 172)  # global samples: steps 41, 42 and 43 at 4 samples a step
TOKENS = 20_000


def pattern(n: int, offset: int = 0) -> np.ndarray:
    """A stream a small model learns fast: each token fixes the next (period 50)."""
    return ((np.arange(offset, offset + n) * 7) % 50 + 200).astype(np.int64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(root, clean data name, poisoned data name): the same stream, and the same stream
    with the windows the run draws at POISONED replaced by random tokens."""
    root = tmp_path_factory.mktemp("spikes")
    train, val = pattern(TOKENS), pattern(2_000, offset=3)
    write_data_set(root / "clean", {"train": [train], "val": [val]})
    windows = (TOKENS - 1) // CONTEXT
    poisoned = train.copy()
    rng = np.random.default_rng(0)
    start, end = POISONED
    for w in stream_indices(start, end - start, windows, SEED).tolist():
        poisoned[w * CONTEXT : (w + 1) * CONTEXT + 1] = rng.integers(0, 50257, CONTEXT + 1)
    write_data_set(root / "poisoned", {"train": [poisoned], "val": [val]})
    return root


def args(root, runs, name, data_name, *extra) -> list[str]:
    return [
        f"data.root={root}",
        f"data.name={data_name}",
        f"runs_root={runs}",
        f"name={name}",
        f"seed={SEED}",
        f"model.context_length={CONTEXT}",
        "model.emb_dim=32",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.drop_rate=0.1",  # the RNG state matters for the bit-exact resume
        f"train.micro_batch_size={BATCH}",
        "train.lr=1e-2",
        "train.warmup_steps=5",
        "train.max_steps=80",
        "train.log_every_steps=1",
        "eval.every_steps=1000",
        "eval.batches=20",
        "eval.prompt=a",
        "eval.max_new_tokens=4",
        "eval.whole_split_at_end=false",
        "checkpoint.every_steps=15",
        "checkpoint.keep_last=0",
        "spikes.window=20",
        *extra,
    ]


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_val_loss(run) -> float:
    return [r["val_loss"] for r in rows(run) if "val_loss" in r][-1]


ROLLBACK = ["spikes.rollback_loss_z=6"]


def test_poisoned_steps_are_skipped_and_logged(data, tmp_path):
    train_here(args(data, tmp_path, "skip", "poisoned", "spikes.skip_loss_z=4"))
    skipped = [r for r in rows(tmp_path / "skip") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [41, 42, 43]
    assert all("standard deviations high" in r["why"] and r["loss"] > 5 for r in skipped)
    trained = [r for r in rows(tmp_path / "skip") if "loss" in r and not r.get("skipped")]
    assert max(r["loss"] for r in trained if r["step"] > 30) < 2  # nothing learned from them


def test_a_rollback_skips_exactly_the_poisoned_samples_and_a_killed_one_resumes_bit_exact(
    data, tmp_path
):
    # uninterrupted: three rollbacks to step 30, each leaving out one poisoned step's samples
    done = run_train(args(data, tmp_path, "rollback", "poisoned", *ROLLBACK))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [r["rollback"] for r in rows(tmp_path / "rollback") if "rollback" in r]
    assert [r["samples"] for r in records] == [[160, 164], [164, 168], [168, 172]]
    assert {(r["step"], r["from_step"]) for r in records} == {(30, 41)}
    newest = tmp_path / "rollback" / "checkpoints" / "step_000080"
    state = torch.load(newest / "trainer.pt", weights_only=True)
    assert state["loader"]["skips"] == [[160, 164], [164, 168], [168, 172]]
    assert len(state["spikes"]["rollbacks"]) == 3
    # ... and ends where a run on clean data ends, within noise
    train_here(args(data, tmp_path, "clean", "clean", *ROLLBACK))
    assert final_val_loss(tmp_path / "rollback") == pytest.approx(
        final_val_loss(tmp_path / "clean"), abs=0.05
    )
    # killed as the first rollback is announced, then resumed with the same command
    cmd = [sys.executable, "-m", "pipeline.train", *args(data, tmp_path, "killed", "poisoned")]
    cmd += ROLLBACK
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in proc.stdout:
        if "rolled back" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_train(cmd[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    a = load_file(str(newest / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step_000080" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    timing = ("tokens_per_s", "step_time", "mfu")
    untimed = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in rows(run)]  # noqa: E731
    assert untimed(tmp_path / "killed") == untimed(tmp_path / "rollback")


def test_a_run_that_keeps_rolling_back_stops_with_one_paragraph():
    from pipeline.config import SpikeConfig
    from pipeline.core.errors import PipelineError

    guard = SpikeGuard(SpikeConfig(rollback_loss_z=6, max_rollbacks=2))
    guard.rolled_back(30, 41, 160, 164, "loss 9 is 40 standard deviations high")
    guard.rolled_back(30, 41, 164, 168, "loss 9 is 40 standard deviations high")
    with pytest.raises(
        PipelineError, match="rolled back 3 times, more than spikes.max_rollbacks=2"
    ):
        guard.rolled_back(30, 41, 168, 172, "loss 9 is 40 standard deviations high")


def test_z_scores_wait_for_twenty_steps_of_history():
    assert z_score(100.0, [1.0] * 19) == 0.0
    history = [1.0, 2.0] * 10
    assert z_score(1.5, history) == pytest.approx(0.0)
    assert z_score(1.5 + 5 * np.std(history, ddof=1), history) == pytest.approx(5.0)
