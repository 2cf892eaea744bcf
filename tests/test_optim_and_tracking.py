"""The learning-rate schedule, the optimizer's groups, the run length, checkpoint pruning,
the W&B mode and the metrics log: small rules, each checked against numbers worked out by
hand."""

from __future__ import annotations

import math
import socket

import pytest
from accelerate import PartialState

from pipeline.config import ModelConfig, TrainConfig, WandbConfig, load_config, to_dict
from pipeline.core.errors import PipelineError
from pipeline.model.gpt import GPTModel
from pipeline.training import checkpoint as ckpt
from pipeline.training.mfu import gpu_peak_flops
from pipeline.training.optim import build_optimizer, build_scheduler, lr_factor, total_steps
from pipeline.training.tracking import MetricsLog, wandb_mode


def test_warmup_then_cosine_hits_its_endpoints():
    f = lambda step: lr_factor(step, warmup_steps=10, max_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear to the peak
    assert f(10) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(60) == pytest.approx(0.55)  # halfway down: min + (1 - min) / 2
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # and stays at min


def test_wsd_holds_the_peak_then_decays_over_its_last_fraction_in_either_shape():
    def f(step, shape="linear", max_steps=110):
        return lr_factor(
            step,
            warmup_steps=10,
            max_steps=max_steps,
            min_ratio=0.1,
            schedule="wsd",
            decay_fraction=0.2,
            decay_shape=shape,
        )

    assert f(9) == pytest.approx(1.0) and f(50) == f(87) == 1.0  # stable until step 88
    assert f(88) == 1.0 and f(99) == pytest.approx(0.1 + 0.9 * (1 - 11 / 22))  # linear
    assert f(99, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - (11 / 22) ** 0.5))
    assert f(110) == pytest.approx(0.1) and f(110, "1-sqrt") == pytest.approx(0.1)
    # lengthened from its stable phase: at step 60 of a run now 220 steps long, still the peak
    assert f(60, max_steps=220) == 1.0 and f(200, max_steps=220) < 1.0
    constant = [
        lr_factor(s, warmup_steps=2, max_steps=9, min_ratio=0.1, schedule="constant")
        for s in range(9)
    ]
    assert constant == [0.5, 1.0] + [1.0] * 7


def test_warmup_from_a_start_lr_and_clipping_from_the_end_of_warmup():
    from pipeline.training.optim import clips_at

    f = [
        lr_factor(s, warmup_steps=4, max_steps=20, min_ratio=0.01, start_ratio=0.01)
        for s in range(5)
    ]
    assert f == pytest.approx([0.01, 0.2575, 0.505, 0.7525, 1.0])  # the book's initial_lr ramp
    after = TrainConfig(warmup_steps=4, grad_clip_after_warmup=True)
    assert [clips_at(s, after) for s in range(6)] == [False] * 4 + [True] * 2
    assert all(clips_at(s, TrainConfig(warmup_steps=4)) for s in range(6))
    assert not clips_at(9, TrainConfig(grad_clip=None))


def test_a_wsd_run_resumed_with_more_steps_goes_on_at_its_peak():
    """The scheduler's checkpointed state (its step) under a longer run: still stable."""
    model = GPTModel(ModelConfig(vocab_size=32, context_length=4, emb_dim=8, n_heads=2, n_layers=1))
    train = TrainConfig(lr=1e-3, schedule="wsd", warmup_steps=2)
    optimizer = build_optimizer(model, train, "cpu")
    short = build_scheduler(optimizer, train, max_steps=10)
    for _ in range(8):  # to step 8 of a 10-step run: the last step of its stable phase
        optimizer.step()
        short.step()
    longer = build_scheduler(build_optimizer(model, train, "cpu"), train, max_steps=100)
    longer.load_state_dict(short.state_dict())
    short.step()
    longer.step()
    assert short.get_last_lr()[0] < 1e-3  # the 10-step run decays from step 9
    assert longer.get_last_lr()[0] == pytest.approx(1e-3)  # resumed as 100 steps: stable


def test_scheduler_defaults_min_lr_to_a_tenth_and_steps_once_per_call():
    model = GPTModel(ModelConfig(vocab_size=32, context_length=4, emb_dim=8, n_heads=2, n_layers=1))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3), "cpu")
    scheduler = build_scheduler(optimizer, TrainConfig(lr=1e-3), max_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[4] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_matrices_decay_and_a_tied_head_is_counted_once():
    model = GPTModel(
        ModelConfig(
            vocab_size=32, context_length=4, emb_dim=8, n_heads=2, n_layers=1, tie_embeddings=True
        )
    )
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.3), "cpu").param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {p.dim() for p in decay["params"]} == {2} and {p.dim() for p in no_decay["params"]} == {
        1
    }
    assert sum(p is model.tok_emb.weight for p in decay["params"]) == 1


def test_run_length_takes_max_steps_then_max_tokens_then_epochs():
    both = TrainConfig(max_steps=7, max_tokens=10**9, epochs=3)
    assert total_steps(both, windows=100, samples_per_step=8, tokens_per_step=8 * 64) == 7
    tokens = TrainConfig(max_tokens=10_000, epochs=3)
    assert total_steps(tokens, 100, 8, 512) == math.ceil(10_000 / 512)
    assert total_steps(TrainConfig(epochs=2.5), 100, 8, 512) == math.ceil(250 / 8)
    assert total_steps(TrainConfig(), 100, 8, 512) == math.ceil(100 / 8)  # one epoch


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    state = PartialState(cpu=True)
    cfg = ModelConfig(vocab_size=32, context_length=4, emb_dim=8, n_heads=2, n_layers=1)
    model = GPTModel(cfg)
    optimizer = build_optimizer(model, TrainConfig(), "cpu")
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(
            tmp_path,
            step,
            accelerator=state,
            model=model,
            optimizer=optimizer,
            parts={},
            meta={"step": step, "model": to_dict(cfg)},
            keep_last=2,
        )
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_000015", "step_000020"]
    ckpt.prune_checkpoints(tmp_path, keep_last=0)  # 0 keeps every one
    assert len(ckpt.checkpoint_dirs(tmp_path)) == 2


def test_wandb_mode_environment_then_config_then_key(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(WandbConfig(mode="online")) == "offline"  # the environment wins
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"
    assert wandb_mode(WandbConfig()) == "offline"  # no key anywhere
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr("pipeline.training.tracking._reachability", {})
    with socket.socket() as server:  # a W&B server that answers: online
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert wandb_mode(WandbConfig()) == "online"
    monkeypatch.setattr("pipeline.training.tracking._reachability", {})
    assert wandb_mode(WandbConfig()) == "offline"  # nobody listens there now
    assert "cannot be reached from this machine; logging offline" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(PipelineError, match="no W&B API key is configured"):
        wandb_mode(WandbConfig())


def test_truncate_after_drops_the_rows_a_resume_logs_again(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (10, 20, 30):
        log.append({"step": step, "tokens": step * 4})
    log.truncate_after(20)
    assert [r["step"] for r in log.rows()] == [10, 20]


def test_gpu_peaks_by_the_name_cuda_reports():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", low_precision=True) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", low_precision=False) == 51e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", low_precision=True) == 312e12
    assert gpu_peak_flops("Some Future GPU", low_precision=True) is None
    assert gpu_peak_flops("NVIDIA H200 NVL", low_precision=True) == 835e12  # not the SXM H200
    assert gpu_peak_flops("NVIDIA H200", low_precision=True) == 989e12
    assert gpu_peak_flops("NVIDIA L40", low_precision=True) == 181e12  # not the L4
    assert gpu_peak_flops("NVIDIA L4", low_precision=True) == 121e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", low_precision=False) == 15.7e12


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_rewritten(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    log.append({"step": 10, "tokens": 40})
    with open(log.path, "a") as f:
        f.write('{"step": 20, "tok')  # a kill during the append
    log.truncate_after(20)
    assert "warning: " in (err := capsys.readouterr().err) and "cut short" in err
    assert log.path.read_text() == '{"step": 10, "tokens": 40}\n'
    log.path.write_text('{"step": 10\n{"step": 20, "tokens": 80}\n')  # damage mid-file
    with pytest.raises(PipelineError, match="line 1 is not JSON"):
        log.rows()


def test_trackers_are_checked_and_wandb_settings_fall_back_to_its_environment(
    monkeypatch, tmp_path
):
    from pipeline.config import ConfigError
    from pipeline.training.tracking import trackers, wandb_init_kwargs, wandb_project

    with pytest.raises(ConfigError, match=r"tracking.log_with=\['neptune'\] is not allowed"):
        load_config(None, ["tracking.log_with=[neptune]"])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers(load_config(None, ["tracking.log_with=[wandb, tensorboard]"])) == [
        "tensorboard"
    ]
    with pytest.raises(
        PipelineError, match="names aim, which is not installed here: pip install aim"
    ):
        trackers(load_config(None, ["tracking.log_with=[aim]"]))
    monkeypatch.setenv("WANDB_PROJECT", "p-env")
    monkeypatch.setenv("WANDB_ENTITY", "e-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "g-env")
    config = load_config(None, [f"runs_root={tmp_path}"])
    kwargs = wandb_init_kwargs(config, tmp_path, "offline")
    assert (wandb_project(config.tracking.wandb), kwargs["entity"], kwargs["group"]) == (
        "p-env",
        "e-env",
        "g-env",
    )
    config = load_config(None, ["tracking.wandb.project=p", "tracking.wandb.group=g"])
    assert wandb_project(config.tracking.wandb) == "p"  # the config, when set, wins
    assert wandb_init_kwargs(config, tmp_path, "offline")["group"] == "g"
