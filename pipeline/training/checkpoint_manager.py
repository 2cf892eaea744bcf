"""A run's checkpoints as one object: built once by the train stage, then `resume()` at
the start and `save(step, tokens)` whenever the loop checkpoints.

It owns the policy around the files that pipeline/training/checkpoint.py writes and
reads: which checkpoint checkpoint.resume names (auto: the newest intact one, damaged
ones set aside; never; a path), the refusals (another optimizer, another model shape, a
rewind into a second timeline, only damaged checkpoints left), deciding on the main
process and telling the others, and what meta.json records. The on-disk format is
checkpoint.py's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, to_dict
from pipeline.core.errors import PipelineError
from pipeline.training import checkpoint as ckpt


class CheckpointManager:
    """`parts` returns the stateful parts to save besides model and optimizer, by name
    (each with state_dict/load_state_dict), asked at every save and resume, since some
    (fp16's loss scaler) appear only once Accelerate has prepared the model."""

    def __init__(
        self,
        config: Config,
        accelerator,
        model,
        optimizer,
        parts: Callable[[], dict],
        say: Callable[[str], None] = print,
    ):
        self.config, self.accelerator = config, accelerator
        self.model, self.optimizer, self.parts = model, optimizer, parts
        self.run_dir = config.run_dir
        self.say = say

    def resume(self) -> Path | None:
        """Restore model, optimizer, RNG and every stateful part from the checkpoint
        checkpoint.resume names, and return its path (None: nothing to resume, a fresh
        run). The parts check their own consistency (the loader refuses other data, seed
        or window shape)."""
        path = self.choose()
        if path is None:
            return None
        check_resumable(path, self.config)
        ckpt.load_checkpoint(
            path,
            accelerator=self.accelerator,
            model=self.model,
            optimizer=self.optimizer,
            parts=self.parts(),
        )
        return path

    def reload_newest(self) -> Path | None:
        """Load the newest intact checkpoint back into the running model, optimizer, RNG
        and parts (a rollback; damaged ones are set aside as on resume) and return it;
        None when the run has none yet. Collective: chosen on the main process."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        answer: list = [None]
        if acc.is_main_process:
            path = ckpt.newest_intact(self.run_dir, acc.num_processes, warn=self.say)
            answer[0] = None if path is None else str(path)
        if acc.num_processes > 1:
            broadcast_object_list(answer)
        if answer[0] is None:
            return None
        path = Path(answer[0])
        ckpt.load_checkpoint(
            path,
            accelerator=acc,
            model=self.model,
            optimizer=self.optimizer,
            parts=self.parts(),
        )
        return path

    def save(self, step: int, tokens: int) -> Path:
        """Write step `step` (a collective call: every process calls it) and prune to
        checkpoint.keep_last. meta.json is for readers of the checkpoint (evaluate,
        export, people); the training state itself is in the stateful parts."""
        meta = {
            "step": step,
            "tokens": tokens,
            "num_processes": self.accelerator.num_processes,
            "model": to_dict(self.config.model),
            "config": to_dict(self.config),
        }
        return ckpt.save_checkpoint(
            self.run_dir,
            step,
            accelerator=self.accelerator,
            model=self.model,
            optimizer=self.optimizer,
            parts=self.parts(),
            meta=meta,
            keep_last=self.config.checkpoint.keep_last,
        )

    def choose(self) -> Path | None:
        """The checkpoint to resume from, decided on the main process (which sweeps what
        interrupted writes left and checks checksums) and told to the others; every
        process raises the same error when there is none acceptable."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        answer: list = [None, None]  # path, error message
        if acc.is_main_process:
            try:
                answer[0] = checkpoint_to_resume(self.config, acc.num_processes, self.say)
            except PipelineError as e:
                answer[1] = str(e)
        if acc.num_processes > 1:
            broadcast_object_list(answer)
        if answer[1]:
            raise PipelineError(answer[1])
        return None if answer[0] is None else Path(answer[0])


def checkpoint_to_resume(config: Config, processes: int, say=print) -> str | None:
    """checkpoint.resume applied to the run directory (main process only)."""
    run_dir, choice = config.run_dir, config.checkpoint.resume
    for stale in ckpt.sweep_incomplete(run_dir):
        say(f"removed {stale.name}, left by an interrupted checkpoint write")
    if choice == "never":
        existing = ckpt.latest_checkpoint(run_dir)
        if existing is not None:
            raise PipelineError(
                f"{run_dir} already holds checkpoints (latest {existing.name}) and "
                f"checkpoint.resume=never would start a new run among them (pruning and a "
                f"later resume would mix the two). Use another name, resume with "
                f"checkpoint.resume=auto, or delete the old run first (make clean)."
            )
        return None
    if choice == "auto":
        had_checkpoints = bool(ckpt.checkpoint_dirs(run_dir))
        path = ckpt.newest_intact(run_dir, processes, warn=say)
        if path is None and had_checkpoints:
            raise PipelineError(
                f"every checkpoint of {run_dir} is damaged (each was moved aside as "
                f"checkpoints/damaged_step_*, nothing deleted), so there is nothing to resume "
                f"from, and training on would start the run over from step 0 unnoticed. To "
                f"start it over, run again with checkpoint.resume=never (its metrics.jsonl is "
                f"rewritten); to keep this run as it is, train under another name."
            )
        return None if path is None else str(path)
    problem = ckpt.damage(choice, processes)
    if problem:
        raise PipelineError(
            f"cannot resume from checkpoint.resume={choice}: {problem}. "
            f"Name another checkpoint, or use checkpoint.resume=auto."
        )
    refuse_rewind(run_dir, Path(choice))
    return choice


def check_resumable(path: Path, config: Config) -> None:
    """PipelineError unless the checkpoint at `path` can continue under `config`: the same
    optimizer (their states differ) and the same model shape."""
    meta = ckpt.read_meta(path)
    saved_optimizer = (meta.get("config") or {}).get("train", {}).get("optimizer", "adamw")
    if saved_optimizer != config.train.optimizer:
        raise PipelineError(
            f"cannot resume from {path}: it was trained with train.optimizer: "
            f"{saved_optimizer}, and the config asks for {config.train.optimizer}; their "
            f"states differ. Set train.optimizer={saved_optimizer} to continue it, or start a "
            f"new run (another name, or checkpoint.resume=never)."
        )
    mismatch = ckpt.shape_mismatch(meta["model"], config.model)
    if mismatch:
        raise PipelineError(
            f"cannot resume from {path}: the model differs from the config ({'; '.join(mismatch)}). "
            f"Use another run name (or delete this run with make clean) to start over."
        )


def refuse_rewind(run_dir: Path, chosen: Path) -> None:
    """Resuming from a step older than the run's newest checkpoint would train a second
    timeline into the same run: its new checkpoints prune the later ones' neighbours, and
    the old timeline's newest stays "latest" for export, evaluate and the next resume."""
    step = ckpt.read_meta(chosen)["step"]
    later = [p.name for p in ckpt.checkpoint_dirs(run_dir) if ckpt.read_meta(p)["step"] > step]
    if later:
        raise PipelineError(
            f"checkpoint.resume={chosen} is step {step}, and {run_dir} holds later checkpoints "
            f"({', '.join(later[:3])}{', ...' if len(later) > 3 else ''}); training on from it "
            f"would mix two timelines in one run. Move those later checkpoints out of "
            f"{run_dir / 'checkpoints'} if you mean to rewind, or train the older state under "
            f"another name (name=... checkpoint.resume={chosen})."
        )
