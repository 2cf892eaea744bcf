"""Reading a run's checkpoints: where they are, which is whole, and the weights and
model config in them. The layout is written by pipeline/training/checkpoint.py; this half
is what every reader of weights (evaluate, export, generate, init_from) needs, so the
model side reads checkpoints without importing the training side.

    runs/<name>/checkpoints/step_NNNNNN/
        model.safetensors   model weights, this project's names, fp32; a tied head is
                            stored once (as tok_emb.weight)
        meta.json           step, tokens, process count, the model config, the full run
                            config and the sha256 of every other file: written last
        optimizer.pt, trainer.pt, rng_<rank>.pt   the training state (training/checkpoint.py)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from pipeline.config import ModelConfig, model_config_from_file
from pipeline.core.errors import PipelineError
from pipeline.core.fileio import file_sha256
from pipeline.model.config import shape_values
from pipeline.model.tensorfile import read_tensors

CHECKPOINTS = "checkpoints"


MODEL_FILE = "model.safetensors"


META_FILE = "meta.json"


_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise PipelineError(f"{ckpt_dir} is not a complete checkpoint ({META_FILE} is missing)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deeply
        raise PipelineError(
            f"{path} is damaged (not valid JSON: {e}); the checkpoint cannot "
            f"be read. Use an earlier checkpoint of the run."
        ) from None
    if (
        not isinstance(meta, dict)
        or not {"step", "model"} <= meta.keys()
        or isinstance(meta["step"], bool)
        or not isinstance(meta["step"], int)
    ):
        raise PipelineError(
            f"{path} is damaged (it lacks the step or the model config); "
            f"use an earlier checkpoint of the run."
        )
    return meta


def damage(
    ckpt_dir: str | Path, num_processes: int | None = None, only: set[str] | None = None
) -> str | None:
    """None when the checkpoint is whole: meta.json readable and every file it lists
    present with its sha256 (and, when resuming on `num_processes` equal to the saved
    count, every process's RNG file); else what is wrong, in a few words. `only` limits
    the check to some files (a reader of the weights needs model.safetensors alone)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        meta = read_meta(ckpt_dir)
    except PipelineError as e:
        return str(e).split(";")[0]
    need = {MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE} if only is None else set(only)
    files = meta.get("files")
    if files is None:  # written before checksums were recorded: presence is all we can check
        missing = sorted(name for name in need if not (ckpt_dir / name).is_file())
        return f"{missing[0]} is missing" if missing else None
    if not isinstance(files, dict):
        return f"{META_FILE} is damaged (its file list is not a mapping)"
    if num_processes is not None and meta.get("num_processes") == num_processes:
        need |= {f"rng_{rank}.pt" for rank in range(num_processes)}
    for name in sorted(need - files.keys()):
        return f"{META_FILE} does not list {name}"
    for name, sha in sorted(files.items()):
        if only is not None and name not in only:
            continue
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != sha:
            return f"{name} is damaged (its sha256 differs from the one in {META_FILE})"
    return None


def newest_readable(run_dir: str | Path, warn) -> Path | None:
    """For readers of the weights (evaluate, export, generate): the newest checkpoint whose
    meta.json and model.safetensors are intact; newer damaged ones are named, not moved."""
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = damage(path, only={MODEL_FILE})
        if problem is None:
            return path
        warn(f"warning: checkpoint {path} is damaged ({problem}); using the one before it")
    return None


def load_model_state(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and weights of a checkpoint (tied head restored as a shared key)."""
    meta = read_meta(ckpt_dir)
    cfg = model_config_from_file(meta["model"], str(Path(ckpt_dir) / META_FILE))
    state = read_tensors(Path(ckpt_dir) / MODEL_FILE)
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    return cfg, state


OPTIMIZER_FILE = "optimizer.pt"


TRAINER_FILE = "trainer.pt"


def shape_mismatch(saved: dict, current: ModelConfig) -> list[str]:
    """The model keys whose values differ between a checkpoint's model config (meta.json)
    and the current config. Keys a checkpoint predates take their defaults (a checkpoint
    without `arch` is gpt2), and null counts as the number it stands for."""
    old = shape_values(model_config_from_file(saved, "the checkpoint's model config"))
    new = shape_values(current)
    return [f"model.{k}: checkpoint {old[k]!r}, config {new[k]!r}" for k in old if old[k] != new[k]]
