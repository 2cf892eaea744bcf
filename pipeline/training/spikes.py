"""Loss spikes: which steps' updates are skipped and when a run rolls back (spikes.*).

A step's loss (and gradient norm) is held against the last `window` trained steps as a
z-score. Above spikes.skip_loss_z (or skip_grad_z) the update is skipped, as llm.c's
-sl/-sg do: the step is counted, the learning-rate schedule and the data position move
on, nothing is learned from it. Above spikes.rollback_loss_z, or at a non-finite loss
with spikes.rollback_nonfinite, the train stage reloads the newest checkpoint, replays
the steps after it as they were and leaves out the samples the bad step drew: the data
position is a global sample count, so the skipped range is exact on any number of
processes. Consecutive bad steps roll back one after the other, each leaving out its
own samples. The ranges are recorded here, in the loader's state of every later
checkpoint, and in metrics.jsonl.

Everything here is a function of the losses the run computed, and the guard's state
(history, counts, skipped ranges) is a stateful part of the checkpoint: the same run on
the same data skips the same ranges, and a run killed during or after a rollback resumes
from the checkpoint, replays the same steps, meets the same spike and makes the same
rollback, bit for bit.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from pipeline.core.errors import PipelineError

MIN_HISTORY = 20  # trained steps before a z-score means anything


@dataclass(frozen=True)
class Verdict:
    action: str  # "train" | "skip" | "rollback"
    why: str = ""


TRAIN = Verdict("train")


def z_score(value: float, history) -> float:
    """How many standard deviations `value` lies above the mean of `history` (0 with too
    little history; a flat history counts any rise as infinitely far)."""
    if len(history) < MIN_HISTORY:
        return 0.0
    mean = math.fsum(history) / len(history)
    std = math.sqrt(math.fsum((h - mean) ** 2 for h in history) / (len(history) - 1))
    if std == 0.0:
        return math.inf if value > mean else 0.0
    return (value - mean) / std


class SpikeGuard:
    """The spikes.* policy and its state: the history the z-scores are taken over, and
    what the run skipped. A stateful part of the checkpoint ("spikes")."""

    FRESH = True  # a checkpoint saved without spikes.* resumes with an empty history

    def __init__(self, config):
        self.config = config
        self.losses: deque[float] = deque(maxlen=config.window)
        self.grad_norms: deque[float] = deque(maxlen=config.window)
        self.skipped_updates = 0
        self.rollbacks: list[dict] = []  # each: step, from_step, samples [start, end), why

    def verdict(self, loss: float, grad_norm: float | None) -> Verdict:
        """What to do with a step whose loss (mean over processes) and gradient norm are
        these, before its update."""
        c = self.config
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            if c.rollback_nonfinite:
                return Verdict("rollback", f"the loss was {loss}")
            return TRAIN  # the train stage stops the run on it, as without spikes.*
        z = z_score(loss, self.losses)
        if c.rollback_loss_z is not None and z > c.rollback_loss_z:
            return Verdict("rollback", f"loss {loss:.4f} is {z:.1f} standard deviations high")
        if c.skip_loss_z is not None and z > c.skip_loss_z:
            return Verdict("skip", f"loss {loss:.4f} is {z:.1f} standard deviations high")
        if c.skip_grad_z is not None and grad_norm is not None:
            zg = z_score(grad_norm, self.grad_norms)
            if zg > c.skip_grad_z:
                return Verdict(
                    "skip", f"grad norm {grad_norm:.3g} is {zg:.1f} standard deviations high"
                )
        return TRAIN

    def trained(self, loss: float, grad_norm: float | None) -> None:
        """A step whose update was made: part of the history from now on."""
        self.losses.append(loss)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def rolled_back(self, step: int, from_step: int, start: int, end: int, why: str) -> dict:
        """Record a rollback from `from_step` to the checkpoint at `step` that skips the
        samples [start, end); PipelineError past spikes.max_rollbacks."""
        record = {"step": step, "from_step": from_step, "samples": [start, end], "why": why}
        self.rollbacks.append(record)
        if len(self.rollbacks) > self.config.max_rollbacks:
            ranges = ", ".join(f"[{r['samples'][0]}, {r['samples'][1]})" for r in self.rollbacks)
            raise PipelineError(
                f"the run rolled back {len(self.rollbacks)} times, more than "
                f"spikes.max_rollbacks={self.config.max_rollbacks} (the last at step "
                f"{from_step}: {why}); the samples skipped so far are {ranges}. Spikes this "
                f"often point at the learning rate or at the data rather than at a few bad "
                f"batches: lower train.lr, or look at the data in those ranges. The newest "
                f"checkpoint is intact; run the same command to resume after the change."
            )
        return record

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "skipped_updates": self.skipped_updates,
            "rollbacks": [dict(r) for r in self.rollbacks],
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.config.window)
        self.grad_norms = deque(state["grad_norms"], maxlen=self.config.window)
        self.skipped_updates = int(state["skipped_updates"])
        self.rollbacks = [dict(r) for r in state["rollbacks"]]
