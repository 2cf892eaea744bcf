"""A checkpoint saves and restores whatever stateful parts the trainer hands it.

In-process, on the real save/load path (Accelerate's state on a CPU, safetensors, torch.save
with weights_only loading): the train stage's own parts and one the test invents, which
needs no change to train.py's save or resume code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import PartialState

from pipeline.config import SHAPE_KEYS, ModelConfig, TrainConfig, to_dict
from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPTModel
from pipeline.train import Progress
from pipeline.training import checkpoint as ckpt
from pipeline.training.optim import build_optimizer, build_scheduler

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
    path = ckpt.save_checkpoint(
        tmp_path,
        7,
        accelerator=state,
        model=model,
        optimizer=optimizer,
        parts=parts,
        meta=meta,
        keep_last=0,
    )

    model2, optimizer2, scheduler2 = trainer(1)  # other weights, a fresh schedule
    restored = {"progress": Progress(), "scheduler": scheduler2, "counter": Counter()}
    got = ckpt.load_checkpoint(
        path, accelerator=state, model=model2, optimizer=optimizer2, parts=restored
    )
    assert got["step"] == 7
    assert restored["progress"] == progress and restored["counter"].value == 41
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    exp_avg = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    assert all(
        torch.equal(a, optimizer2.state[p]["exp_avg"]) for a, p in zip(exp_avg, model2.parameters())
    )


def test_a_part_the_checkpoint_does_not_hold_is_named(tmp_path):
    state = PartialState(cpu=True)
    model, optimizer, scheduler = trainer(0)
    path = ckpt.save_checkpoint(
        tmp_path,
        1,
        accelerator=state,
        model=model,
        optimizer=optimizer,
        parts={"scheduler": scheduler},
        meta={"step": 1, "model": to_dict(CFG)},
        keep_last=0,
    )
    with pytest.raises(PipelineError, match="no state for counter"):
        ckpt.load_checkpoint(
            path,
            accelerator=state,
            model=model,
            optimizer=optimizer,
            parts={"scheduler": scheduler, "counter": Counter()},
        )


def test_progress_round_trips_infinity():
    fresh = Progress()
    copy = Progress(step=3)
    copy.load_state_dict(fresh.state_dict())
    assert copy == fresh and math.isinf(copy.best_val_loss)


# ----------------------------------------------------------------------------- damage


def saved_run(tmp_path, steps=(1, 2)) -> list:
    """A run directory with a checkpoint at each of `steps` (weights differ between them)."""
    state = PartialState(cpu=True)
    model, optimizer, scheduler = trainer(0)
    paths = []
    for step in steps:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        paths.append(
            ckpt.save_checkpoint(
                tmp_path,
                step,
                accelerator=state,
                model=model,
                optimizer=optimizer,
                parts={"scheduler": scheduler},
                keep_last=0,
                meta={"step": step, "model": to_dict(CFG), "num_processes": 1},
            )
        )
    return paths


def flip_byte(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer.pt", "rng_0.pt"])
def test_a_flipped_byte_in_any_file_is_found_and_resume_falls_back(tmp_path, name, capsys):
    older, newest = saved_run(tmp_path)
    assert ckpt.damage(newest, 1) is None
    flip_byte(newest / name, offset=len((newest / name).read_bytes()) // 2)
    assert (
        ckpt.damage(newest, 1)
        == f"{name} is damaged (its sha256 differs from the one in meta.json)"
    )
    warnings = []
    assert ckpt.newest_intact(tmp_path, 1, warn=warnings.append) == older
    assert not newest.exists() and (newest.parent / "damaged_step_000002" / name).is_file()
    assert "step_000002 is damaged or incomplete" in warnings[0]
    assert ckpt.checkpoint_dirs(tmp_path) == [older]  # pruning and resume no longer see it


def test_missing_files_and_a_broken_meta_are_named(tmp_path):
    older, newest = saved_run(tmp_path)
    (newest / "optimizer.pt").unlink()
    assert ckpt.damage(newest, 1) == "optimizer.pt is missing"
    (older / "rng_0.pt").unlink()
    assert ckpt.damage(older, 1) == "rng_0.pt is missing"
    assert ckpt.damage(older, 2) == "rng_0.pt is missing"  # listed, so it must be there
    (older / "meta.json").write_text('{"step": 1, "mod')
    assert "is damaged (not valid JSON" in ckpt.damage(older, 1)
    with pytest.raises(PipelineError, match="not valid JSON"):
        ckpt.read_meta(older)


def test_interrupted_writes_are_swept(tmp_path):
    (only,) = saved_run(tmp_path, steps=(1,))
    root = only.parent
    (root / ".tmp_step_000002").mkdir()
    (root / ".tmp_step_000002" / "model.safetensors").write_bytes(b"half")
    (root / "step_000003").mkdir()  # a directory renamed without its meta.json
    (root / "notes.txt").write_text("the user's")
    swept = ckpt.sweep_incomplete(tmp_path)
    assert sorted(p.name for p in swept) == [".tmp_step_000002", "step_000003"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step_000001"]


def test_resume_never_refuses_a_run_directory_that_holds_checkpoints(tmp_path):
    from pipeline.config import load_config
    from pipeline.training.checkpoint_manager import checkpoint_to_resume

    saved_run(tmp_path / "runs" / "r", steps=(1,))
    config = load_config(
        None, [f"runs_root={tmp_path / 'runs'}", "name=r", "checkpoint.resume=never"]
    )
    with pytest.raises(PipelineError, match="already holds checkpoints .latest step_000001."):
        checkpoint_to_resume(config, 1)
    assert ckpt.checkpoint_dirs(tmp_path / "runs" / "r")  # nothing deleted


def test_a_run_whose_checkpoints_are_all_damaged_stops_instead_of_starting_over(tmp_path):
    from pipeline.config import load_config
    from pipeline.training.checkpoint_manager import checkpoint_to_resume

    run = tmp_path / "runs" / "r"
    for path in saved_run(run, steps=(1, 2)):
        flip_byte(path / "model.safetensors")
    config = load_config(None, [f"runs_root={tmp_path / 'runs'}", "name=r"])
    with pytest.raises(PipelineError, match="every checkpoint of .* is damaged") as stop:
        checkpoint_to_resume(config, 1)
    assert "checkpoint.resume=never" in str(stop.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "damaged_step_000001",
        "damaged_step_000002",
    ]  # set aside, nothing deleted
    never = load_config(
        None, [f"runs_root={tmp_path / 'runs'}", "name=r", "checkpoint.resume=never"]
    )
    assert checkpoint_to_resume(never, 1) is None  # the remedy it names works


def test_resuming_from_an_older_checkpoint_among_later_ones_is_refused(tmp_path):
    from pipeline.config import load_config
    from pipeline.training.checkpoint_manager import checkpoint_to_resume

    run = tmp_path / "runs" / "r"
    older, newest = saved_run(run)
    rewind = load_config(
        None, [f"runs_root={tmp_path / 'runs'}", "name=r", f"checkpoint.resume={older}"]
    )
    with pytest.raises(PipelineError, match="holds later checkpoints .step_000002.") as stop:
        checkpoint_to_resume(rewind, 1)
    assert "another name" in str(stop.value) and newest.is_dir()
    branch = load_config(
        None, [f"runs_root={tmp_path / 'runs'}", "name=branch", f"checkpoint.resume={older}"]
    )
    assert checkpoint_to_resume(branch, 1) == str(older)  # the same state under a new name
    latest = load_config(
        None, [f"runs_root={tmp_path / 'runs'}", "name=r", f"checkpoint.resume={newest}"]
    )
    assert checkpoint_to_resume(latest, 1) == str(newest)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(small_disk):
    (first,) = saved_run(small_disk, steps=(1,))  # ~0.1 MiB each: make the disk nearly full
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 60_000))
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        saved_run(small_disk, steps=(2,))
    message = str(err.value)
    assert "writing checkpoint step_000002 failed: No space left on device" in message
    assert "GiB are free" in message and "the previous checkpoint is intact" in message
    assert not (first.parent / ".tmp_step_000002").exists()
    assert ckpt.checkpoint_dirs(small_disk) == [first] and ckpt.damage(first, 1) is None
    filler.unlink()  # space freed: the next write succeeds
    saved_run(small_disk, steps=(2,))
    assert [p.name for p in ckpt.checkpoint_dirs(small_disk)] == ["step_000001", "step_000002"]


def test_readers_of_a_run_skip_a_damaged_newest_checkpoint_and_refuse_it_by_name(tmp_path, capsys):
    from pipeline.model.weights import load_state, resolve

    older, newest = saved_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: r\n")  # what makes tmp_path a run directory
    flip_byte(newest / "model.safetensors", offset=-100)
    assert resolve(tmp_path).path == older
    assert "step_000002 is damaged (model.safetensors is damaged" in capsys.readouterr().err
    assert newest.is_dir()  # a reader moves nothing
    with pytest.raises(
        PipelineError, match="checkpoint .*step_000002 is damaged: model.safetensors"
    ):
        load_state(newest)


def test_a_process_keeps_and_restores_only_its_own_gpus_generator(monkeypatch):
    """An 8-GPU checkpoint resumed where 4 are visible: each process restores its own
    device's state (older checkpoints hold every visible device's), never all of them."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([3]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("all devices"))
    state = ckpt._rng_state()
    assert torch.equal(state["cuda"], torch.tensor([3]))  # one device's, not a list
    ckpt._set_rng_state(state)
    old_format = {"cpu": torch.get_rng_state(), "cuda": [torch.tensor([i]) for i in range(8)]}
    ckpt._set_rng_state(old_format)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 9)  # beyond what was saved
    ckpt._set_rng_state(old_format)
    assert [int(s) for s in restored] == [3, 3]


@pytest.mark.parametrize(
    "override,words",
    [
        (
            "model.n_layers=3",
            ["the model differs from the config", "model.n_layers: checkpoint 1, config 3"],
        ),
        (
            "train.optimizer=muon",
            ["trained with train.optimizer: adamw", "Set train.optimizer=adamw"],
        ),
    ],
)
def test_resume_refuses_another_model_shape_or_optimizer_naming_it(tmp_path, override, words):
    """(The run is refused before anything is loaded; the checkpoint stays as it was.)"""
    from pipeline.config import load_config
    from pipeline.training.checkpoint_manager import check_resumable

    (newest,) = saved_run(tmp_path / "runs" / "r", steps=(1,))
    same = [f"model.{k}={v}" for k, v in to_dict(CFG).items() if k in SHAPE_KEYS and v is not None]
    config = load_config(None, [f"runs_root={tmp_path / 'runs'}", "name=r", *same])
    check_resumable(newest, config)  # the same shape and optimizer: resumable
    with pytest.raises(PipelineError) as refused:
        check_resumable(
            newest, load_config(None, [f"runs_root={tmp_path / 'runs'}", "name=r", *same, override])
        )
    message = " ".join(str(refused.value).split())
    assert all(w in message for w in words), message
    assert ckpt.damage(newest, 1) is None


def test_meta_names_every_process_file_even_where_the_listing_misses_one(tmp_path, monkeypatch):
    """On NFS a directory listing can lag behind files another machine just wrote and
    closed; meta.json's file list (what `resume` checks a checkpoint against) is built
    from the names every process writes, not from the listing."""
    listed = Path.iterdir
    monkeypatch.setattr(
        Path, "iterdir", lambda self: (p for p in listed(self) if not p.name.startswith("rng_"))
    )
    model, optimizer, scheduler = trainer(0)
    path = ckpt.save_checkpoint(
        tmp_path,
        1,
        accelerator=PartialState(cpu=True),
        model=model,
        optimizer=optimizer,
        parts={"scheduler": scheduler},
        meta={"step": 1, "model": to_dict(CFG)},
        keep_last=0,
    )
    files = json.loads((path / "meta.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "optimizer.pt", "rng_0.pt", "trainer.pt"]
