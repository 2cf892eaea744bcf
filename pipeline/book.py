"""The book's chapter 5 run as printed, and a run of `configs/verdict.yaml` beside it;
appendix D's `train_model` as printed, and a run of `configs/appendix-d.yaml` beside it.

    python -m pipeline.book --config configs/verdict.yaml [key=value ...]
    make book                 # chapter 5
    make book-appendix-d      # appendix D

Prints the book's `train_model_simple` table ("Ep 1 (Step 000000): Train loss 9.781, Val
loss 9.933", ...) next to the run's evaluations with the difference of each, the run's
last greedy sample beside the book's, and the book's section 5.3 on the trained model:
`generate` with top_k=25 and temperature=1.4 after torch.manual_seed(123). Draws figure
5.12 (train and val loss against tokens seen, the book's curves dashed) into
`runs/<name>/book.png`.

The book's "Step N" is its 0-based global_step, counted after the update, so it is our
step N+1 (our steps count updates done); appendix D's "Iter N" is the same count.
Which printed run a config is held against follows from its recipe: a warmup (appendix
D's) or none (chapter 5's).

Knows the book's printed numbers and the run directory's metrics; nothing of training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core import log
from pipeline.core.errors import PipelineError, cli_main
from pipeline.keys import add_config_arguments, parse_stage_args

# Chapter 5, section 5.2, as printed: (global_step, train loss, val loss) of
# train_model_simple on "The Verdict" (GPT_CONFIG_124M at context 256, seed 123, AdamW
# lr 4e-4, weight decay 0.1, batch 2, 10 epochs, eval_freq 5, eval_iter 5). The book's
# own code (the llms-from-scratch package) prints the same numbers on a CPU here.
BOOK_TABLE = [
    (0, 9.781, 9.933),
    (5, 8.111, 8.339),
    (10, 6.661, 7.048),
    (15, 5.961, 6.616),
    (20, 5.726, 6.600),
    (25, 5.201, 6.348),
    (30, 4.417, 6.278),
    (35, 4.069, 6.226),
    (40, 3.732, 6.160),
    (45, 2.850, 6.179),
    (50, 2.427, 6.141),
    (55, 2.104, 6.134),
    (60, 1.882, 6.233),
    (65, 1.320, 6.238),
    (70, 0.985, 6.242),
    (75, 0.717, 6.293),
    (80, 0.541, 6.393),
    (85, 0.391, 6.452),
]
BOOK_TOKENS_PER_STEP = 512  # 2 sequences x 256 tokens
# The greedy sample generate_and_print_sample prints after the last epoch (update 90),
# newlines shown as the book shows them (replaced by spaces).
BOOK_LAST_SAMPLE = (
    'Every effort moves you know," was one of the axioms he laid down across the '
    "Sevres and silver of an exquisitely appointed luncheon-table, when, on a later "
    "day, I had again run over from Monte Carlo; and Mrs. Gis"
)
# Section 5.3: torch.manual_seed(123), then 15 tokens with top_k=25, temperature=1.4.
BOOK_TOPK_SAMPLE = (
    "Every effort moves you stand to work on surprise, a one of us had gone with random-"
)
FIGURE = "book.png"

# Appendix D, section D.4, as printed (peak_lr 0.001, warmup over 20% of the steps from
# initial_lr 1e-5, cosine to min_lr 1e-5, clipping after warmup, eval_freq 5, eval_iter
# 1, 15 epochs; "about 5 minutes on a MacBook Air"): the lines the book shows, and the
# last line of the appendix's notebook as committed, a run of its own on an Apple GPU.
APPENDIX_D_TABLE = [
    (0, 10.934, 10.939),
    (5, 9.151, 9.461),
    (10, 7.949, 8.184),
    (15, 6.362, 6.876),
    (130, 0.041, 6.915),
]
APPENDIX_D_NOTEBOOK_LAST = (130, 1.312, 6.158)
APPENDIX_D_LAST_SAMPLE = (
    'Every effort moves you?"  "Yes--quite insensible to the irony. She wanted him '
    'vindicated--and by me!"  He laughed again, and threw back his head to look up at the '
    'sketch of the donkey. "There were days when I'
)


@dataclass(frozen=True)
class PrintedRun:
    """A run the book prints: its evaluations (global_step, train, val) and last sample."""

    title: str
    table: list  # (book step, train loss, val loss, where it is printed)
    last_sample: str
    topk_sample: str | None  # section 5.3's, for chapter 5 only


CHAPTER_5 = PrintedRun(
    "chapter 5, train_model_simple",
    [(step, train, val, "book") for step, train, val in BOOK_TABLE],
    BOOK_LAST_SAMPLE,
    BOOK_TOPK_SAMPLE,
)
APPENDIX_D = PrintedRun(
    "appendix D, train_model",
    [(step, train, val, "book") for step, train, val in APPENDIX_D_TABLE]
    + [(*APPENDIX_D_NOTEBOOK_LAST, "notebook")],
    APPENDIX_D_LAST_SAMPLE,
    None,
)


def printed_run(config) -> PrintedRun:
    """Appendix D's run for a recipe with a warmup (chapter 5's has none)."""
    return APPENDIX_D if config.train.warmup_steps > 0 else CHAPTER_5


def evaluations(run_dir: Path) -> list[dict]:
    """The run's evaluation rows (those with a val loss), oldest first."""
    from pipeline.training.tracking import MetricsLog

    rows = [r for r in MetricsLog(run_dir).rows() if "val_loss" in r]
    if not rows:
        raise PipelineError(
            f"{run_dir} has no evaluations yet: train it first "
            f"(make train CONFIG=configs/verdict.yaml)"
        )
    return rows


def table(rows: list[dict], printed: PrintedRun = CHAPTER_5) -> list[str]:
    """Our evaluations beside the book's, matched by step (ours = the book's + 1)."""
    ours = {r["step"]: r for r in rows}
    lines = [
        f"{'book step':>10} {'our step':>8} | {'train: book':>11} {'ours':>7} {'diff':>7} | "
        f"{'val: book':>9} {'ours':>7} {'diff':>7}"
    ]
    for step, train, val, where in printed.table:
        row = ours.get(step + 1)
        note = "" if where == "book" else f"  ({where})"
        if row is None:
            lines.append(
                f"{step:>10} {step + 1:>8} | {train:>11.3f} {'-':>7} {'':>7} | {val:>9.3f} "
                f"{'-':>7}{note}"
            )
            continue
        lines.append(
            f"{step:>10} {step + 1:>8} | {train:>11.3f} {row['train_loss']:>7.3f} "
            f"{row['train_loss'] - train:>+7.3f} | {val:>9.3f} {row['val_loss']:>7.3f} "
            f"{row['val_loss'] - val:>+7.3f}{note}"
        )
    return lines


def plot(rows: list[dict], path: Path, printed: PrintedRun = CHAPTER_5) -> None:
    """Figure 5.12: train and val loss against tokens seen, ours solid, the book's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.fileio import atomic_open

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["train_loss"] for r in rows], label="Training loss")
    ax.plot(tokens, [r["val_loss"] for r in rows], linestyle="-.", label="Validation loss")
    book = [r for r in printed.table if r[3] == "book"]
    book_tokens = [(s + 1) * BOOK_TOKENS_PER_STEP for s, *_ in book]
    ax.plot(book_tokens, [r[1] for r in book], "k:", alpha=0.6, label="book: training")
    ax.plot(book_tokens, [r[2] for r in book], "k--", alpha=0.6, label="book: validation")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def topk_sample(run_dir: Path) -> str:
    """The book's section 5.3 on the run's latest checkpoint: seed 123, top_k=25,
    temperature=1.4, 15 new tokens, drawn from torch's global generator as the book does."""
    from pipeline.generate import text_sample
    from pipeline.model.weights import load_model

    model, _ = load_model(run_dir)
    torch.manual_seed(123)
    return text_sample(
        model, "Every effort moves you", max_new_tokens=15, temperature=1.4, top_k=25
    )


@cli_main
def main(argv: list[str] | None = None) -> None:
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.book", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser, "configs/verdict.yaml", "the run's experiment YAML")
    args = parse_stage_args(parser, argv)
    config = load_config(args.config, args.overrides)
    run_dir, printed = config.run_dir, printed_run(config)
    rows = evaluations(run_dir)
    log.info(f"{printed.title}, as printed, beside {run_dir}:\n" + "\n".join(table(rows, printed)))
    plot(rows, run_dir / FIGURE, printed)
    log.info(f"\nfigure (as the book's 5.12): {run_dir / FIGURE}")
    ours = rows[-1].get("sample", "").replace("\n", " ")
    log.info(
        f"\nsample at step {rows[-1]['step']} (the book's: after the last epoch):\n"
        f"  ours: {ours!r}\n  book: {printed.last_sample[len('Every effort moves you') :]!r}"
    )
    if printed.topk_sample:
        log.info(
            f"\nsection 5.3, top_k=25, temperature=1.4, seed 123:\n"
            f"  ours: {topk_sample(run_dir)!r}\n  book: {printed.topk_sample!r}"
        )


if __name__ == "__main__":
    main()
