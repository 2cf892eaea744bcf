"""Training throughput: tokens/s of one optimizer step, this project's GPT against
transformers' GPT2LMHeadModel of the same shape, precision, biases and tied head.

One step = forward, mean cross-entropy over the 50257-way vocabulary, backward, AdamW.
Contenders (each shape, interleaved in one loop):
  hf/<p>           GPT2LMHeadModel(input_ids, labels, shift_labels=targets).loss, the way
                   a transformers user trains; same AdamW
  hf-fast          the same in the precision below, with AdamW(fused=True) as the Trainer
                   defaults to (optim="adamw_torch_fused"): ours-fast's counterpart
  ours-logits/<p>  our model's logits, then F.cross_entropy (the book's calc_loss_batch)
  ours/<p>         our model's forward(idx, targets=...): the loss without whole logits
  ours-fast        what the train stage runs: the precision `train.precision: auto` picks
                   here (bf16 autocast with bf16 matrix units, else fp32), fused loss and
                   AdamW(fused=True), eager
  ours-best        the same under torch.compile (full run only: compiling costs minutes)
  train stage      pipeline.train's own step (TrainLoop.train_step: the loader, the copy
                   to the device, accumulate, backward, clipping, AdamW, the schedule, the
                   progress bar) with its metrics row written every 5 steps, in ours-fast's
                   precision, on random tokens: what the stage adds to ours-fast
where <p> is fp32 or bf16 (CPU autocast). MFU is against the large-matmul FLOP/s of
fp32 and bf16 measured in the same run. Each ratio also comes as the range of its
per-round ratios (contenders run in turns, so round r of each saw the same moment).
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState

from benchmarks.common import (
    bf16_meaningful,
    interleave,
    machine,
    median,
    print_tables,
    transformers_gpt2,
)
from pipeline.config import ModelConfig
from pipeline.model.gpt import GPTModel, flops_per_token
from pipeline.model.gpt2 import to_hf
from pipeline.training.mfu import measure_matmul_peak

# AdamW as the train stage configures it (pipeline/config/ TrainConfig defaults).
ADAMW = dict(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1)


def gpt(emb_dim, n_layers, n_heads, context_length=256):
    # GPT-2's layout (q/k/v biases, tied head): the only one GPT2LMHeadModel builds
    return ModelConfig(
        vocab_size=50257,
        context_length=context_length,
        emb_dim=emb_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings=True,
    )


@dataclass
class Shape:
    name: str
    cfg: ModelConfig
    batch: int
    repeats: int
    warmup: int = 1
    compile: bool = False
    book_loss: bool = True  # also time ours-logits/<p>


# Enough rounds that a rerun's median ratios fall within the per-round range the table
# shows (5 and 3 did not: a quiet rerun moved 1.87x to 1.50x); the 124M shape's steps
# take seconds each, so fewer rounds there and no ours-logits contenders.
FULL = [
    Shape("4x256 b8", gpt(256, 4, 4), batch=8, repeats=10, compile=True),
    Shape("124M b2", gpt(768, 12, 12), batch=2, repeats=6, compile=True, book_loss=False),
]
QUICK = [Shape("4x256 ctx64 b2", gpt(256, 4, 4, context_length=64), batch=2, repeats=1)]


def precision(name: str):
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_models(cfg: ModelConfig):
    """Our GPT and transformers' GPT-2 holding the same weights."""
    torch.manual_seed(0)
    ours = GPTModel(cfg).train()
    hf = transformers_gpt2(cfg)
    hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=False)
    return ours, hf.train()


def make_step(model, loss_fn, prec: str, **adamw):
    """One optimizer step as a closure; returns the loss of the step."""
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, **adamw)

    def step():
        with precision(prec):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def contenders(ours, hf, x, y, compile: bool = False, book: bool = True) -> dict:
    def hf_loss():
        return hf(input_ids=x, labels=y, shift_labels=y).loss

    def book_loss():
        return F.cross_entropy(ours(x).flatten(0, 1), y.flatten())

    def fused_loss():
        return ours(x, targets=y)

    steps = {}
    for prec in precisions():
        steps[f"hf/{prec}"] = make_step(hf, hf_loss, prec)
        if book:
            steps[f"ours-logits/{prec}"] = make_step(ours, book_loss, prec)
        steps[f"ours/{prec}"] = make_step(ours, fused_loss, prec)
    fast = fast_precision()
    steps["hf-fast"] = make_step(hf, hf_loss, fast, fused=True)
    steps["ours-fast"] = make_step(ours, fused_loss, fast, fused=True)
    if compile:
        compiled = torch.compile(ours)
        steps["ours-best"] = make_step(ours, lambda: compiled(x, targets=y), fast, fused=True)
    return steps


def stage_step(shape: Shape, work: Path):
    """The train stage's own optimizer step as a closure (see the module's docstring)."""
    from benchmarks.data import write_dataset
    from pipeline.config import load_config
    from pipeline.train import TrainLoop, make_accelerator, setup
    from pipeline.training.tracking import MetricsLog

    cfg, ctx = shape.cfg, shape.cfg.context_length
    write_dataset(
        work / "data" / "random", tokens=200 * shape.batch * (ctx + 1), val_tokens=4 * (ctx + 1)
    )
    # None (n_kv_heads, ffn_hidden) is the key's default; "None" on a command line is a string
    model = [
        f"model.{k}={v}"
        for k, v in asdict(cfg).items()
        if k not in ("init_from", "init") and v is not None
    ]
    config = load_config(
        None,
        [
            f"data.root={work / 'data'}",
            "data.name=random",
            f"runs_root={work / 'runs'}",
            "name=stage",
            *model,
            f"train.micro_batch_size={shape.batch}",
            "train.max_steps=100000",
            "train.log_every_steps=5",
            "tracking.log_with=[]",
            f"train.precision={'bf16' if fast_precision() == 'bf16' else 'fp32'}",
            f"train.lr={ADAMW['lr']}",
            f"train.weight_decay={ADAMW['weight_decay']}",
            "train.betas=[0.9, 0.95]",
        ],
    )
    config.run_dir.mkdir(parents=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # one per shape, as in a process
    accelerator, _ = make_accelerator(config)
    loop = TrainLoop(setup(config, accelerator), MetricsLog(config.run_dir))
    calls = itertools.count(1)

    def step():
        loop.train_step()
        if next(calls) % config.train.log_every_steps == 0:
            loop.write_metrics(with_eval=False)

    return step, loop


def fast_precision() -> str:
    """The precision the train stage's `precision: auto` picks on this machine."""
    return "bf16" if "bf16" in precisions() else "fp32"


FAST = (
    "hf-fast",
    "ours-fast",
    "ours-best",
    "train stage",
)  # fused AdamW in the precision auto picks


def contender_precision(name: str) -> str:
    return fast_precision() if name in FAST else name.rsplit("/", 1)[1]


def same_setting_reference(name: str) -> str:
    """The transformers contender with the same precision and AdamW kernel."""
    return "hf-fast" if name in FAST else f"hf/{contender_precision(name)}"


def run_shape(shape: Shape, peaks: dict) -> dict:
    cfg, tokens = shape.cfg, shape.batch * shape.cfg.context_length
    ours, hf = build_models(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    y = torch.randint(0, cfg.vocab_size, (shape.batch, cfg.context_length), generator=g)
    steps = contenders(ours, hf, x, y, compile=shape.compile, book=shape.book_loss)
    # same weights, same loss: a check that the contenders compute the same thing
    first = {name: steps[name]() for name in ("hf/fp32", "ours/fp32")}
    start = time.perf_counter()
    if "ours-best" in steps:
        steps["ours-best"]()  # compiles
    compile_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as work:
        steps["train stage"], loop = stage_step(shape, Path(work))
        try:
            times = interleave(steps, shape.repeats, shape.warmup)
        finally:
            loop.close()
            # Accelerate's state is process-wide: left set, the next Accelerator() built
            # in this process (the evaluate benchmark's) would inherit this precision
            AcceleratorState._reset_state(reset_partial_state=True)
    rows = [row(shape, name, seconds, peaks) for name, seconds in times.items()]
    by_name = {r["contender"]: r for r in rows}
    for r in rows:
        hf_same = by_name[same_setting_reference(r["contender"])]
        r["x_hf_same_precision"] = r["tokens_per_s"] / hf_same["tokens_per_s"]
        r["x_hf_same_precision_best"] = r["tokens_per_s_best"] / hf_same["tokens_per_s_best"]
        rounds = [h / o for h, o in zip(hf_same["seconds"], r["seconds"])]
        r["x_hf_rounds"] = f"{min(rounds):.2f}-{max(rounds):.2f}"
        r["x_hf_fp32"] = r["tokens_per_s"] / by_name["hf/fp32"]["tokens_per_s"]
        r["x_hf_fp32_best"] = r["tokens_per_s_best"] / by_name["hf/fp32"]["tokens_per_s_best"]
    stage, fast = by_name["train stage"], by_name["ours-fast"]
    stage["stage_over_model_step"] = f"{stage['step_s'] / fast['step_s'] - 1:+.0%}"
    return {
        "shape": shape.name,
        "model": asdict(cfg),
        "batch": shape.batch,
        "tokens_per_step": tokens,
        "flops_per_token": flops_per_token(cfg),
        "repeats": shape.repeats,
        "warmup": shape.warmup,
        "compile_s": compile_s if shape.compile else None,
        "first_loss": first,
        "rows": rows,
    }


def row(shape: Shape, name: str, seconds: list[float], peaks: dict) -> dict:
    """Tokens/s from the median step (and from the fastest: the least disturbed), MFU."""
    tokens = shape.batch * shape.cfg.context_length
    prec = contender_precision(name)
    tps = tokens / median(seconds)
    return {
        "shape": shape.name,
        "contender": name,
        "precision": prec,
        "tokens_per_s": tps,
        "tokens_per_s_best": tokens / min(seconds),
        "step_s": median(seconds),
        "seconds": seconds,
        "mfu": tps * flops_per_token(shape.cfg) / peaks[prec],
        "mfu_peak": f"{prec} matmul",
    }


def precisions() -> tuple[str, ...]:
    return ("fp32", "bf16") if bf16_meaningful() else ("fp32",)


def run(quick: bool = False) -> dict:
    # The peak is measured before every shape and the highest taken: a peak measured
    # while other work loads the machine would flatter the MFU of the quieter moments.
    peaks = {name: 0.0 for name in precisions()}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    shapes = []
    for shape in QUICK if quick else FULL:
        for name in peaks:
            peaks[name] = max(peaks[name], measure_matmul_peak(dtypes[name], size=2048))
        shapes.append(run_shape(shape, peaks))
    for shape in shapes:  # MFU against the final (highest) peaks
        for r in shape["rows"]:
            r["mfu"] = r["tokens_per_s"] * shape["flops_per_token"] / peaks[r["precision"]]
    result = {
        "benchmark": "train",
        "quick": quick,
        "machine": machine(),
        "settings": {
            "adamw": ADAMW,
            "dropout": 0.0,
            "qkv_bias": True,
            "tied_head": True,
            "bf16": "torch.autocast('cpu', bfloat16)",
            "ours-fast": f"{fast_precision()} (what precision: auto picks "
            "here), forward(idx, targets), AdamW(fused=True)",
            "ours-best": "ours-fast under torch.compile(model)",
            "hf-fast": "transformers with AdamW(fused=True), the Trainer's "
            "default, in ours-fast's precision",
            "x_hf_same_precision": "against hf/<p>, or hf-fast for the fused-AdamW contenders",
            "tokens_per_s": "from the median step; _best: from the fastest",
            "mfu": "flops_per_token (6N + 12LdT) x tokens/s / the 2048^3 "
            "matmul FLOP/s of the contender's precision",
        },
        "matmul_peak_flops": peaks,
        "shapes": shapes,
    }
    print_tables(tables(result))
    return result


def tables(result: dict) -> list[tuple[str, list[dict], list[str]]]:
    peaks = result["matmul_peak_flops"]
    caption = (
        "training step, tokens/s; matmul peak: "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
        + ("" if "bf16" in peaks else " (no bf16 rows: this CPU has no bf16 matrix units)")
    )
    rows = [r for shape in result["shapes"] for r in shape["rows"]]
    return [
        (
            caption,
            rows,
            [
                "shape",
                "contender",
                "tokens_per_s",
                "step_s",
                "mfu",
                "x_hf_same_precision",
                "x_hf_rounds",
                "x_hf_same_precision_best",
                "x_hf_fp32",
                "stage_over_model_step",
            ],
        )
    ]
