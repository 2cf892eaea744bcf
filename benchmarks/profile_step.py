"""Where one training step's time goes: torch.profiler (CPU) over one optimizer step of
transformers' GPT-2 and of ours, the self time of every op put in one bucket:

  head matmul        matmuls with the 50257-way vocabulary in a shape (forward, backward)
  block matmuls      every other matmul (q/k/v, projections, MLP)
  softmax + CE       log-softmax, NLL and their backward; our fused loss's elementwise work
  attention          scaled_dot_product_attention, forward and backward
  optimizer          everything under Optimizer.step
  other              layer norms, GELU, embeddings, residual adds, autograd bookkeeping
Both shapes of benchmarks.train: the 4x256 model and GPT-2 124M.
Knows nothing of how the step is built (benchmarks.train does that).
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import train
from benchmarks.common import machine, print_tables

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
LOSS_MARKS = (
    "log_softmax",
    "nll_loss",
    "cross_entropy",
    "LogSoftmax",
    "NllLoss",
    "_HeadCrossEntropy",
)
BUCKETS = ["head matmul", "block matmuls", "softmax + CE", "attention", "optimizer", "other"]


def bucket(event, vocab: int) -> str:
    names, parent = [], event
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    chain = " ".join(names)
    if "Optimizer.step" in chain:
        return "optimizer"
    if event.name in MATMULS:
        shapes = str(event.input_shapes)
        return "head matmul" if str(vocab) in shapes else "block matmuls"
    if "scaled_dot_product" in chain or "ScaledDotProduct" in chain:
        return "attention"
    if any(mark in chain for mark in LOSS_MARKS):
        return "softmax + CE"
    return "other"


def profile_step(step, vocab: int) -> dict:
    """Seconds of self CPU time per bucket over one call of `step` (after two warm-ups:
    the first steps of a fresh optimizer are slow while its state's pages are touched)."""
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    seconds = dict.fromkeys(BUCKETS, 0.0)
    for event in prof.events():
        seconds[bucket(event, vocab)] += event.self_cpu_time_total / 1e6
    return seconds


def run(quick: bool = False) -> dict:
    shapes = [train.QUICK[0]] if quick else train.FULL
    result = {
        "benchmark": "profile_step",
        "quick": quick,
        "machine": machine(),
        "buckets": BUCKETS,
        "shapes": [profile_shape(shape, quick) for shape in shapes],
        "note": "self CPU time under torch.profiler, which adds overhead per op; "
        "shares, not speeds, are the point",
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    return [
        (
            f"share of one step's profiled CPU time (total in seconds), {shape['shape']}",
            shape["rows"],
            ["contender", "total_s", *result["buckets"]],
        )
        for shape in result["shapes"]
    ]


def profile_shape(shape, quick: bool) -> dict:
    cfg = shape.cfg
    ours, hf = train.build_models(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    y = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    steps = train.contenders(ours, hf, x, y, book=shape.book_loss)
    wanted = (
        ["hf/fp32", "ours/fp32", "ours-fast"]
        if quick
        else ["hf/fp32", "ours-logits/fp32", "ours/fp32", "hf/bf16", "ours/bf16", "ours-fast"]
    )
    rows = []
    # contenders() leaves out the bf16 ones where bf16 is not meaningful (no bf16 units)
    for name in [n for n in wanted if n in steps]:
        seconds = profile_step(steps[name], cfg.vocab_size)
        total = sum(seconds.values())
        rows.append(
            {
                "contender": name,
                "total_s": total,
                **{b: seconds[b] / total for b in BUCKETS},
                "seconds": seconds,
            }
        )
    return {"shape": shape.name, "batch": shape.batch, "model": cfg.__dict__, "rows": rows}
