"""Training checkpoints: save, find the latest, resume, atomically.

One directory per optimizer step, `runs/<name>/checkpoints/step_NNNNNN/`:

    model.safetensors   model weights, this project's names, fp32; a tied head is
                        stored once (as tok_emb.weight)
    meta.json           step, tokens, samples, the model config and the full run config
    ...                 optimizer, scheduler, RNG and scaler states (see save_checkpoint)

A checkpoint is written under a temporary name and renamed into place only when
complete, so a directory named step_* is always whole.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def read_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise PipelineError(f"{ckpt_dir} is not a complete checkpoint ({META_FILE} is missing)")
    return json.loads(path.read_text())


def load_model_state(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and weights of a checkpoint (tied head restored as a shared key)."""
    meta = read_meta(ckpt_dir)
    cfg = ModelConfig(**meta["model"])
    state = load_file(str(Path(ckpt_dir) / MODEL_FILE))
    if cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    return cfg, state
