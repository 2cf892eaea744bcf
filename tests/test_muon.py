"""train.optimizer: muon — our Muon against torch.optim.Muon, the split of parameters,
and the combined optimizer through the scheduler, Accelerate and the checkpoint files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from pipeline.config import ModelConfig, TrainConfig, to_dict
from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPTModel
from pipeline.train import check_optimizer_fits
from pipeline.training import checkpoint as ckpt
from pipeline.training.muon import Muon, Optimizers, fast_orthogonalize_dtype, orthogonalize
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.precision import cpu_bf16_flags

CFG = ModelConfig(
    vocab_size=64,
    context_length=8,
    emb_dim=16,
    n_heads=2,
    n_layers=2,
    drop_rate=0.0,
    tie_embeddings=False,
)
MUON = TrainConfig(optimizer="muon", lr=1e-2, warmup_steps=2)


@pytest.mark.parametrize("shape", [(24, 80), (80, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonalize_brings_every_singular_value_near_one(shape, dtype):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 50
    out = orthogonalize(g, dtype)
    assert out.shape == g.shape and out.dtype == g.dtype
    singular = torch.linalg.svdvals(out)
    # the quintic iteration lands in about [0.7, 1.2], not exactly on 1 (by design)
    assert singular.min() > 0.6 and singular.max() < 1.25
    # and keeps the singular vectors: out is close to U V^T of g
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (out * (u @ vh)).sum() / (out.norm() * (u @ vh).norm())
    assert cosine > 0.97


def test_muon_in_bf16_follows_torch_muon_with_the_adamw_matched_lr():
    """torch.optim.Muon orthogonalizes in bf16 always: ours in bf16 must follow it."""
    g = torch.Generator().manual_seed(1)
    ours = torch.nn.Parameter(torch.randn(32, 96, generator=g))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = Muon([ours], lr=0.01, weight_decay=0.1, orthogonalize_dtype="bfloat16")
    ref_opt = torch.optim.Muon([ref], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = ours.detach().clone()
    for _ in range(5):
        grad = torch.randn(32, 96, generator=g)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    ours_moved, ref_moved = ours.detach() - start, ref.detach() - start
    assert ref_moved.norm() > 0.1  # five updates of singular values ~ lr x 0.2 x sqrt(96)
    # the same updates up to bf16 rounding
    assert (ours_moved - ref_moved).norm() < 0.03 * ref_moved.norm()


def test_muon_orthogonalizes_in_bf16_only_where_bf16_is_fast():
    assert fast_orthogonalize_dtype("cpu") == ("bfloat16" if cpu_bf16_flags() else "float32")
    assert fast_orthogonalize_dtype("mps") == "float32"


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = GPTModel(CFG)
    optimizer = build_optimizer(model, MUON, "cpu")
    adamw, muon = optimizer.parts
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in in_muon) == sorted(
        n for n, p in model.named_parameters() if n.startswith("trf_blocks.") and p.dim() == 2
    )
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight"} <= {names[i] for i in in_adamw}
    assert not in_muon & in_adamw and in_muon | in_adamw == set(names)
    assert optimizer.param_groups == adamw.param_groups + muon.param_groups


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g)


def _train(model, optimizer, scheduler, steps: range):
    for step in steps:
        x, y = _batch(step)
        model(x, targets=y).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def _fresh(seed: int):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    optimizer = build_optimizer(model, MUON, "cpu")
    return model, optimizer, build_scheduler(optimizer, MUON, max_steps=10)


def test_the_schedule_reaches_both_optimizers_after_accelerate_wraps_them():
    """Accelerate round-trips the optimizer's state dict when it wraps it; the parts must
    then still read the learning rate the scheduler writes."""
    model, optimizer, scheduler = _fresh(0)
    model, wrapped = Accelerator(cpu=True).prepare(model, optimizer)
    _train(model, wrapped, scheduler, range(3))
    expected = scheduler.get_last_lr()[0]
    for part in optimizer.parts:
        assert [g["lr"] for g in part.param_groups] == pytest.approx(
            [expected] * len(part.param_groups)
        )
        assert all(p in optimizer.state for g in part.param_groups for p in g["params"])


def test_a_resumed_muon_run_continues_exactly_as_an_uninterrupted_one(tmp_path):
    state = PartialState(cpu=True)
    model, optimizer, scheduler = _fresh(0)
    _train(model, optimizer, scheduler, range(5))
    reference, ref_opt, ref_sched = _fresh(0)
    _train(reference, ref_opt, ref_sched, range(5))
    meta = {"step": 3, "model": to_dict(CFG)}
    path = ckpt.save_checkpoint(
        tmp_path,
        5,
        accelerator=state,
        model=model,
        optimizer=optimizer,
        parts={"scheduler": scheduler},
        meta=meta,
        keep_last=0,
    )
    saved = torch.load(path / ckpt.OPTIMIZER_FILE, weights_only=True)
    # torch's format, keyed by parameter name: Muon's momentum and AdamW's moments
    assert "momentum_buffer" in saved["state"]["trf_blocks.0.ff.fc.weight"]
    assert "exp_avg" in saved["state"]["tok_emb.weight"]

    resumed, res_opt, res_sched = _fresh(1)  # other weights, a fresh optimizer
    ckpt.load_checkpoint(
        path, accelerator=state, model=resumed, optimizer=res_opt, parts={"scheduler": res_sched}
    )
    _train(resumed, res_opt, res_sched, range(5, 8))
    _train(reference, ref_opt, ref_sched, range(5, 8))
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_muon_under_fsdp_is_refused_before_any_work():
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(PipelineError, match="train.optimizer: muon cannot run under FSDP"):
        check_optimizer_fits(MUON, fsdp)
    check_optimizer_fits(TrainConfig(), fsdp)  # AdamW is fine under FSDP
    check_optimizer_fits(MUON, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_optimizers_refuses_nothing_torch_would_accept_and_steps_every_part():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, 4))
    both = Optimizers([torch.optim.SGD([a], lr=1.0), Muon([b], lr=1.0, weight_decay=0.0)])
    a.grad, b.grad = torch.ones(3), torch.eye(4)
    both.step()
    assert torch.equal(a.detach(), torch.zeros(3))
    assert not torch.equal(b.detach(), torch.ones(4, 4))
