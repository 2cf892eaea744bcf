"""The contender of the time-to-loss benchmark: what a transformers user writes after the
`run_clm` example. Hugging Face's `Trainer` trains `GPT2LMHeadModel` (its own GPT-2 init)
on the windows our prepare stage wrote for a pipeline config, with that config's batch,
AdamW, warmup + cosine-to-min_lr schedule, gradient clipping and precision, and evaluates
on the same val windows as our train stage does. Run as a script, so that it starts as
fresh as our train stage does:

    python -m benchmarks.hf_trainer --config configs/tiny.yaml --out /tmp/hf.json [key=value ...]

It writes {"evaluations": [{"step", "train_s", "val_loss"}], ...} to --out, where
train_s is the wall time since training began minus the time spent evaluating: the same
clock as our train stage's metrics (step_time excludes evaluation).

Both sides predict the same tokens: the labels are our targets (the window shifted by one)
passed as `shift_labels`, so the loss covers all context_length positions of a window
(with `labels=input_ids` GPT-2 would score one fewer per window).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.core.errors import cli_main


class Windows(torch.utils.data.Dataset):
    """Our prepared windows as the dict rows a Trainer collates."""

    def __init__(self, windows, indices=None):
        """`indices`: the windows to serve, in order (None: all of them)."""
        self.windows = windows
        self.indices = range(len(windows)) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        x, y = self.windows.batch([self.indices[i]])
        return {"input_ids": x[0], "labels": y[0], "shift_labels": y[0]}


def estimate_windows(config, count: int):
    """The val windows our train stage estimates the loss on (one process): eval.batches
    micro batches spread over the split's `count` windows, the first ones for the book's
    order (pipeline/train.py)."""
    from pipeline.data.loader import spread_windows

    wanted = config.eval.batches * config.train.micro_batch_size
    if config.train.order == "book":
        return range(min(wanted, count))
    return spread_windows(count, wanted)


def trainer_callback(evaluations: list):
    """A TrainerCallback that records (step, training seconds, val loss) at each
    evaluation, the evaluation's own time subtracted."""
    from transformers import TrainerCallback

    class EvaluationClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.evaluating = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            now = time.perf_counter()
            train_s = self.step_end - self.start - self.evaluating
            self.evaluating += now - self.step_end
            evaluations.append(
                {"step": state.global_step, "train_s": train_s, "val_loss": metrics["eval_loss"]}
            )

    return EvaluationClock()


def training_arguments(config, out_dir: str, precision: str):
    from transformers import TrainingArguments

    t, e = config.train, config.eval
    return TrainingArguments(
        output_dir=out_dir,
        max_steps=t.max_steps,
        seed=config.seed,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        max_grad_norm=t.grad_clip or 0.0,
        lr_scheduler_type="cosine_with_min_lr",
        warmup_steps=t.warmup_steps,
        lr_scheduler_kwargs={"min_lr": t.min_lr if t.min_lr is not None else t.lr / 10},
        eval_strategy="steps",
        eval_steps=e.every_steps,
        prediction_loss_only=True,
        logging_steps=t.log_every_steps,
        save_strategy="no",
        report_to=[],
        # shift_labels is not a named argument of GPT2LMHeadModel.forward, so the
        # Trainer's default column pruning would drop it and GPT-2 would shift our
        # targets once more: it would learn the token after next
        remove_unused_columns=False,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def gpt2_model(config):
    from benchmarks.common import transformers_gpt2

    torch.manual_seed(config.seed)
    return transformers_gpt2(config.model)


@cli_main
def main(argv=None) -> None:
    from transformers import Trainer

    from pipeline.config import load_config
    from pipeline.core.fileio import atomic_write_json
    from pipeline.data.loader import TokenWindows
    from pipeline.training.precision import resolve

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hf_trainer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="JSON file of the evaluations")
    parser.add_argument(
        "--work-dir", default=None, help="Trainer's output_dir (default: next to --out)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    ctx = config.model.context_length
    train = Windows(TokenWindows(config.data_dir, "train", ctx, config.train.stride))
    val_windows = TokenWindows(config.data_dir, "val", ctx)
    val = Windows(val_windows, estimate_windows(config, len(val_windows)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = resolve(config.train.precision, device)
    print(f"precision: {precision} ({why})", flush=True)
    evaluations: list = []
    work_dir = args.work_dir or f"{args.out}.trainer"
    trainer = Trainer(
        model=gpt2_model(config),
        args=training_arguments(config, work_dir, precision),
        train_dataset=train,
        eval_dataset=val,
        callbacks=[trainer_callback(evaluations)],
    )
    trainer.train()
    atomic_write_json(
        args.out,
        {"contender": "transformers Trainer", "precision": precision, "evaluations": evaluations},
    )


if __name__ == "__main__":
    main()
