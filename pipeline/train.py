"""Stage 2: train the GPT with Hugging Face Accelerate, from one CPU to many GPUs and nodes.

    python -m pipeline.train --config configs/tiny.yaml [section.key=value ...]
    accelerate launch [--multi_gpu --num_processes N ...] -m pipeline.train --config ...

The book's `train_model_simple` grown up: the loop below still reads top to bottom,
with each extra concern (checkpoints, metrics, signals, evaluation) behind one call.
Accelerate owns the processes, the device and mixed precision; this file owns the
order of things.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before the imports below (torch takes seconds): a SIGTERM or Ctrl-C that arrives
    # while they load is then a clean stop too. main() takes this request over.
    from pipeline.training.stopping import StopRequest

    EARLY_STOP = StopRequest()

import argparse
import contextlib
import ctypes
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta

import torch

from pipeline.config import Config, EvalConfig, load_config, save_config
from pipeline.core import console, locking, log
from pipeline.core.errors import PipelineError, cli_main
from pipeline.data.loader import (
    MixedWindows,
    TokenWindows,
    TrainBatches,
    mixed_train_windows,
    spread_windows,
)
from pipeline.evaluate import evaluate
from pipeline.keys import add_config_arguments, parse_stage_args
from pipeline.model.gpt import GPTModel, count_parameters, flops_per_token
from pipeline.training.checkpoint_manager import CheckpointManager
from pipeline.training.hangwatch import HangWatch, warning_margin_s
from pipeline.training.mfu import mfu, peak_flops
from pipeline.training.optim import build_optimizer, build_scheduler, clips_at, total_steps
from pipeline.training.precision import resolve as resolve_precision
from pipeline.training.precision import slow_bf16_warning
from pipeline.training.sharding import fsdp_plugin, whole_root
from pipeline.training.spikes import TRAIN, SpikeGuard, Verdict
from pipeline.training.stopping import StopRequest
from pipeline.training.tracking import MetricsLog, SampleTable, start_trackers, trackers, wandb_mode


@dataclass
class Progress:
    """Counters that a checkpoint saves and a resume restores."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens consumed, all processes together
    best_val_loss: float = math.inf
    elapsed: float = 0.0  # seconds of training before this process started

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class BatchPlan:
    """How much one optimizer step takes and how many steps the run has, computed once."""

    micro_batch_size: int  # sequences per process per forward
    grad_accum_steps: int
    processes: int
    context_length: int
    epoch_samples: int  # global samples in one epoch of the train stream
    max_steps: int

    @classmethod
    def make(cls, config: Config, processes: int, epoch_samples: int) -> "BatchPlan":
        t = config.train
        samples = t.micro_batch_size * t.grad_accum_steps * processes
        tokens = samples * config.model.context_length
        return cls(
            t.micro_batch_size,
            t.grad_accum_steps,
            processes,
            config.model.context_length,
            epoch_samples,
            total_steps(t, epoch_samples, samples, tokens),
        )

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.processes

    @property
    def tokens_per_step(self) -> int:
        return self.samples_per_step * self.context_length

    @property
    def epochs(self) -> float:
        return self.max_steps * self.samples_per_step / self.epoch_samples


@dataclass
class Interval:
    """What happened since the last metrics row: per-step losses stay on the device
    until the row is written, so the loop never waits for the device in between."""

    losses: list = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    grad_norm: torch.Tensor | None = None


@cli_main
def main(argv: list[str] | None = None) -> None:
    # First of all, so that SIGTERM or Ctrl-C at any moment (loading, setup) is a clean stop.
    stop = globals().get("EARLY_STOP") or StopRequest()
    try:  # the handlers go back however main ends: --help and a bad argument too
        stop_with_launcher()
        parser = argparse.ArgumentParser(
            prog="python -m pipeline.train", description=__doc__.split("\n")[0]
        )
        add_config_arguments(parser)
        args = parse_stage_args(parser, argv)
        run(load_config(args.config, args.overrides), stop)
    finally:
        stop.restore()


def stop_with_launcher() -> None:
    """Under a launcher (torchrun, accelerate launch), ask Linux to send this process
    SIGTERM when the launcher dies, so that a killed launcher never leaves its workers
    training as orphans: each finishes its step, checkpoints and exits. Not for a plain
    `python -m pipeline.train`, whose parent may be a shell the user means to close."""
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    precision, why = resolve_precision(config.train.precision, device_type())
    if precision == "fp16" and not torch.cuda.is_available():
        raise PipelineError(
            "train.precision=fp16 needs a GPU (loss scaling is a CUDA "
            "feature); on a CPU use train.precision=bf16 or no"
        )
    mode = wandb_mode(config.tracking.wandb)
    timeout = timedelta(minutes=config.train.collective_timeout_minutes)
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:  # a name that never resolves: say so, not retry
        from pipeline.data.team import check_master_address

        check_master_address()
    try:
        accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=config.train.grad_accum_steps,
            log_with=trackers(config) or None,
            fsdp_plugin=fsdp_plugin(),  # None unless an FSDP2 launch: then DDP's numbers
            project_config=ProjectConfiguration(
                project_dir=str(config.run_dir), logging_dir=str(config.run_dir / "tensorboard")
            ),
            # gradient_as_bucket_view: DDP's gradients are views into its all-reduce
            # buckets, one copy of every gradient less per step
            kwargs_handlers=[
                InitProcessGroupKwargs(timeout=timeout),
                DistributedDataParallelKwargs(gradient_as_bucket_view=True),
            ],
        )
    except (ValueError, RuntimeError) as e:  # the launch environment, e.g. no MASTER_ADDR
        if "torch.distributed" not in str(e) and "rendezvous" not in str(e):
            raise
        raise PipelineError(
            f"the processes could not form a group: {str(e).strip()}. Start several "
            f"processes with `accelerate launch` or `torchrun`, which set WORLD_SIZE, RANK, "
            f"MASTER_ADDR and MASTER_PORT together, or unset WORLD_SIZE for one process."
        ) from None
    check_launch(accelerator)
    use_tf32(config.train.tf32)
    log.info(f"precision: {precision} ({why})")
    for note in (launcher_precision_note(precision), slow_bf16_warning(precision, device_type())):
        if note:
            log.info(note)
    return accelerator, mode


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores where the GPU has them
    (train.tf32); torch's default is full fp32 for matmuls. CPUs ignore both flags."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def device_type() -> str:
    """The device Accelerate will train on, before it is made: cuda unless told to use the
    CPU (ACCELERATE_USE_CPU, as launch/multinode.sh and make set on CPU-only machines)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"


def launcher_precision_note(precision: str) -> str | None:
    """One line when the launcher asked for another mixed precision than train.precision:
    the config is the experiment, so it wins, and the line says how to change it."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if asked is None or asked == precision:
        return None
    return (
        f"precision: the launcher asked for mixed precision '{asked}' (accelerate launch "
        f"--mixed_precision or its config file), the config for '{precision}'; training "
        f"uses the config's '{precision}'. To train in '{asked}', set "
        f"train.precision={asked}."
    )


def check_launch(accelerator) -> None:
    """A launcher that starts N processes which do not form one group gives N separate
    1-process runs writing the same run directory. Say so and how to fix it."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1 and accelerator.num_processes == 1:
        raise PipelineError(
            f"this process was launched as one of WORLD_SIZE={world}, but Accelerate formed "
            f"no process group with the others (on a machine without GPUs, Accelerate does "
            f"so only when told to use the CPU). Launch with ACCELERATE_USE_CPU=1 (as `make "
            f"train` does) or `accelerate launch --cpu`, or use a config from "
            f"configs/accelerate/ that sets use_cpu: true."
        )


def resolve_initial_weights(config: Config) -> tuple[Config, dict | None]:
    """The config with `model` as the weights of `model.init_from` dictate (GPT-2's
    shape, say), and those weights; for `scratch` the config unchanged and None."""
    if config.model.init_from == "scratch":
        return config, None
    from pipeline.model.weights import init_from_weights

    model_cfg, state = init_from_weights(config.model, config.model.init_from)
    return replace(config, model=model_cfg), state


def new_model(config: Config, initial_state: dict | None) -> GPTModel:
    """Fresh weights (model.init), or the ones resolve_initial_weights read."""
    if initial_state is None:
        return GPTModel(config.model)
    from pipeline.model.weights import build_model

    return build_model(config.model, initial_state)


@dataclass
class Training:
    """What the loop trains with, built once from the config."""

    config: Config
    accelerator: object
    model: torch.nn.Module  # as prepared by Accelerate (DDP/FSDP-wrapped, compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_windows: TokenWindows | MixedWindows
    val_windows: TokenWindows
    batches: TrainBatches  # the train stream; resume moves it
    plan: BatchPlan
    parameters: int
    progress: Progress = field(default_factory=Progress)
    tasks: dict = field(
        default_factory=dict
    )  # eval.tasks: name -> examples (pipeline.training.tasks)
    spikes: SpikeGuard | None = None  # spikes.*: None when all are off
    checkpoints: CheckpointManager = field(init=False)  # resume() and save(step, tokens)

    def __post_init__(self) -> None:
        self.checkpoints = CheckpointManager(
            self.config, self.accelerator, self.model, self.optimizer, self.stateful_parts
        )

    def stateful_parts(self) -> dict:
        """Everything a checkpoint saves besides the model and the optimizer, by name;
        each has state_dict()/load_state_dict(). A new stateful part is one line here."""
        parts = {"progress": self.progress, "loader": self.batches, "scheduler": self.scheduler}
        if self.spikes is not None:
            parts["spikes"] = self.spikes
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 loss scaling
        if scaler is not None:
            parts["scaler"] = scaler
        return parts


def check_vocabulary(config: Config) -> None:
    """The data's token ids and the sample prompt must exist in the model's vocabulary,
    checked before anything is built (an id past it fails deep inside the embedding)."""
    from pipeline.data.shards import load_manifest
    from pipeline.generate import prompt_ids

    vocab = load_manifest(config.data_dir).vocab_size
    if vocab > config.model.vocab_size:
        raise PipelineError(
            f"{config.data_dir} was tokenized with a vocabulary of {vocab} tokens, and "
            f"model.vocab_size is {config.model.vocab_size}: its ids would not fit the "
            f"embedding. Set model.vocab_size to {vocab}."
        )
    if config.model.vocab_size > vocab and config.model.init_from == "scratch":
        raise PipelineError(
            f"model.vocab_size is {config.model.vocab_size}, more than the {vocab} tokens "
            f"{config.data_dir} was tokenized with: the extra rows would be trained toward "
            f"never being predicted and exported as ids no tokenizer has. To pad the "
            f"vocabulary for speed, as nanoGPT's 50304 does, keep model.vocab_size={vocab}: "
            f"model.vocab_padding (64 by default) pads the head's matmuls internally."
        )
    prompt_ids(config.eval.prompt, config.model.context_length, config.model.vocab_size)


def setup(config: Config, accelerator, initial_state: dict | None = None) -> Training:
    check_vocabulary(config)
    torch.manual_seed(config.seed)  # same initial weights on every process
    model = new_model(config, initial_state)
    ctx, t = config.model.context_length, config.train
    mixture = None
    if config.data.sources:  # each sample drawn from a source by the weights
        train_windows, mixture = mixed_train_windows(
            config.data_dir,
            [s.name for s in config.data.sources],
            [s.weight for s in config.data.sources],
            ctx,
            t.stride,
            config.seed,
        )
    else:
        train_windows = TokenWindows(config.data_dir, "train", ctx, t.stride)
    val_windows = TokenWindows(config.data_dir, "val", ctx)
    batches = TrainBatches(
        train_windows,
        t.micro_batch_size,
        config.seed,
        accelerator.process_index,
        accelerator.num_processes,
        order=t.order,
        mixture=mixture,
    )
    plan = BatchPlan.make(config, accelerator.num_processes, batches.epoch_samples)
    check_optimizer_fits(t, accelerator)
    optimizer = build_optimizer(model, t, accelerator.device.type)
    scheduler = build_scheduler(optimizer, t, plan.max_steps)
    parameters = count_parameters(model)
    model.recompute_blocks = t.activation_checkpointing
    if t.compile:
        model.compile_blocks()
    model, optimizer = accelerator.prepare(model, optimizer)
    return Training(
        config,
        accelerator,
        model,
        optimizer,
        scheduler,
        train_windows,
        val_windows,
        batches,
        plan,
        parameters,
        tasks=task_examples(config),
        spikes=SpikeGuard(config.spikes) if config.spikes.on else None,
    )


def check_optimizer_fits(train, accelerator) -> None:
    """Muon orthogonalizes whole matrices; FSDP holds each process's shard of them."""
    from accelerate.utils import DistributedType

    if train.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
        raise PipelineError(
            "train.optimizer: muon cannot run under FSDP (configs/accelerate/fsdp.yaml): Muon "
            "orthogonalizes each weight matrix whole, and FSDP gives every process a shard of "
            "it. Use train.optimizer=adamw with FSDP, or launch with DDP (the default "
            "multi-GPU config)."
        )


def task_examples(config: Config) -> dict:
    """The examples of eval.tasks, read (or downloaded) before training starts."""
    from pipeline.training.tasks import load_task

    e = config.eval
    return {task: load_task(task, e.task_file)[: e.task_examples] for task in e.tasks}


def run(config: Config, stop: StopRequest | None = None) -> dict:
    """Train as the config says; return the end-of-run summary. `stop` is the stop
    request installed by main before anything else (made here when called directly)."""
    own_stop = stop is None
    stop = stop or StopRequest()
    try:
        config, initial_state = resolve_initial_weights(config)  # one config from here on
        accelerator, mode = make_accelerator(config)
        with contextlib.ExitStack() as held:
            if accelerator.is_main_process:  # one training per run directory at a time
                held.enter_context(locking.exclusive(config.run_dir, "training"))
            return _run_locked(config, accelerator, mode, initial_state, stop)
    except RuntimeError as e:
        raise timed_out(e, config) or e
    finally:
        if own_stop:
            stop.restore()


def _run_locked(config: Config, accelerator, mode: str, initial_state, stop: StopRequest) -> dict:
    tr = setup(config, accelerator, initial_state)
    run_dir, progress = config.run_dir, tr.progress
    # Dropout masks differ between processes; a resume restores these generators. The
    # first process goes on drawing where the model's initialization stopped, as the
    # book's script does.
    if accelerator.process_index > 0:
        torch.manual_seed(config.seed + 1_000_003 * accelerator.process_index)
    resume(tr)
    if stop.requested(accelerator):
        log.info(
            f"Stopped by {stop.signal_name} before training began; nothing "
            f"new to save. Start again with the same command."
        )
        accelerator.end_training()
        return summary(progress, MetricsLog(run_dir), time.perf_counter())
    metrics = MetricsLog(run_dir)
    # If the console goes away (a dead launcher, `| head`), its text lands here instead.
    console.fall_back_to(
        run_dir
        / (
            "console.log"
            if accelerator.is_main_process
            else f"console.rank{accelerator.process_index}.log"
        )
    )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        metrics.truncate_after(progress.step)
    start_trackers(accelerator, config, run_dir, mode)
    announce(tr)
    if progress.step >= tr.plan.max_steps:
        log.info(f"Nothing to do: the run already reached step {tr.plan.max_steps}.")
        accelerator.end_training()
        return summary(progress, metrics, time.perf_counter())

    loop = TrainLoop(tr, metrics)
    try:
        reason = loop.run(stop)
    finally:
        loop.close()
    if reason == "signal":
        log.info(
            f"Stopped by {stop.signal_name} after step {progress.step}; checkpoint saved. "
            f"Resume with the same command (checkpoint.resume=auto)."
        )
    result = summary(progress, metrics, loop.started)
    if reason == "done" and config.eval.whole_split_at_end:
        result["val_loss_whole_split"] = whole_split_val_loss(tr)
    accelerator.end_training()
    if accelerator.is_main_process and reason == "done":
        print_summary(result)
    return result


def timed_out(error: RuntimeError, config: Config) -> PipelineError | None:
    """A collective that waited train.collective_timeout_minutes for a peer, as one
    paragraph naming this process; None for any other error."""
    text = str(error)
    if not any(word in text.lower() for word in ("timed out", "timeout")):
        return None
    minutes = config.train.collective_timeout_minutes
    return PipelineError(
        f"process {os.environ.get('RANK', '?')} waited {minutes:g} minutes "
        f"(train.collective_timeout_minutes) for the other processes in a collective "
        f"operation; {HANG_ADVICE} ({text.splitlines()[0][:200]})"
    )


HANG_ADVICE = (
    "one of them hung or died (see the logs of the other ranks). The last checkpoint is "
    "intact: fix the cause and run the same command to resume."
)


def hang_watch(tr: Training) -> HangWatch | None:
    """On NCCL, a paragraph shortly before its watchdog aborts a process that waits for a
    hung peer (gloo raises instead, and timed_out says it)."""
    acc = tr.accelerator
    if acc.num_processes == 1 or acc.device.type != "cuda":
        return None
    timeout_s = 60 * tr.config.train.collective_timeout_minutes
    limit = timeout_s - warning_margin_s(timeout_s)

    def warn(quiet_s: float) -> None:
        log.warn(
            f"process {acc.process_index}: nothing has moved for {quiet_s / 60:.1f} minutes; "
            f"at {timeout_s / 60:g} minutes (train.collective_timeout_minutes) NCCL's "
            f"watchdog ends the processes waiting in a collective: {HANG_ADVICE} If a step "
            f"or a checkpoint is just this slow, raise train.collective_timeout_minutes.",
            everywhere=True,
        )

    return HangWatch(limit, warn)


class TrainLoop:
    """The optimizer-step loop and the work it does on a schedule."""

    def __init__(self, tr: Training, metrics: MetricsLog):
        self.tr, self.log = tr, metrics
        t = tr.config.train
        self.peak, source = peak_flops(
            tr.accelerator.device, tr.accelerator.mixed_precision, t.peak_flops
        )
        log.info(f"MFU is measured against {self.peak / 1e12:.3g} TFLOP/s ({source})")
        self.flops_per_token = flops_per_token(tr.config.model)
        self.interval = Interval()
        self.samples = SampleTable(tr.accelerator, tr.config.eval.prompt)
        self.judged: dict = {}  # the spike guard's view of the last step (loss, grad norm)
        self.started = time.perf_counter() - tr.progress.elapsed
        self.bar = self._progress_bar()
        # The val estimate: the book's first batches in file order for the book's order,
        # else windows spread over the whole split, the same ones at every evaluation.
        e, acc = tr.config.eval, tr.accelerator
        self.val_order = None
        if tr.config.train.order != "book":
            wanted = e.batches * tr.plan.micro_batch_size * acc.num_processes
            self.val_order = spread_windows(len(tr.val_windows), wanted)

    def run(self, stop: StopRequest) -> str:
        """Train to max_steps; return "done" or "signal"."""
        tr, c, p = self.tr, self.tr.config, self.tr.progress
        last = tr.plan.max_steps
        tr.model.train()
        stop.attach(tr.accelerator)
        watch = hang_watch(tr)
        beat = watch.beat if watch else lambda: None
        try:
            while p.step < last:
                rolled_back = self.train_step()
                beat()
                if rolled_back:  # back at a checkpointed step: nothing is due there again
                    continue
                due_log = p.step % c.train.log_every_steps == 0
                due_eval = eval_due(p.step, c.eval, last)
                due_ckpt = p.step % c.checkpoint.every_steps == 0 or p.step == last
                stopping = stop.poll(tr.accelerator)
                if due_log or due_eval or due_ckpt or stopping:
                    self.write_metrics(with_eval=due_eval)
                if due_ckpt or stopping:
                    self.save()
                    self.interval = Interval()  # checkpoint time is not step time either
                beat()
                if stopping:
                    return "signal"
            return "done"
        finally:
            stop.settle()
            if watch:
                watch.close()

    def train_step(self) -> bool:
        """One optimizer step over grad_accum_steps micro batches; True when the step
        rolled the run back to its newest checkpoint instead (spikes.*)."""
        tr, acc, t = self.tr, self.tr.accelerator, self.tr.config.train
        step_losses = []
        for _ in range(t.grad_accum_steps):
            x, y = (on_device(t, acc.device) for t in next(tr.batches))
            # autocast here, not only in the forward Accelerate wraps: under FSDP2 it
            # wraps none, and the run would be fp32 while saying bf16
            with acc.accumulate(tr.model), acc.autocast():
                loss = tr.model(x, targets=y)  # the model's fused head + cross-entropy
                acc.backward(loss)
            step_losses.append(loss.detach())
        norm = None
        if clips_at(tr.progress.step, t):
            norm = acc.clip_grad_norm_(tr.model.parameters(), t.grad_clip)
        verdict = self.judge(step_losses, norm) if tr.spikes is not None else TRAIN
        if verdict.action == "rollback":
            return self.roll_back(verdict)
        if verdict.action == "train":  # a skipped step's loss is on its own row
            self.interval.losses += step_losses
            self.interval.grad_norm = norm if norm is not None else self.interval.grad_norm
            tr.optimizer.step()
        tr.scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.progress.step += 1
        tr.progress.tokens += tr.plan.tokens_per_step
        self.bar.update(1)
        if verdict.action == "skip":
            self.skipped(verdict)
        return False

    def judge(self, step_losses: list, norm) -> Verdict:
        """The spike guard's verdict on this step, from its loss averaged over the
        processes and its gradient norm (a device sync each step: only with spikes.*)."""
        tr, acc = self.tr, self.tr.accelerator
        loss = acc.reduce(torch.stack(step_losses).float().mean(), reduction="mean").item()
        if norm is None and tr.config.spikes.skip_grad_z is not None:
            norm = acc.clip_grad_norm_(tr.model.parameters(), math.inf)  # measured, not clipped
        grad_norm = None if norm is None else float(norm)
        verdict = tr.spikes.verdict(loss, grad_norm)
        self.judged = {"loss": loss, "grad_norm": grad_norm}
        if verdict.action == "train":
            tr.spikes.trained(loss, grad_norm)
        return verdict

    def skipped(self, verdict: Verdict) -> None:
        """A row for a step whose update was skipped: counted, its data consumed."""
        tr, p = self.tr, self.tr.progress
        tr.spikes.skipped_updates += 1
        row = {"step": p.step, "tokens": p.tokens, "skipped": True, "why": verdict.why}
        self.write_row({**row, **self.judged})
        self.say(f"step {p.step}: update skipped ({verdict.why})")

    def roll_back(self, verdict: Verdict) -> bool:
        """Back to the newest checkpoint, the samples drawn since it skipped (True), or
        the update skipped where there is no checkpoint yet (False)."""
        tr, p = self.tr, self.tr.progress
        from_step, end = p.step + 1, tr.batches.samples
        start = end - tr.plan.samples_per_step  # what this step drew
        tr.optimizer.zero_grad(set_to_none=True)
        # The checkpoint predates the rollbacks made since it: they stay (ranges only
        # grow, and spikes.max_rollbacks counts them all)
        skips, rollbacks = tr.batches.skips, list(tr.spikes.rollbacks)
        if tr.checkpoints.reload_newest() is None:  # nothing to go back to yet: skip it
            why = f"{verdict.why}; no checkpoint yet to roll back to"
            self.skip_instead(Verdict("skip", why))
            return False
        tr.batches.keep_skips(skips)
        tr.spikes.rollbacks = rollbacks
        record = tr.spikes.rolled_back(p.step, from_step, start, end, verdict.why)
        tr.batches.skip(start, end)  # the steps before it replay as they were
        if tr.accelerator.is_main_process:
            self.log.truncate_after(p.step)
            # a run resumed after a kill replays this rollback: its row is there already
            if record in [row.get("rollback") for row in self.log.rows()]:
                record = None
        if record is not None:
            self.write_row({"step": p.step, "tokens": p.tokens, "rollback": record})
        self.say(
            f"step {from_step}: {verdict.why}; rolled back to step {p.step}, its samples "
            f"[{start:,}, {end:,}) to be skipped"
        )
        self.bar.n = p.step
        self.interval = Interval()
        return True

    def skip_instead(self, verdict: Verdict) -> None:
        tr = self.tr
        tr.scheduler.step()
        tr.progress.step += 1
        tr.progress.tokens += tr.plan.tokens_per_step
        self.bar.update(1)
        self.skipped(verdict)

    def write_row(self, row: dict) -> None:
        if self.tr.accelerator.is_main_process:
            self.log.append(row)
        self.tr.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def write_metrics(self, with_eval: bool) -> None:
        """Reduce the interval's numbers across processes, check them, write one row."""
        tr, acc, p, iv = self.tr, self.tr.accelerator, self.tr.progress, self.interval
        accum = tr.plan.grad_accum_steps
        steps = len(iv.losses) // accum
        losses = acc.reduce(torch.stack(iv.losses), reduction="mean") if iv.losses else None
        elapsed = time.perf_counter() - iv.start
        row = {"step": p.step, "tokens": p.tokens, "epoch": round(tr.batches.epoch, 4)}
        row.update({f"tokens/{name}": n for name, n in tr.batches.tokens_by_source().items()})
        if losses is not None:
            check_finite(losses, p.step - steps + 1, accum)
            tokens_per_s = steps * tr.plan.tokens_per_step / elapsed
            row.update(
                loss=losses.mean().item(),
                lr=tr.scheduler.get_last_lr()[0],
                tokens_per_s=tokens_per_s,
                step_time=elapsed / steps,
                mfu=mfu(self.flops_per_token, tokens_per_s / tr.plan.processes, self.peak),
            )
            if iv.grad_norm is not None:
                row["grad_norm"] = float(iv.grad_norm)
            if torch.cuda.is_available():
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.bar.set_postfix(
                loss=f"{row['loss']:.3f}",
                lr=f"{row['lr']:.2e}",
                tok_s=f"{tokens_per_s:,.0f}",
                refresh=False,
            )
        if with_eval:
            row.update(self.run_eval())
        if acc.is_main_process:
            self.log.append(row)
            if with_eval:
                self.log.plot()
        acc.log({k: v for k, v in row.items() if k != "step"}, step=p.step)
        self.interval = Interval()  # evaluation time is not training time

    def run_eval(self) -> dict:
        """The book's evaluate_model + generate_and_print_sample."""
        tr, e, p = self.tr, self.tr.config.eval, self.tr.progress
        batch = tr.plan.micro_batch_size
        tr.model.eval()
        order = tr.batches.evaluation_windows(e.batches)
        train_loss = evaluate(tr.model, tr.train_windows, batch, tr.accelerator, e.batches, order)[
            "loss"
        ]
        val_loss = evaluate(
            tr.model, tr.val_windows, batch, tr.accelerator, e.batches, self.val_order
        )["loss"]
        sample = self.sample()
        self.samples.add(p.step, sample)
        scores = self.score_tasks()
        tr.model.train()
        p.best_val_loss = min(p.best_val_loss, val_loss)
        epoch = math.ceil(tr.batches.epoch)  # counted from 1, as the book's "Ep"
        tasks = "".join(f" | {k} {v:.3f}" for k, v in scores.items() if k.endswith("acc_norm"))
        self.say(
            f"step {p.step:>6} (ep {epoch}) | "
            f"tokens {p.tokens:,} | "
            f"train loss {train_loss:.3f} | val loss {val_loss:.3f}{tasks}\n"
            f"  sample: {sample!r}"
        )
        return {"train_loss": train_loss, "val_loss": val_loss, "sample": sample, **scores}

    def score_tasks(self) -> dict:
        """<task>_acc and <task>_acc_norm of eval.tasks, when due at this evaluation."""
        from pipeline.training.tasks import evaluate_task

        tr, e = self.tr, self.tr.config.eval
        step, last = tr.progress.step, tr.plan.max_steps
        if not tr.tasks or (e.task_every_steps and step % e.task_every_steps and step != last):
            return {}
        scores = {}
        for task, examples in tr.tasks.items():
            result = evaluate_task(tr.model, examples, tr.accelerator, tr.plan.micro_batch_size)
            scores.update({f"{task}_acc": result["acc"], f"{task}_acc_norm": result["acc_norm"]})
        return scores

    def sample(self) -> str:
        """Text continuing eval.prompt; every process generates (FSDP needs all of them
        in each forward), with a generator seeded by the step, so the training RNG is
        left as it was and every process produces the same text."""
        from pipeline.generate import continue_text

        tr, e = self.tr, self.tr.config.eval
        device = tr.accelerator.device
        gen = torch.Generator(device=device).manual_seed(tr.config.seed + tr.progress.step)
        with torch.no_grad(), tr.accelerator.autocast(), whole_root(tr.model):
            _, text = continue_text(
                tr.model,
                e.prompt,
                e.max_new_tokens,
                temperature=e.temperature,
                top_k=e.top_k,
                generator=gen,
            )
        return text

    def save(self) -> None:
        tr, p = self.tr, self.tr.progress
        p.elapsed = time.perf_counter() - self.started
        self.say(f"checkpoint: {tr.checkpoints.save(p.step, p.tokens)}")

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(
            total=self.tr.plan.max_steps,
            initial=self.tr.progress.step,
            unit="step",
            disable=not self.tr.accelerator.is_main_process,
            dynamic_ncols=True,
        )

    def say(self, line: str) -> None:
        """A line above the progress bar, from the main process only."""
        with log.above(self.bar):
            log.info(line)

    def close(self) -> None:
        self.bar.close()


def on_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on the training device. To a GPU through pinned host memory, copied
    asynchronously: the host goes on queueing the step's kernels while the batch travels
    (the first kernel that reads it waits for the copy on the same stream)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def eval_due(step: int, schedule: EvalConfig, max_steps: int) -> bool:
    """Evaluate after step first_step (default every_steps), every every_steps after it,
    and after the last step."""
    first = schedule.first_step or schedule.every_steps
    return step == max_steps or (step >= first and (step - first) % schedule.every_steps == 0)


def check_finite(losses: torch.Tensor, first_step: int, accum: int) -> None:
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = first_step + int(bad[0]) // accum
        raise PipelineError(
            f"the loss became {losses[bad[0]].item()} at step {step}; training stopped without "
            f"saving it. The last good checkpoint is kept. Lower train.lr, set train.grad_clip, "
            f"or use train.precision=bf16 instead of fp16, then resume."
        )


def resume(tr: Training) -> None:
    """Continue from the checkpoint checkpoint.resume names, if any."""
    path = tr.checkpoints.resume()
    if path is not None:
        log.info(f"Resumed from {path} (step {tr.progress.step}, {tr.progress.tokens:,} tokens)")


def announce(tr: Training) -> None:
    plan, acc, step = tr.plan, tr.accelerator, tr.progress.step
    log.info(
        f"{tr.config.name}: {tr.parameters / 1e6:.2f}M parameters, {plan.processes} "
        f"process(es) on {acc.device.type}, precision {acc.mixed_precision}\n"
        f"global batch = {plan.micro_batch_size} micro x {plan.grad_accum_steps} accum x "
        f"{plan.processes} processes = {plan.samples_per_step} sequences x "
        f"{plan.context_length} tokens = {plan.tokens_per_step:,} tokens/step\n"
        f"{len(tr.train_windows):,} train windows; {plan.max_steps} steps "
        f"({plan.epochs:.2f} epochs)" + (f"; resuming at step {step}" if step else "")
    )


# Scoring the whole val split once at the end costs about one evaluation per this many
# windows' worth of estimates; past it (a large corpus' val split) the evaluate stage does it.
WHOLE_SPLIT_WINDOWS = 4096


def whole_split_val_loss(tr: Training) -> float | None:
    """The val loss over every val window (all processes together), to print beside the
    in-training estimate; None for a split too large to score at the end of training."""
    if len(tr.val_windows) > WHOLE_SPLIT_WINDOWS:
        return None
    batch = tr.plan.micro_batch_size
    return evaluate(tr.model, tr.val_windows, batch, tr.accelerator)["loss"]


def summary(progress: Progress, metrics: MetricsLog, started: float) -> dict:
    rows = metrics.rows()
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), None)  # noqa: E731
    best = progress.best_val_loss
    return {
        "steps": progress.step,
        "tokens": progress.tokens,
        "seconds": time.perf_counter() - started,
        "train_loss": last("loss"),
        "val_loss": last("val_loss"),
        "best_val_loss": None if math.isinf(best) else best,
    }


def print_summary(s: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    whole = s.get("val_loss_whole_split")
    log.info(
        f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f} s | "
        f"train loss {fmt(s['train_loss'])} | val loss {fmt(s['val_loss'])} (estimate)"
        + (f", {whole:.3f} over the whole val split" if whole is not None else "")
        + f" | best val loss {fmt(s['best_val_loss'])}"
    )


if __name__ == "__main__":
    main()
