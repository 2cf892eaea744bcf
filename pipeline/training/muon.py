"""Muon for the transformer blocks' weight matrices, AdamW for everything else, presented
to the train loop, Accelerate and the checkpoint code as one torch optimizer.

Muon (Keller Jordan, 2024): SGD momentum whose update, for a 2-D weight, is replaced by
the nearest semi-orthogonal matrix (every singular value ~1), found with a few
Newton-Schulz iterations. Embeddings, the output head, biases and LayerNorm weights are
not hidden matrices of that kind and keep AdamW.

Written here rather than taken from torch.optim.Muon because torch's orthogonalizes in
bf16 always, and on a CPU without bf16 matrix units (most laptops; capability AVX2)
bf16 matmuls are ~40x slower than fp32: the tiny model's step went from 0.68 s to 1.6 s.
This one orthogonalizes in bf16 where bf16 is fast and in fp32 elsewhere.
"""

from __future__ import annotations

import math

import torch

# The quintic iteration's coefficients (Keller Jordan's Muon): chosen to push small
# singular values up fast, converging to ~[0.7, 1.2] rather than exactly 1, which
# trains as well as the exact orthogonal factor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95


def orthogonalize(update: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximately U V^T of update = U S V^T, by `steps` Newton-Schulz iterations in
    `dtype`; returned in update's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    wide = x.size(0) <= x.size(1)
    if not wide:  # iterate on the side whose Gram matrix is the smaller
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # every singular value <= 1: the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(update.dtype)


def fast_orthogonalize_dtype(device_type: str) -> str:
    """bfloat16 where its matmuls are fast (a GPU with bf16, a CPU with bf16 units),
    else float32. A name, not a torch.dtype: it is saved in checkpoints' param groups."""
    from pipeline.training.precision import cpu_bf16_flags, gpu_has_bf16

    if device_type == "cuda" and gpu_has_bf16():
        return "bfloat16"
    if device_type == "cpu" and cpu_bf16_flags():
        return "bfloat16"
    return "float32"


def _evaluate(closure):
    """torch's optimizer protocol: step(closure) re-evaluates the loss with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. The learning rate is scaled per matrix by
    0.2 * sqrt(max(rows, cols)), which gives the update the RMS of an AdamW update (Liu et
    al., "Muon is Scalable for LLM Training", 2025): AdamW's lr and weight decay carry over."""

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float,
        momentum: float = MOMENTUM,
        orthogonalize_dtype: str = "float32",
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            orthogonalize_dtype=orthogonalize_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon updates 2-D matrices only, got a {p.dim()}-D "
                        f"parameter of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                nesterov = p.grad.lerp(buf, momentum)
                update = orthogonalize(nesterov, getattr(torch, group["orthogonalize_dtype"]))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


class Optimizers(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters as one: their param groups in order,
    one state shared by all (keyed by parameter), so torch's state_dict format, LR
    schedulers, Accelerate's wrapper, gradient scaling and the distributed checkpoint
    API see an ordinary optimizer."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts
        super().__init__([g for part in parts for g in part.param_groups], {})
        self._relink()

    def _relink(self) -> None:
        """Point every part at this optimizer's groups and state (after a load replaced them)."""
        start = 0
        for part in self.parts:
            part.param_groups = self.param_groups[start : start + len(part.param_groups)]
            part.state = self.state
            start += len(part.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._relink()
