"""The optimizer (AdamW, or Muon for the blocks' matrices with AdamW for the rest) and
the warmup + cosine schedule.

Knows the train config and a model's parameters; knows nothing about devices beyond
choosing the fused AdamW kernel and Muon's orthogonalization dtype.
"""

from __future__ import annotations

import math

import torch

from pipeline.training.config import TrainConfig
from pipeline.training.muon import Muon, Optimizers, fast_orthogonalize_dtype

HIDDEN_PREFIX = "trf_blocks."  # GPTModel's transformer blocks: Muon's matrices


def build_optimizer(model: torch.nn.Module, train: TrainConfig, device_type: str):
    """train.optimizer: adamw (everything) or muon (hidden matrices; AdamW for the rest)."""
    if train.optimizer == "muon":
        return build_muon(model, train, device_type)
    return build_adamw(list(model.parameters()), train, device_type)


def build_muon(model: torch.nn.Module, train: TrainConfig, device_type: str):
    """Muon for the 2-D weights inside the transformer blocks (attention and MLP
    matrices), AdamW for the token and position tables, the head, biases and norms: the
    split of Muon's authors. One optimizer to the loop, Accelerate and checkpoints."""
    hidden = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.startswith(HIDDEN_PREFIX)
    ]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    muon = Muon(
        [{"params": hidden, "weight_decay": train.weight_decay}],
        lr=train.lr,
        weight_decay=train.weight_decay,
        orthogonalize_dtype=fast_orthogonalize_dtype(device_type),
    )
    return Optimizers([build_adamw(rest, train, device_type), muon])


def build_adamw(params: list, train: TrainConfig, device_type: str):
    """AdamW; matrices (linear weights and both embedding tables) decay, while biases and
    LayerNorm weights do not: shrinking them toward zero only fights the normalisation.
    With `weight_decay_on: all` every parameter decays, as the book's
    AdamW(model.parameters(), weight_decay=0.1). A tied head shares its tensor with the
    token table and is counted once."""
    decay, no_decay = [], []
    for param in params:  # .parameters() already yields shared tensors once
        if param.requires_grad:
            decays = param.dim() >= 2 or train.weight_decay_on == "all"
            (decay if decays else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}]
    if no_decay:  # one group, as the book's optimizer has, when everything decays
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # The fused kernel updates every tensor in one pass: on GPU one launch instead of
    # many; on CPU it measured 0.04 s a step against 0.27 s for torch's default (the
    # 4-layer benchmark shape, benchmarks/train.py), with the same results to 1e-7.
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=fused)


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float,
    schedule: str = "cosine",
    start_ratio: float | None = None,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based).

    Warmup: linear over `warmup_steps`, from `start_ratio` at step 0 to 1 at the end of
    warmup (the book's appendix D), or, with no start_ratio, from 1/warmup_steps to 1 at
    its last step (nanoGPT). Then `schedule`: cosine down to `min_ratio` at `max_steps`
    (GPT-2 reproductions); constant; or wsd, warmup-stable-decay: 1 until the last
    `decay_fraction` of the steps, which fall to `min_ratio` linearly or as 1 - sqrt
    (MiniCPM, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"). A wsd run can be lengthened from its stable phase: resumed with a larger
    max_steps, its decay simply starts later."""
    if step < warmup_steps:
        if start_ratio is None:
            return (step + 1) / warmup_steps
        return start_ratio + step * (1.0 - start_ratio) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * max_steps))
        progress = min(1.0, max(0.0, (step - (max_steps - decay_steps)) / decay_steps))
        fallen = progress if decay_shape == "linear" else math.sqrt(progress)
        return min_ratio + (1.0 - min_ratio) * (1.0 - fallen)
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train: TrainConfig, max_steps: int):
    """A LambdaLR stepped once per optimizer step by the loop (never prepare()d, so it
    does not advance once per process)."""
    min_lr = train.min_lr if train.min_lr is not None else train.lr / 10
    start = None if train.warmup_start_lr is None else train.warmup_start_lr / train.lr

    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=train.warmup_steps,
            max_steps=max_steps,
            min_ratio=min_lr / train.lr,
            schedule=train.schedule,
            start_ratio=start,
            decay_fraction=train.decay_fraction,
            decay_shape=train.decay_shape,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clips_at(step: int, train: TrainConfig) -> bool:
    """Whether the gradient is clipped at optimizer step `step` (0-based): always with
    train.grad_clip set, or only from the end of warmup with grad_clip_after_warmup (the
    book's appendix D: `if global_step >= warmup_steps`)."""
    if train.grad_clip is None:
        return False
    return not train.grad_clip_after_warmup or step >= train.warmup_steps


def total_steps(
    train: TrainConfig, windows: int, samples_per_step: int, tokens_per_step: int
) -> int:
    """Optimizer steps of the run: max_steps, else max_tokens, else epochs (default 1)."""
    if train.max_steps is not None:
        return train.max_steps
    if train.max_tokens is not None:
        return max(1, math.ceil(train.max_tokens / tokens_per_step))
    epochs = train.epochs if train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * windows / samples_per_step))
