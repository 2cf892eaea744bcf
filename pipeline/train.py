"""Stage 2: train the GPT with Hugging Face Accelerate, from one CPU to many GPUs and nodes.

    python -m pipeline.train --config configs/tiny.yaml [section.key=value ...]
    accelerate launch [--multi_gpu --num_processes N ...] -m pipeline.train --config ...

The book's `train_model_simple` grown up: the loop below still reads top to bottom,
with each extra concern (checkpoints, metrics, signals, evaluation) behind one call.
Accelerate owns the processes, the device and mixed precision; this file owns the
order of things.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from pipeline.config import Config, EvalConfig, load_config, save_config, to_dict
from pipeline.errors import PipelineError, cli_main
from pipeline.evaluate import evaluate
from pipeline.loader import TokenWindows, TrainBatches
from pipeline.mfu import mfu, peak_flops
from pipeline.model import GPTModel, flops_per_token
from pipeline.optim import build_optimizer, build_scheduler, total_steps
from pipeline.stopping import StopRequest
from pipeline.tokenizer import encode
from pipeline.tracking import MetricsLog, start_trackers, wandb_mode


@dataclass
class Progress:
    """Counters that a checkpoint saves and a resume restores."""
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens consumed, all processes together
    best_val_loss: float = math.inf
    elapsed: float = 0.0  # seconds of training before this process started


@dataclass
class Interval:
    """What happened since the last metrics row: per-step losses stay on the device
    until the row is written, so the loop never waits for the device in between."""
    losses: list = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    grad_norm: torch.Tensor | None = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    run(load_config(args.config, args.overrides))


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = config.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise PipelineError("train.precision=fp16 needs a GPU (loss scaling is a CUDA "
                            "feature); on a CPU use train.precision=bf16 or no")
    mode = wandb_mode(config.tracking.wandb)
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum_steps,
        log_with=None if mode == "disabled" else "wandb",
        project_config=ProjectConfiguration(project_dir=str(config.run_dir)),
    ), mode


def build_model(config: Config) -> tuple[Config, GPTModel]:
    """The model of `model.init_from`: fresh weights, or GPT-2 / a model directory."""
    if config.model.init_from == "scratch":
        return config, GPTModel(config.model)
    from pipeline.weights import build_model as model_with_weights, init_weights
    model_cfg, state = init_weights(config.model, config.model.init_from)
    return replace(config, model=model_cfg), model_with_weights(model_cfg, state)


@dataclass
class Training:
    """What the loop trains with, built once from the config."""
    config: Config
    accelerator: object
    model: torch.nn.Module  # as prepared by Accelerate (DDP/FSDP-wrapped, compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_windows: TokenWindows
    val_windows: TokenWindows
    batches: TrainBatches  # at the start of the stream; resume moves it
    max_steps: int
    parameters: int


def setup(config: Config, accelerator) -> Training:
    torch.manual_seed(config.seed)  # same initial weights on every process
    config, model = build_model(config)
    ctx, t = config.model.context_length, config.train
    train_windows = TokenWindows(config.data_dir, "train", ctx, t.stride)
    val_windows = TokenWindows(config.data_dir, "val", ctx)
    batches = TrainBatches(train_windows, t.micro_batch_size, config.seed,
                           accelerator.process_index, accelerator.num_processes, order=t.order)
    samples_per_step = t.micro_batch_size * t.grad_accum_steps * accelerator.num_processes
    max_steps = total_steps(t, batches.epoch_samples, samples_per_step, samples_per_step * ctx)
    optimizer = build_optimizer(model, t, accelerator.device.type)
    scheduler = build_scheduler(optimizer, t, max_steps)
    parameters = sum(p.numel() for p in model.parameters())
    if t.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Training(config, accelerator, model, optimizer, scheduler, train_windows,
                    val_windows, batches, max_steps, parameters)


def run(config: Config) -> dict:
    """Train as the config says; return the end-of-run summary."""
    accelerator, mode = make_accelerator(config)
    tr = setup(config, accelerator)
    config, run_dir = tr.config, tr.config.run_dir
    # Dropout masks differ between processes; a resume restores these generators. The
    # first process goes on drawing where the model's initialization stopped, as the
    # book's script does.
    if accelerator.process_index > 0:
        torch.manual_seed(config.seed + 1_000_003 * accelerator.process_index)
    progress, loader_state = resume(config, accelerator, tr.model, tr.optimizer, tr.scheduler)
    batches = tr.batches
    if loader_state:  # also checks that data, seed and window shape are unchanged
        batches.load_state_dict(loader_state)
    log = MetricsLog(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        log.truncate_after(progress.step)
    start_trackers(accelerator, config, run_dir, mode)
    announce(tr, progress)
    if progress.step >= tr.max_steps:
        accelerator.print(f"Nothing to do: the run already reached step {tr.max_steps}.")
        accelerator.end_training()
        return summary(progress, log, time.perf_counter())

    loop = TrainLoop(tr, batches, log, progress)
    stop = StopRequest()
    try:
        reason = loop.run(stop)
    finally:
        stop.restore()
        loop.close()
    if reason == "signal":
        accelerator.print(
            f"Stopped by {stop.signal_name} after step {progress.step}; checkpoint saved. "
            f"Resume with the same command (checkpoint.resume=auto).")
    result = summary(progress, log, loop.started)
    accelerator.end_training()
    if accelerator.is_main_process and reason == "done":
        print_summary(result)
    return result


class TrainLoop:
    """The optimizer-step loop and the work it does on a schedule."""

    def __init__(self, tr: Training, batches: TrainBatches, log: MetricsLog, progress: Progress):
        self.config, self.acc, self.model = tr.config, tr.accelerator, tr.model
        self.optimizer, self.scheduler, self.batches = tr.optimizer, tr.scheduler, batches
        self.train_windows, self.val_windows = tr.train_windows, tr.val_windows
        self.log, self.progress, self.max_steps = log, progress, tr.max_steps
        t = self.config.train
        self.peak, source = peak_flops(self.acc.device, t.precision, t.peak_flops)
        self.acc.print(f"MFU is measured against {self.peak / 1e12:.3g} TFLOP/s ({source})")
        self.flops_per_token = flops_per_token(self.config.model)
        self.tokens_per_step = (t.micro_batch_size * t.grad_accum_steps
                                * self.acc.num_processes * self.config.model.context_length)
        self.interval = Interval()
        self.started = time.perf_counter() - progress.elapsed
        self.bar = self._progress_bar()

    def run(self, stop: StopRequest) -> str:
        """Train to max_steps; return "done" or "signal"."""
        c, p = self.config, self.progress
        self.model.train()
        while p.step < self.max_steps:
            self.train_step()
            due_log = p.step % c.train.log_every_steps == 0
            due_eval = eval_due(p.step, c.eval, self.max_steps)
            due_ckpt = p.step % c.checkpoint.every_steps == 0 or p.step == self.max_steps
            stopping = (due_log or self.acc.num_processes == 1) and stop.requested(self.acc)
            if due_log or due_eval or due_ckpt or stopping:
                self.write_metrics(with_eval=due_eval)
            if due_ckpt or stopping:
                self.save()
            if stopping:
                return "signal"
        return "done"

    def train_step(self) -> None:
        """One optimizer step over grad_accum_steps micro batches."""
        t = self.config.train
        for _ in range(t.grad_accum_steps):
            x, y = next(self.batches)
            x, y = x.to(self.acc.device), y.to(self.acc.device)
            with self.acc.accumulate(self.model):
                loss = self.model(x, targets=y)  # the model's fused head + cross-entropy
                self.acc.backward(loss)
            self.interval.losses.append(loss.detach())
        if t.grad_clip is not None:
            self.interval.grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.tokens += self.tokens_per_step
        self.bar.update(1)

    def write_metrics(self, with_eval: bool) -> None:
        """Reduce the interval's numbers across processes, check them, write one row."""
        p, iv = self.progress, self.interval
        steps = len(iv.losses) // self.config.train.grad_accum_steps
        losses = self.acc.reduce(torch.stack(iv.losses), reduction="mean") if iv.losses else None
        elapsed = time.perf_counter() - iv.start
        row = {"step": p.step, "tokens": p.tokens, "epoch": round(self.batches.epoch, 4)}
        if losses is not None:
            check_finite(losses, p.step - steps + 1, self.config.train.grad_accum_steps)
            tokens_per_s = steps * self.tokens_per_step / elapsed
            row.update(loss=losses.mean().item(), lr=self.scheduler.get_last_lr()[0],
                       tokens_per_s=tokens_per_s, step_time=elapsed / steps,
                       mfu=mfu(self.flops_per_token, tokens_per_s / self.acc.num_processes,
                               self.peak))
            if iv.grad_norm is not None:
                row["grad_norm"] = float(iv.grad_norm)
            if torch.cuda.is_available():
                row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        if with_eval:
            row.update(self.run_eval())
        if self.acc.is_main_process:
            self.log.append(row)
            if with_eval:
                self.log.plot()
        self.acc.log({k: v for k, v in row.items() if k != "step"}, step=p.step)
        self.interval = Interval()  # evaluation time is not training time

    def run_eval(self) -> dict:
        """The book's evaluate_model + generate_and_print_sample."""
        e = self.config.eval
        self.model.eval()
        batch = self.config.train.micro_batch_size
        order = self.batches.evaluation_windows(e.batches)
        train_loss = evaluate(self.model, self.train_windows, batch, self.acc, e.batches,
                              order)["loss"]
        val_loss = evaluate(self.model, self.val_windows, batch, self.acc, e.batches)["loss"]
        sample = self.sample()
        self.model.train()
        self.progress.best_val_loss = min(self.progress.best_val_loss, val_loss)
        epoch = math.ceil(self.batches.epoch)  # counted from 1, as the book's "Ep"
        self.bar.write(f"step {self.progress.step:>6} (ep {epoch}) | "
                       f"tokens {self.progress.tokens:,} | "
                       f"train loss {train_loss:.3f} | val loss {val_loss:.3f}\n"
                       f"  sample: {sample!r}")
        return {"train_loss": train_loss, "val_loss": val_loss, "sample": sample}

    def sample(self) -> str:
        """Text continuing eval.prompt; every process generates (FSDP needs all of them
        in each forward), with a generator seeded by the step, so the training RNG is
        left as it was and every process produces the same text."""
        from pipeline.generate import completion, generate
        from pipeline.tokenizer import decode

        e = self.config.eval
        model = self.acc.unwrap_model(self.model)
        idx = torch.tensor([encode(e.prompt)], device=self.acc.device)
        gen = torch.Generator(device=self.acc.device).manual_seed(self.config.seed + self.progress.step)
        with torch.no_grad(), self.acc.autocast():
            out = generate(model, idx, e.max_new_tokens, temperature=e.temperature,
                           top_k=e.top_k, generator=gen)
        return decode(completion(out[0, idx.shape[1]:].tolist()))

    def save(self) -> None:
        p = self.progress
        p.elapsed = time.perf_counter() - self.started
        meta = {"step": p.step, "tokens": p.tokens, "best_val_loss": p.best_val_loss,
                "elapsed": p.elapsed, "loader": self.batches.state_dict(),
                "num_processes": self.acc.num_processes,
                "model": to_dict(self.config.model), "config": to_dict(self.config)}
        path = ckpt.save_checkpoint(self.config.run_dir, p.step, accelerator=self.acc,
                                    model=self.model, optimizer=self.optimizer,
                                    scheduler=self.scheduler, meta=meta,
                                    keep_last=self.config.checkpoint.keep_last)
        self.bar.write(f"checkpoint: {path}")

    def _progress_bar(self):
        from tqdm.auto import tqdm
        return tqdm(total=self.max_steps, initial=self.progress.step, unit="step",
                    disable=not self.acc.is_main_process, dynamic_ncols=True)

    def close(self) -> None:
        self.bar.close()


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
            f"or use train.precision=bf16 instead of fp16, then resume.")


def resume(config: Config, accelerator, model, optimizer, scheduler) -> tuple[Progress, dict]:
    """Load the checkpoint that checkpoint.resume names; return counters and the loader's
    state (empty for a fresh run)."""
    choice = config.checkpoint.resume
    if choice == "never":
        return Progress(), {}
    path = ckpt.latest_checkpoint(config.run_dir) if choice == "auto" else Path(choice)
    if path is None:
        return Progress(), {}
    meta = ckpt.read_meta(path)
    mismatch = ckpt.shape_mismatch(meta["model"], config.model)
    if mismatch:
        raise PipelineError(
            f"cannot resume from {path}: the model differs from the config ({'; '.join(mismatch)}). "
            f"Use another run name, or checkpoint.resume=never to start over.")
    ckpt.load_checkpoint(path, accelerator=accelerator, model=model, optimizer=optimizer,
                         scheduler=scheduler)
    accelerator.print(f"Resumed from {path} (step {meta['step']}, {meta['tokens']:,} tokens)")
    progress = Progress(meta["step"], meta["tokens"], meta["best_val_loss"], meta["elapsed"])
    return progress, meta["loader"]


def announce(tr: Training, progress: Progress) -> None:
    t, m, acc = tr.config.train, tr.config.model, tr.accelerator
    samples = t.micro_batch_size * t.grad_accum_steps * acc.num_processes
    windows = tr.batches.epoch_samples
    acc.print(
        f"{tr.config.name}: {tr.parameters / 1e6:.2f}M parameters, {acc.num_processes} "
        f"process(es) on {acc.device.type}, precision {t.precision}\n"
        f"global batch = {t.micro_batch_size} micro x {t.grad_accum_steps} accum x "
        f"{acc.num_processes} processes = {samples} sequences x {m.context_length} tokens = "
        f"{samples * m.context_length:,} tokens/step\n"
        f"{len(tr.train_windows):,} train windows; {tr.max_steps} steps "
        f"({tr.max_steps * samples / windows:.2f} epochs)"
        + (f"; resuming at step {progress.step}" if progress.step else ""))


def summary(progress: Progress, log: MetricsLog, started: float) -> dict:
    rows = log.rows()
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), None)  # noqa: E731
    best = progress.best_val_loss
    return {"steps": progress.step, "tokens": progress.tokens,
            "seconds": time.perf_counter() - started,
            "train_loss": last("loss"), "val_loss": last("val_loss"),
            "best_val_loss": None if math.isinf(best) else best}


def print_summary(s: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.0f} s | "
          f"train loss {fmt(s['train_loss'])} | val loss {fmt(s['val_loss'])} | "
          f"best val loss {fmt(s['best_val_loss'])}")


if __name__ == "__main__":
    cli_main(main)()
