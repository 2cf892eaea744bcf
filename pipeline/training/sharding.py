"""What FSDP2 (configs/accelerate/fsdp.yaml) needs from this project beyond Accelerate's
defaults: the same numbers as DDP, and whole weights where generation reads them.

Precision. Left to itself, Accelerate gives FSDP2 a MixedPrecisionPolicy of bf16 (or fp16)
for both the parameters it gathers and the gradients it reduce-scatters: the residual
stream then runs in bf16 from the embedding on, and gradients are summed over processes
in bf16, unlike DDP (fp32 weights under autocast, fp32 all-reduce) and unlike torchtitan's
default (fp32 reduction). An FSDP run and a DDP run of one config were different runs
(loss 2e-3 apart after three steps of the tiny model). Here FSDP gathers the fp32 weights
and autocast casts per op, exactly as under DDP, and gradients are reduced in fp32. The
cost: all-gathers move fp32, twice bf16's bytes.

Generation. The train loop samples on the GPT inside the wrappers (eagerly: a compiled
model would recompile for every length). FSDP2 gathers a module's weights in that
module's forward hook, and the root's hook (embeddings, final norm, head) is skipped when
the inner model is called; after a backward those weights are shards (DTensors), and the
forward fails mixing them with plain tensors. `whole_root` gathers them around the call.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def fsdp_launch() -> bool:
    """Launched with an FSDP config (accelerate launch sets this from the YAML)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin():
    """Accelerate's FSDP2 plugin, read from the launch as Accelerate would, with fp32
    gathered weights and fp32 gradient reduction; None when not an FSDP2 launch."""
    if not fsdp_launch() or os.environ.get("FSDP_VERSION", "1") != "2":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy)


@contextmanager
def whole_root(model: torch.nn.Module):
    """The FSDP2 root's own weights gathered for the duration (nothing to do without
    FSDP2). The root is the prepared model, or the module inside torch.compile's wrapper."""
    from torch.distributed.fsdp import FSDPModule

    candidates = (model, getattr(model, "_orig_mod", None), getattr(model, "module", None))
    roots = [m for m in candidates if isinstance(m, FSDPModule)]
    for root in roots:
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reshard()
