"""Evaluation over the whole val split: the loss against a direct computation, and the same
numbers from two processes as from one."""

import json
import math
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import write_data_set
from safetensors.torch import save_file
from train_runs import two_cpu_processes

from pipeline.config import ModelConfig
from pipeline.core.errors import PipelineError
from pipeline.data.shards import shard_name
from pipeline.evaluate import main
from pipeline.model.gpt import GPTModel

CFG = ModelConfig(
    vocab_size=50257,
    context_length=16,
    emb_dim=32,
    n_heads=2,
    n_layers=2,
    drop_rate=0.0,
    qkv_bias=True,
    tie_embeddings=True,
)
SHARDS = {"train": [200], "val": [170, 75]}  # val: 10 + 4 windows of 16 tokens


def make_data(root: Path) -> Path:
    data = root / "data" / "tiny"
    rng = np.random.default_rng(0)
    write_data_set(
        data, {split: [rng.integers(0, 50257, n) for n in sizes] for split, sizes in SHARDS.items()}
    )
    return data


@pytest.fixture()
def run(tmp_path):
    """A run dir (config.yaml naming the data, one checkpoint) and its model."""
    data = make_data(tmp_path)
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    run = tmp_path / "runs" / "tiny"
    ckpt = run / "checkpoints" / "step_000010"
    ckpt.mkdir(parents=True)
    state = {k: v for k, v in model.state_dict().items() if k != "out_head.weight"}
    save_file(state, str(ckpt / "model.safetensors"))
    config = {
        "name": "tiny",
        "data": {"root": str(data.parent), "name": "tiny"},
        "train": {"micro_batch_size": 3},
    }
    (ckpt / "meta.json").write_text(
        json.dumps({"step": 10, "tokens": 0, "model": asdict(CFG), "config": config})
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run, model, data


def direct_loss(model, data: Path, windows: int | None = None) -> tuple[float, int]:
    """Mean next-token loss over every non-overlapping window of each val shard, by hand."""
    xs, ys = [], []
    for i, n in enumerate(SHARDS["val"]):
        raw = np.fromfile(data / shard_name("val", i), dtype="<u2", offset=1024).astype(np.int64)
        for s in range(0, n - CFG.context_length, CFG.context_length):
            xs.append(raw[s : s + 16])
            ys.append(raw[s + 1 : s + 17])
    x, y = torch.tensor(np.array(xs[:windows])), torch.tensor(np.array(ys[:windows]))
    with torch.no_grad():
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return loss.item(), y.numel()


def test_run_is_scored_on_every_val_window_once(run, capsys):
    run_dir, model, data = run
    record = main(["--model", str(run_dir)])
    loss, tokens = direct_loss(model, data)
    assert tokens == 14 * 16 and record["tokens"] == tokens and record["windows"] == 14
    assert record["loss"] == pytest.approx(loss, rel=1e-6)
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-12)
    assert record["step"] == 10 and record["micro_batch_size"] == 3  # from the run's config
    assert json.loads((run_dir / "eval.json").read_text()) == record
    line = capsys.readouterr().out
    assert line.startswith(f"val loss {loss:.4f} | perplexity") and "224 tokens" in line


def test_max_batches_caps_the_windows(run):
    run_dir, model, data = run
    ckpt = run_dir / "checkpoints" / "step_000010"
    record = main(["--model", str(ckpt), "--max-batches", "2", "--batch-size", "4"])
    loss, tokens = direct_loss(model, data, windows=8)
    assert record["tokens"] == tokens and record["loss"] == pytest.approx(loss, rel=1e-6)
    assert (ckpt / "eval.json").is_file()


def test_a_model_without_a_data_set_asks_for_one(run, tmp_path, capsys):
    from pipeline.export import export

    out, _ = export(run[0], tmp_path / "exported")
    with pytest.raises(SystemExit):
        main(["--model", str(out)])
    assert "--data DIR" in capsys.readouterr().err
    record = main(["--model", str(out), "--data", str(run[2]), "--context-length", "8"])
    assert record["context_length"] == 8 and record["windows"] == 21 + 9
    assert (out / "eval.json").is_file()


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(run, tmp_path, free_port):
    run_dir, model, data = run
    single = main(
        ["--model", str(run_dir), "--batch-size", "4", "--out", str(tmp_path / "one.json")]
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        *two_cpu_processes(free_port()),
        "pipeline.evaluate",
        "--model",
        str(run_dir),
        "--batch-size",
        "4",
        "--out",
        str(tmp_path / "two.json"),
    ]
    done = subprocess.run(
        launch,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["processes"] == 2 and done.stdout.count("val loss") == 1
    assert double["tokens"] == single["tokens"] == 224  # 4 batches: ranks get 2 and 2 (last short)
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-6)


def test_unknown_source_is_a_clean_error():
    with pytest.raises(PipelineError, match="neither an existing path nor a GPT-2 name"):
        from pipeline.model.weights import resolve

        resolve("no/such/model")


def test_a_filler_batch_of_ignored_targets_counts_for_nothing():
    # Under FSDP a process whose share of the val split ran out runs such a batch, so that
    # it joins every forward; the sums must be those of the real batches alone.
    from pipeline.evaluate import _padded, loss_sums
    from pipeline.model.head_loss import IGNORE_INDEX

    torch.manual_seed(0)
    model = GPTModel(ModelConfig(context_length=16, emb_dim=32, n_heads=2, n_layers=1)).eval()
    x = torch.randint(0, 50257, (2, 16))
    y = torch.randint(0, 50257, (2, 16))
    filler = (x[:1], torch.full_like(y[:1], IGNORE_INDEX))
    real = loss_sums(model, [(x, y)], torch.device("cpu"))
    padded = loss_sums(model, _padded([(x, y)], 3, filler), torch.device("cpu"))
    assert torch.equal(padded, real) and real[1] == 32
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    assert real[0].item() == pytest.approx(expected.item(), rel=1e-6)
