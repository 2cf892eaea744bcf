"""A checkpoint saves and restores whatever stateful parts the trainer hands it.

In-process, on the real save/load path (Accelerate's state on a CPU, safetensors, torch.save
with weights_only loading): the train stage's own parts and one the test invents, which
needs no change to train.py's save or resume code.
"""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import PartialState

from pipeline import checkpoint as ckpt
from pipeline.config import ModelConfig, TrainConfig, to_dict
from pipeline.errors import PipelineError
from pipeline.model import GPTModel
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.train import Progress

CFG = ModelConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


class Counter:
    """A stateful part of the test's own: anything with state_dict/load_state_dict."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value, "history": [self.value] * 3}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def trainer(seed: int):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    optimizer = build_optimizer(model, TrainConfig(), "cpu")
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_steps=2), max_steps=10)
    return model, optimizer, scheduler


def test_every_stateful_part_survives_a_save_and_resume(tmp_path):
    state = PartialState(cpu=True)
    model, optimizer, scheduler = trainer(0)
    model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    scheduler.step()
    progress = Progress(step=7, tokens=112, best_val_loss=3.5, elapsed=12.0)
    parts = {"progress": progress, "scheduler": scheduler, "counter": Counter(41)}
    meta = {"step": 7, "model": to_dict(CFG)}
    path = ckpt.save_checkpoint(tmp_path, 7, accelerator=state, model=model,
                                optimizer=optimizer, parts=parts, meta=meta, keep_last=0)

    model2, optimizer2, scheduler2 = trainer(1)  # other weights, a fresh schedule
    restored = {"progress": Progress(), "scheduler": scheduler2, "counter": Counter()}
    got = ckpt.load_checkpoint(path, accelerator=state, model=model2, optimizer=optimizer2,
                               parts=restored)
    assert got["step"] == 7
    assert restored["progress"] == progress and restored["counter"].value == 41
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    exp_avg = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    assert all(torch.equal(a, optimizer2.state[p]["exp_avg"])
               for a, p in zip(exp_avg, model2.parameters()))


def test_a_part_the_checkpoint_does_not_hold_is_named(tmp_path):
    state = PartialState(cpu=True)
    model, optimizer, scheduler = trainer(0)
    path = ckpt.save_checkpoint(tmp_path, 1, accelerator=state, model=model,
                                optimizer=optimizer, parts={"scheduler": scheduler},
                                meta={"step": 1, "model": to_dict(CFG)}, keep_last=0)
    with pytest.raises(PipelineError, match="no state for counter"):
        ckpt.load_checkpoint(path, accelerator=state, model=model, optimizer=optimizer,
                             parts={"scheduler": scheduler, "counter": Counter()})


def test_progress_round_trips_infinity():
    fresh = Progress()
    copy = Progress(step=3)
    copy.load_state_dict(fresh.state_dict())
    assert copy == fresh and math.isinf(copy.best_val_loss)
