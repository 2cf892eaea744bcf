"""Training checkpoints: save, find the latest, resume, atomically.

One directory per optimizer step, `runs/<name>/checkpoints/step_NNNNNN/`:

    model.safetensors   model weights, this project's names, fp32; a tied head is
                        stored once (as tok_emb.weight)
    meta.json           step, tokens, process count, the model config and the full run
                        config: what readers of a checkpoint need
    ...                 optimizer, the trainer's stateful parts and RNG states (below)

A checkpoint is written under a temporary name and renamed into place only when
complete, so a directory named step_* is always whole.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint.state_dict as dcp_sd
from safetensors.torch import load_file, save_file

from pipeline.config import SHAPE_KEYS, ModelConfig
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


# ----------------------------------------------------------------------------- training state
#
# Besides model.safetensors and meta.json a training checkpoint holds
#     optimizer.pt      AdamW state, keyed by parameter name (full, unsharded)
#     trainer.pt        the state_dict() of every other stateful part, by name: the caller
#                       hands one mapping (the train stage: progress counters, loader
#                       position, LR schedule, fp16 grad scaler) and gets each restored
#                       through its load_state_dict()
#     rng_<rank>.pt     torch CPU (and CUDA) generator states of each process
# All .pt files hold only tensors and plain containers: they load with weights_only=True.

OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"


def _full(**kw):
    return dcp_sd.StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(run_dir: str | Path, step: int, *, accelerator, model, optimizer,
                    parts: dict, meta: dict, keep_last: int) -> Path:
    """Write step_NNNNNN/ atomically from every process (a collective call).

    `model` may be plain, DDP-wrapped, compiled or sharded with FSDP2: the state dicts
    are gathered to full, unsharded tensors, so the files do not depend on the layout
    the run used and a resume may choose another."""
    # Gathering full state dicts is collective under FSDP: every rank takes part.
    model_state = dcp_sd.get_model_state_dict(model, options=_full(cpu_offload=True))
    optim_state = dcp_sd.get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        if meta["model"]["tie_embeddings"]:
            model_state.pop("out_head.weight", None)  # shared with tok_emb.weight
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        torch.save(optim_state, tmp / OPTIMIZER_FILE)
        torch.save({name: part.state_dict() for name, part in parts.items()}, tmp / TRAINER_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    dirs = checkpoint_dirs(run_dir)
    if keep_last > 0:
        for old in dirs[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: str | Path, *, accelerator, model, optimizer, parts: dict) -> dict:
    """Restore every piece of training state saved by save_checkpoint (each of `parts`
    through its load_state_dict); return the checkpoint's meta."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    _, model_state = load_model_state(ckpt_dir)
    dcp_sd.set_model_state_dict(model, model_state, options=_full())
    optim_state = torch.load(ckpt_dir / OPTIMIZER_FILE, weights_only=True)
    dcp_sd.set_optimizer_state_dict(model, optimizer, optim_state, options=_full())
    saved = torch.load(ckpt_dir / TRAINER_FILE, weights_only=True)
    missing = [name for name in parts if name not in saved]
    if missing:
        raise PipelineError(
            f"{ckpt_dir} holds no state for {', '.join(missing)} (it has: "
            f"{', '.join(saved) or 'nothing'}); it was written by another version of the train "
            f"stage. Resume from a checkpoint of this version, or start over with "
            f"checkpoint.resume=never and another run name.")
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    rng_file = ckpt_dir / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():  # absent when resuming on more processes than were saved
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def shape_mismatch(saved: dict, current: ModelConfig) -> list[str]:
    """The model keys whose values differ between a checkpoint and the current config."""
    return [f"model.{k}: checkpoint {saved[k]!r}, config {getattr(current, k)!r}"
            for k in SHAPE_KEYS if saved.get(k) != getattr(current, k)]
