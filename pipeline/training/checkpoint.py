"""Training checkpoints: save atomically, resume, set damaged ones aside, prune. The
reading half (layout, integrity, the weights) is pipeline/model/checkpoints.py.

One directory per optimizer step, `runs/<name>/checkpoints/step_NNNNNN/`:

    model.safetensors   model weights, this project's names, fp32; a tied head is
                        stored once (as tok_emb.weight)
    meta.json           step, tokens, process count, the model config and the full run
                        config: what readers of a checkpoint need
    ...                 optimizer, the trainer's stateful parts and RNG states (below)

A checkpoint is written under a temporary name, every file and the directory fsynced,
and renamed into place only when complete, so a directory named step_* is whole unless
the disk under it was damaged later. meta.json, written last, records the sha256 of every
other file; a resume checks them (`damage`) and falls back past a damaged checkpoint to
the newest complete one, moving the damaged one aside as `damaged_step_NNNNNN`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.core.errors import PipelineError, describe_os_error
from pipeline.core.fileio import atomic_open, atomic_write_text, file_sha256, fsync_dir, fsync_file

# The reading half (layout, integrity, weights) is the model side's; re-exported here so that
# the training side has one module for its checkpoints.
from pipeline.model.checkpoints import (  # noqa: F401
    _STEP_DIR,
    CHECKPOINTS,
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_FILE,
    checkpoint_dirs,
    damage,
    latest_checkpoint,
    load_model_state,
    newest_readable,
    read_meta,
    shape_mismatch,
)


def newest_intact(run_dir: str | Path, num_processes: int, warn) -> Path | None:
    """The newest checkpoint that `damage` finds whole. Damaged ones newer than it are set
    aside (so that the run's next checkpoints and pruning do not meet them), each named
    through `warn`. Reads every file of the checkpoints it looks at: call it on one process."""
    for path in reversed(checkpoint_dirs(run_dir)):
        problem = damage(path, num_processes)
        if problem is None:
            return path
        moved = set_aside(path)
        warn(
            f"warning: checkpoint {path} is damaged or incomplete ({problem}); moved it to "
            f"{moved.name} and resuming from the newest complete one before it, if any"
        )
    return None


def set_aside(ckpt_dir: Path) -> Path:
    """Rename a damaged checkpoint out of the step_* namespace (so pruning and resume
    ignore it) and return where it went; nothing is deleted."""
    target = ckpt_dir.with_name(f"damaged_{ckpt_dir.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt_dir.with_name(f"damaged_{ckpt_dir.name}.{n}")
    ckpt_dir.rename(target)
    return target


def sweep_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete what interrupted checkpoint writes left: .tmp_step_* directories and step_*
    directories without meta.json (both only ever written by save_checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and (
            p.name.startswith(".tmp_step_")
            or (_STEP_DIR.match(p.name) and not (p / META_FILE).exists())
        )
    ]
    for path in stale:
        shutil.rmtree(path)
    return stale


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


def _state_dict_api():
    """torch's distributed state-dict API, imported when a checkpoint is written or read:
    the import takes ~4 s on a small CPU, which readers of the weights alone (evaluate,
    export, generate) should not pay."""
    import torch.distributed.checkpoint.state_dict as dcp_sd

    return dcp_sd


def _full(**kw):
    return _state_dict_api().StateDictOptions(full_state_dict=True, **kw)


class CheckpointWriteError(PipelineError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    accelerator,
    model,
    optimizer,
    parts: dict,
    meta: dict,
    keep_last: int,
) -> Path:
    """Write step_NNNNNN/ atomically from every process (a collective call).

    `model` may be plain, DDP-wrapped, compiled or sharded with FSDP2: the state dicts
    are gathered to full, unsharded tensors, so the files do not depend on the layout
    the run used and a resume may choose another. A failed write (on any process)
    removes the temporary directory and raises CheckpointWriteError on every process."""
    # Gathering full state dicts is collective under FSDP: every rank takes part.
    dcp_sd = _state_dict_api()
    model_state = dcp_sd.get_model_state_dict(model, options=_full(cpu_offload=True))
    optim_state = dcp_sd.get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))
    if meta["model"]["tie_embeddings"]:
        model_state.pop("out_head.weight", None)  # shared with tok_emb.weight
    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    main = accelerator.is_main_process

    def write_main_files():
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
        _synced_torch_save(optim_state, tmp / OPTIMIZER_FILE)
        _synced_torch_save(
            {name: part.state_dict() for name, part in parts.items()}, tmp / TRAINER_FILE
        )
        fsync_file(tmp / MODEL_FILE)

    # The files by name, not by listing the directory: on NFS a listing can miss the other
    # processes' rng files for a while (attribute caching), and opening a file by name
    # sees a file another machine wrote and closed.
    names = [MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE]
    names += [f"rng_{rank}.pt" for rank in range(accelerator.num_processes)]

    def finish():
        files = {name: file_sha256(tmp / name) for name in sorted(names)}
        atomic_write_text(tmp / META_FILE, json.dumps({**meta, "files": files}, indent=2))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)

    def fresh_tmp():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    _attempt(accelerator, main, fresh_tmp, tmp, model_state, optim_state)
    _attempt(
        accelerator,
        True,
        lambda: _synced_torch_save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt"),
        tmp,
        model_state,
        optim_state,
    )
    _attempt(accelerator, main, write_main_files, tmp, model_state, optim_state)
    _attempt(accelerator, main, finish, tmp, model_state, optim_state)
    if main:
        prune_checkpoints(run_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _attempt(accelerator, here: bool, write, tmp: Path, *states) -> None:
    """Run `write` where `here` is true, then agree across processes whether every write
    succeeded; when one failed, every process raises (none is left waiting in a barrier)."""
    error = None
    if here:
        try:
            write()
        except OSError as e:
            error = e
    failed = error is not None
    if accelerator.num_processes > 1:  # an Accelerator or a bare PartialState
        from accelerate.utils import reduce

        flag = torch.tensor([int(failed)], device=accelerator.device)
        failed = bool(reduce(flag, reduction="sum").item())
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointWriteError(_write_failure(tmp, error, *states))


def _write_failure(tmp: Path, error: OSError | None, *states) -> str:
    need = sum(t.numel() * t.element_size() for state in states for t in _tensors(state))
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
    what = describe_os_error(error) if error else "another process failed to write its part."
    return (
        f"writing checkpoint {tmp.name.replace('.tmp_', '')} failed: {what} The checkpoint "
        f"needs about {need / 2**30:.2f} GiB; {free / 2**30:.2f} GiB are free in "
        f"{tmp.parent}. The partial files were removed and the previous checkpoint is "
        f"intact: the same command resumes from it."
    )


def _tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def _synced_torch_save(obj, path: Path) -> None:
    with atomic_open(path) as f:  # written, fsynced and renamed in one step
        torch.save(obj, f)


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
    dcp_sd = _state_dict_api()
    dcp_sd.set_model_state_dict(model, model_state, options=_full())
    optim_state = torch.load(ckpt_dir / OPTIMIZER_FILE, weights_only=True)
    dcp_sd.set_optimizer_state_dict(model, optimizer, optim_state, options=_full())
    saved = torch.load(ckpt_dir / TRAINER_FILE, weights_only=True)
    # A part that can start empty (the spike guard's history, for a run that turns
    # spikes.* on when it resumes) says so; any other missing part is an error.
    missing = [
        name for name in parts if name not in saved and not getattr(parts[name], "FRESH", False)
    ]
    if missing:
        raise PipelineError(
            f"{ckpt_dir} holds no state for {', '.join(missing)} (it has: "
            f"{', '.join(saved) or 'nothing'}); it was written by another version of the train "
            f"stage. Resume from a checkpoint of this version, or start over with "
            f"checkpoint.resume=never and another run name."
        )
    for name, part in parts.items():
        if name in saved:
            part.load_state_dict(saved[name])
    rng_file = ckpt_dir / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():  # absent when resuming on more processes than were saved
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta


def _rng_state() -> dict:
    """This process's generators: the CPU's and its own GPU's only. (Every visible GPU's,
    as get_rng_state_all saves them, cannot be restored where fewer are visible: an
    8-GPU node's checkpoint on a 4-GPU node, or under Slurm's --gpus-per-task=1.)"""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    saved = state.get("cuda")
    if saved is None or not torch.cuda.is_available():
        return
    if isinstance(saved, (list, tuple)):  # older checkpoints: one state per visible GPU
        index = torch.cuda.current_device()
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved)
