"""The book's chapter 5 run as printed, and a run of `configs/verdict.yaml` beside it.

    python -m pipeline.book --config configs/verdict.yaml [key=value ...]
    make book

Prints the book's `train_model_simple` table ("Ep 1 (Step 000000): Train loss 9.781, Val
loss 9.933", ...) next to the run's evaluations with the difference of each, the run's
last greedy sample beside the book's, and the book's section 5.3 on the trained model:
`generate` with top_k=25 and temperature=1.4 after torch.manual_seed(123). Draws figure
5.12 (train and val loss against tokens seen, the book's curves dashed) into
`runs/<name>/book.png`.

The book's "Step N" is its 0-based global_step, counted after the update, so it is our
step N+1 (our steps count updates done).

Knows the book's printed numbers and the run directory's metrics; nothing of training.
"""

from __future__ import annotations

import argparse
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


def table(rows: list[dict]) -> list[str]:
    """Our evaluations beside the book's, matched by step (ours = the book's + 1)."""
    ours = {r["step"]: r for r in rows}
    lines = [
        f"{'book step':>10} {'our step':>8} | {'train: book':>11} {'ours':>7} {'diff':>7} | "
        f"{'val: book':>9} {'ours':>7} {'diff':>7}"
    ]
    for step, train, val in BOOK_TABLE:
        row = ours.get(step + 1)
        if row is None:
            lines.append(
                f"{step:>10} {step + 1:>8} | {train:>11.3f} {'-':>7} {'':>7} | {val:>9.3f} {'-':>7}"
            )
            continue
        lines.append(
            f"{step:>10} {step + 1:>8} | {train:>11.3f} {row['train_loss']:>7.3f} "
            f"{row['train_loss'] - train:>+7.3f} | {val:>9.3f} {row['val_loss']:>7.3f} "
            f"{row['val_loss'] - val:>+7.3f}"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Figure 5.12: train and val loss against tokens seen, ours solid, the book's dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.fileio import atomic_open

    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["train_loss"] for r in rows], label="Training loss")
    ax.plot(tokens, [r["val_loss"] for r in rows], linestyle="-.", label="Validation loss")
    book_tokens = [(s + 1) * BOOK_TOKENS_PER_STEP for s, _, _ in BOOK_TABLE]
    ax.plot(book_tokens, [t for _, t, _ in BOOK_TABLE], "k:", alpha=0.6, label="book: training")
    ax.plot(book_tokens, [v for _, _, v in BOOK_TABLE], "k--", alpha=0.6, label="book: validation")
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
    run_dir = load_config(args.config, args.overrides).run_dir
    rows = evaluations(run_dir)
    log.info("\n".join(table(rows)))
    plot(rows, run_dir / FIGURE)
    log.info(f"\nfigure 5.12: {run_dir / FIGURE}")
    ours = rows[-1].get("sample", "").replace("\n", " ")
    log.info(
        f"\ngreedy sample at step {rows[-1]['step']} (the book's: after the last epoch):\n"
        f"  ours: {ours!r}\n  book: {BOOK_LAST_SAMPLE[len('Every effort moves you') :]!r}"
    )
    log.info(
        f"\nsection 5.3, top_k=25, temperature=1.4, seed 123:\n"
        f"  ours: {topk_sample(run_dir)!r}\n  book: {BOOK_TOPK_SAMPLE!r}"
    )


if __name__ == "__main__":
    main()
