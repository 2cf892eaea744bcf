"""The vocabulary padded for the head's matmuls (`model.vocab_padding`): one training
step (forward, fused head + cross-entropy, backward, fused AdamW) of the same weights with
the head's 50257 rows run as they are (padding 1), padded to 50304 (64, the default:
nanoGPT's size, a multiple of 128 too) and to 50432 (256). The padding changes which
matmul kernels run, not what they compute: the losses are checked equal. Contenders in turns; the gain is each
padded contender's tokens/s over the unpadded one's, with its per-round range.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import torch

from benchmarks.common import bf16_meaningful, interleave, machine, median, print_tables
from benchmarks.train import ADAMW, Shape, gpt, precision
from pipeline.model.gpt import GPTModel

PADDINGS = (1, 64, 256)
FULL = [
    Shape("4x256 b8", gpt(256, 4, 4), batch=8, repeats=10),
    Shape("124M b2", gpt(768, 12, 12), batch=2, repeats=6),
]
QUICK = [Shape("4x256 ctx64 b2", gpt(256, 4, 4, context_length=64), batch=2, repeats=1)]


def padded_views(model: GPTModel) -> dict[int, GPTModel]:
    """The model once per padding, sharing its parameters (a shallow copy with its own
    config): every contender trains the same tensors."""
    views = {}
    for pad in PADDINGS:
        view = copy.copy(model)
        view.cfg = replace(model.cfg, vocab_padding=pad)
        views[pad] = view
    return views


def run_shape(shape: Shape, prec: str) -> dict:
    cfg = shape.cfg
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    y = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    views = padded_views(model)
    with torch.no_grad(), precision(prec):  # same weights, same loss
        losses = {pad: view(x, targets=y).item() for pad, view in views.items()}
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=True)

    def step(view):
        def one():
            with precision(prec):
                loss = view(x, targets=y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return one

    times = interleave({pad: step(v) for pad, v in views.items()}, shape.repeats, shape.warmup)
    tokens = shape.batch * cfg.context_length
    base = times[1]
    rows = []
    for pad, seconds in times.items():
        rounds = [b / s for b, s in zip(base, seconds)]
        rows.append(
            {
                "shape": shape.name,
                "precision": prec,
                "vocab_padding": pad,
                "head_rows": -(-cfg.vocab_size // pad) * pad,
                "tokens_per_s": tokens / median(seconds),
                "step_s": median(seconds),
                "x_unpadded": median(base) / median(seconds),
                "x_unpadded_rounds": f"{min(rounds):.2f}-{max(rounds):.2f}",
                "seconds": seconds,
                "first_loss": losses[pad],
            }
        )
    return {"shape": shape.name, "model": asdict(cfg), "precision": prec, "rows": rows}


def run(quick: bool = False) -> dict:
    precisions = ("fp32", "bf16") if bf16_meaningful() else ("fp32",)
    shapes = [run_shape(s, p) for s in (QUICK if quick else FULL) for p in precisions]
    for shape in shapes:
        first = [r["first_loss"] for r in shape["rows"]]
        assert max(first) - min(first) < 1e-3, f"padding changed the loss: {first}"
    result = {
        "benchmark": "vocab-padding",
        "quick": quick,
        "machine": machine(),
        "settings": {"adamw": {**ADAMW, "fused": True}, "paddings": PADDINGS},
        "shapes": shapes,
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    rows = [r for shape in result["shapes"] for r in shape["rows"]]
    columns = ["shape", "precision", "vocab_padding", "head_rows", "tokens_per_s"]
    columns += ["step_s", "x_unpadded", "x_unpadded_rounds"]
    return [("training step with the head's vocabulary padded, tokens/s", rows, columns)]
