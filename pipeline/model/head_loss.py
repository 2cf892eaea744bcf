"""The model's head and its loss in one hand-written autograd kernel: the mean
cross-entropy of `h @ weight.T` against the targets, a block of rows at a time, so the
(tokens x vocab) logits never exist whole and the head's backward matmuls run while each
block is at hand.

Knows nothing of the GPT around it: any final hidden states and any output matrix.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target that counts for nothing (F.cross_entropy's default)


def head_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = 512,
    pad_to: int = 1,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` against `targets`, without them.

    The softmax over the vocabulary in fp32 costs more than the head's matmul at small
    widths, mostly in memory traffic over (tokens x vocab) floats written and read
    several times. Here each block of `chunk_rows` rows becomes its loss and its
    gradient (softmax - one_hot) at once, in one reused buffer, and the matmuls of the
    backward pass run right then; backward only scales the kept gradients. Under
    autocast the matmuls take the autocast dtype and the softmax fp32, as autocast
    does for `F.cross_entropy` of a Linear's output.

    `pad_to`: the matmuls run on the vocabulary padded with zero rows to a multiple of
    it (50257 -> 50304 for 64), which matmul kernels tile better; the padded columns
    are left out of the softmax, so the loss and gradients are those of the unpadded
    head, and the weight's gradient has the weight's own rows.
    """
    dtype = weight.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    if not torch.is_grad_enabled():  # evaluation: autograd would still ask for gradients
        h, weight = h.detach(), weight.detach()
    with torch.autocast(h.device.type, enabled=False):
        return _HeadCrossEntropy.apply(
            h.flatten(0, -2), weight, targets.flatten(), dtype, chunk_rows, pad_to
        )


class _HeadCrossEntropy(torch.autograd.Function):
    # Every (rows x vocab) or (vocab x width) block lives in a buffer allocated once per
    # call: fresh allocations that large are fresh pages from the OS, and filling them
    # costs as much as the arithmetic on a CPU.
    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk_rows, pad_to):
        n, rows = h.shape[0], min(chunk_rows, h.shape[0])
        vocab = weight.shape[0]
        w = padded_rows(weight, dtype, pad_to)
        valid = targets != IGNORE_INDEX
        count = valid.sum()  # 0 gives nan, as F.cross_entropy does
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if want_h else None
        # the first block writes grad_w and the others add to it: no pass to zero 154 MB
        # (GPT-2's head) first
        grad_w = torch.empty(w.shape, dtype=torch.float32, device=h.device) if want_w else None
        if want_w and n == 0:
            grad_w.zero_()
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        block = torch.empty(rows, w.shape[0], dtype=dtype, device=h.device)
        block32 = block if dtype == torch.float32 else torch.empty(rows, vocab, device=h.device)
        low = dtype != torch.float32 and want_w  # bf16 weight gradients, added up in fp32
        part_w = torch.empty_like(w) if low else None
        part_w32 = torch.empty_like(grad_w) if low else None
        for start in range(0, n, rows):
            end = min(start + rows, n)
            hc, m = h[start:end].to(dtype), end - start
            # the padded columns are h @ 0 = 0 and stay 0: the softmax reads the vocabulary's
            # own columns, and the gradient's padded columns add nothing below
            logits = torch.mm(hc, w.t(), out=block[:m])[:, :vocab]
            logits = logits if block32 is block else block32[:m].copy_(logits)
            keep = valid[start:end].unsqueeze(1).float()
            tgt = targets[start:end].clamp(min=0).unsqueeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            target_logit = logits.gather(1, tgt)
            probs = logits.sub_(peak).exp_()
            norm = probs.sum(dim=1, keepdim=True)
            total += ((peak + norm.log() - target_logit) * keep).sum()
            if not (want_h or want_w):
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot) / count, for kept rows. Kept
            # here without the 1/count, in [-1, 1]: in fp16, (softmax - one_hot) / count
            # for thousands of tokens is mostly below the smallest subnormal and became 0
            # before the loss scale could reach it. Backward applies 1/count and the
            # incoming gradient (the loss scale) in fp32.
            grad = probs.mul_(keep / norm).scatter_add_(1, tgt, -keep)
            if block32 is not block:
                block[:m, :vocab].copy_(grad)
            grad = block[:m]
            if want_h:
                grad_h[start:end] = torch.mm(grad, w)
            if want_w and not low:
                if start == 0:
                    torch.mm(grad.t(), hc, out=grad_w)
                else:
                    grad_w.addmm_(grad.t(), hc)
            elif want_w:
                part = torch.mm(grad.t(), hc, out=part_w)
                if start == 0:
                    grad_w.copy_(part)
                else:
                    grad_w += part_w32.copy_(part)
        # Kept on ctx, not saved for backward: backward scales them in place and hands
        # them over, and autograd then keeps grad_w as the weight's .grad without a copy.
        ctx.grads = (grad_h, grad_w[:vocab] if want_w else None)
        ctx.count = count
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "head_cross_entropy's gradients were already handed over: a "
                "second backward through it (retain_graph=True) is not supported"
            )
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        scale = grad_loss.float() / ctx.count  # the mean's 1/count, and the loss scale
        grad_h = grad_h.mul_(scale) if grad_h is not None else None
        grad_w = grad_w.mul_(scale).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def padded_rows(weight: torch.Tensor, dtype: torch.dtype, pad_to: int) -> torch.Tensor:
    """`weight` in `dtype`, with zero rows added up to a multiple of `pad_to` rows."""
    rows = -(-weight.shape[0] // pad_to) * pad_to
    if rows == weight.shape[0]:
        return weight.to(dtype)
    w = torch.zeros(rows, weight.shape[1], dtype=dtype, device=weight.device)
    w[: weight.shape[0]].copy_(weight)
    return w
