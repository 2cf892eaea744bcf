"""One process of the FSDP2-vs-DDP check in test_fsdp.py (run under torchrun, gloo, CPU).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py ddp|fsdp OUT_DIR

Trains the tiny GPT for a few steps on fixed random batches with the project's optimizer,
wrapped in DDP or sharded with FSDP2 (`fully_shard` per TransformerBlock, then the root,
as configs/accelerate/fsdp.yaml asks Accelerate to do on GPUs), saves a checkpoint with
pipeline.training.checkpoint, loads it into a freshly wrapped model and trains on. Writes the
per-step losses to OUT_DIR/losses.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.config import ModelConfig, TrainConfig, to_dict
from pipeline.generate import continue_text
from pipeline.model.gpt import GPTModel
from pipeline.training.checkpoint import load_checkpoint, save_checkpoint
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.sharding import whole_root

CFG = ModelConfig(
    context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, tie_embeddings=True
)
TRAIN = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6)


def wrapped(mode: str):
    torch.manual_seed(0)
    model = GPTModel(CFG)
    if mode.startswith("fsdp"):
        if mode == "fsdp-compiled":  # a compiled root, then sharded (dynamo_backend)
            model = torch.compile(model)
        for block in model.trf_blocks if mode == "fsdp" else model._orig_mod.trf_blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        model = DDP(model)
    optimizer = build_optimizer(model, TRAIN, "cpu")
    return model, optimizer, build_scheduler(optimizer, TRAIN, TRAIN.max_steps)


def step(model, optimizer, scheduler, n: int) -> float:
    gen = torch.Generator().manual_seed(1000 * n + dist.get_rank())
    idx = torch.randint(0, CFG.vocab_size, (4, CFG.context_length + 1), generator=gen)
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.AVG)
    return loss.item()


def sample(model) -> str:
    """Greedy text from the GPT inside the wrappers, as the train loop samples."""
    with torch.no_grad(), whole_root(model):
        return continue_text(model, "Every effort moves you", 6)[1]


def main(mode: str, out: Path) -> None:
    state = PartialState(cpu=True)
    model, optimizer, scheduler = wrapped(mode)
    losses = [step(model, optimizer, scheduler, n) for n in range(3)]
    text = sample(model)  # after a backward: FSDP's root holds shards
    meta = {"step": 3, "model": to_dict(CFG)}
    path = save_checkpoint(
        out,
        3,
        accelerator=state,
        model=model,
        optimizer=optimizer,
        parts={"scheduler": scheduler},
        meta=meta,
        keep_last=0,
    )
    model, optimizer, scheduler = wrapped(mode)  # fresh weights, then the checkpoint's
    load_checkpoint(
        path, accelerator=state, model=model, optimizer=optimizer, parts={"scheduler": scheduler}
    )
    losses += [step(model, optimizer, scheduler, n) for n in range(3, 6)]
    if state.is_main_process:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "sample.txt").write_text(text)
    state.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
