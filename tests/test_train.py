"""The train stage on real text through the real stages: prepare -> train.

One tiny model and one prepared slice of the built-in corpus serve every test. Runs whose
process is under test (process counts, launchers, what a fresh interpreter reads back) go
through `python -m pipeline.train` and `accelerate launch`; runs that test what training
computes and writes call the stage's own `run` in this process (train_runs.train_here).
Signals, dead launchers and exit codes are test_train_signals.py's, SIGKILL and resume
test_faults.py's.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from golden_losses import reference_losses
from safetensors.torch import load_file
from train_runs import ROOT, env, run_train, train_args, train_here, two_cpu_processes

pytestmark = pytest.mark.slow  # every test here trains


@pytest.fixture(scope="module")
def data_root(stdlib_data) -> Path:
    return stdlib_data


LLAMA = ["model.arch=llama", "model.n_kv_heads=2"]
MIXTURE = (
    "data.sources=[{name: py, weight: 3, source: {kind: python-stdlib, max_bytes: "
    "600000}}, {name: prose, weight: 1, source: {kind: files, paths: [%s]}}]"
)


@pytest.fixture(scope="module")
def mixture_root(tmp_path_factory) -> tuple[Path, str]:
    """A two-source mixture (stdlib code 3 : prose 1), prepared into data.name=mix: (root,
    the data.sources override that names it)."""
    root = tmp_path_factory.mktemp("mix")
    prose = root / "prose"
    prose.mkdir()
    words = "every effort moves you toward the picture that the painter made at last".split()
    for i in range(40):
        (prose / f"{i:02d}.txt").write_text(
            " ".join(words[(i + k) % len(words)] for k in range(600)) + "\n"
        )
    sources = MIXTURE % prose
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.prepare",
            f"data.root={root}",
            "data.name=mix",
            sources,
            "data.num_workers=2",
        ],
        cwd=ROOT,
        env=env(),
        check=True,
        capture_output=True,
    )
    return root, sources


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """One 40-step run (offline W&B) that several tests read: (its directory, what it
    printed)."""
    runs = tmp_path_factory.mktemp("runs")
    args = train_args(
        data_root,
        runs,
        "falls",
        "train.max_steps=40",
        "eval.every_steps=20",
        "train.log_every_steps=1",
        "train.warmup_steps=5",
        "checkpoint.every_steps=40",
        "tracking.wandb.mode=offline",
        "train.precision=auto",
        "eval.whole_split_at_end=true",
    )
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.delenv("WANDB_MODE", raising=False)  # the config's offline decides
        patch.delenv("WANDB_API_KEY", raising=False)
        train_here(args, wandb_mode=None)
    return runs / "falls", printed.getvalue()


def test_loss_falls_and_every_metric_is_logged_with_an_offline_wandb_run(trained_run):
    run_dir, printed = trained_run
    rows = metrics(run_dir)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    first_loss = next(r["loss"] for r in rows if "loss" in r)
    assert first_loss > 10.0  # about ln(50257) = 10.8 at the start
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < first_loss - 2.5
    names = {
        "step",
        "tokens",
        "loss",
        "val_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "step_time",
    }
    assert names <= set(rows[-1]), names - set(rows[-1])
    assert rows[-1]["tokens"] == 40 * 4 * 64
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert "done: 40 steps" in printed
    # the in-training val estimate (spread over the split) beside the whole split's loss
    assert "(estimate), " in printed and " over the whole val split" in printed
    # auto says what it chose and why: bf16 only where this CPU has bf16 units.
    from pipeline.training.precision import cpu_bf16_flags

    chosen = "bf16" if cpu_bf16_flags() else "no"
    assert f"precision: {chosen} (auto: this CPU has" in printed


@pytest.mark.golden
@pytest.mark.parametrize("data", ["one source", "mixture", "llama"])
def test_two_processes_match_one_with_accumulation_and_resume_across_process_counts(
    data_root, mixture_root, tmp_path, free_port, data
):
    # Constant lr, so that runs of different lengths share one schedule.
    common = [
        "train.log_every_steps=1",
        "eval.every_steps=1000",
        "train.lr=1e-3",
        "train.min_lr=1e-3",
        "checkpoint.every_steps=3",
    ]
    if data == "llama":  # one source, the Llama-style model (grouped-query attention)
        common += LLAMA
    if data == "mixture":  # each sample drawn from a source by the weights, as for one
        data_root, sources = mixture_root
        common += ["data.source=null", sources]

    def train_args(*args):
        return globals()["train_args"](*args, data_name="mix" if data == "mixture" else "stdlib")

    def one_process() -> list[float]:  # the reference, unless tests/golden has it
        train_here(
            train_args(
                data_root,
                tmp_path,
                "one",
                *common,
                f"train.max_steps={3 if data == 'mixture' else 6}",
                "train.grad_accum_steps=2",
            )
        )
        return [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]

    data_dir = data_root / ("mix" if data == "mixture" else "stdlib")
    expected = reference_losses(f"accumulation-2-{data.replace(' ', '-')}", data_dir, one_process)
    # Two processes with micro batch 4 = one process with micro batch 4 and 2 accumulation
    # steps: the same global batch, so the same samples in each step.
    two_env = {**env(), "ACCELERATE_USE_CPU": "1"}
    launcher = two_cpu_processes(free_port())
    two = run_train(
        train_args(data_root, tmp_path, "two", *common, "train.max_steps=3"), launcher, env=two_env
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("checkpoint: ") == 1  # printed by the main process only
    # ... and the two-process run resumes on one process, continuing the same data order
    # (for a mixture the loader tests show that resume; here 3 steps of 2 processes do).
    steps = 3 if data == "mixture" else 6
    if data != "mixture":
        resumed = run_train(
            train_args(
                data_root, tmp_path, "two", *common, "train.max_steps=6", "train.grad_accum_steps=2"
            )
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resumed from" in resumed.stdout
    expected = expected[:steps]
    actual = [r["loss"] for r in metrics(tmp_path / "two") if "loss" in r]
    assert len(expected) == len(actual) == steps
    assert actual == pytest.approx(expected, abs=1e-5)
    if data == "mixture":  # 3 : 1 by the weights, counted in the metrics
        last = metrics(tmp_path / "two")[-1]
        assert last["tokens/py"] + last["tokens/prose"] == last["tokens"]
        assert last["tokens/py"] == pytest.approx(3 * last["tokens/prose"], abs=2 * 64)


def test_a_muon_run_trains_and_resumes(data_root, tmp_path, capsys):
    args = [
        "train.optimizer=muon",
        "train.max_steps=2",
        "eval.every_steps=1000",
        "checkpoint.every_steps=2",
    ]
    assert train_here(train_args(data_root, tmp_path, "muon", *args))["steps"] == 2
    assert (
        train_here(train_args(data_root, tmp_path, "muon", *args, "train.max_steps=4"))["steps"]
        == 4
    )
    assert "Resumed from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "muon")] == [2, 4]


def test_compile_compiles_the_blocks_and_trains_as_eager_does(data_root, tmp_path):
    """train.compile compiles each block in place and leaves the head's loop eager; the
    losses are eager's, the checkpoint's names are eager's, and the samples generated at
    each evaluation run eagerly (no recompile per new length)."""
    import torch._dynamo.utils as dynamo_utils

    args = ["train.max_steps=4", "train.log_every_steps=1", "eval.every_steps=2"]
    train_here(train_args(data_root, tmp_path, "eager", *args))
    dynamo_utils.counters.clear()
    train_here(train_args(data_root, tmp_path, "compiled", *args, "train.compile=true"))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    loss = [r["loss"] for r in eager]
    assert [r["loss"] for r in compiled] == pytest.approx(loss, abs=1e-5)
    assert [r.get("sample") for r in compiled] == [r.get("sample") for r in eager]
    # one graph per block call site and grad mode (train, evaluation), not one per length
    assert 0 < graphs <= 4, dynamo_utils.counters["stats"]
    names = load_file(
        str(tmp_path / "compiled" / "checkpoints" / "step_000004" / "model.safetensors")
    )
    assert "trf_blocks.0.att.qkv.weight" in names


def test_tensorboard_and_offline_wandb_get_the_metrics_and_the_environment_is_honoured(
    data_root, tmp_path, monkeypatch
):
    """TensorBoard's event files, read back with TensorBoard's own reader, hold the loss of
    every logged step; the offline W&B run takes WANDB_PROJECT / WANDB_RUN_GROUP (the config
    leaves them null) and holds the samples table."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "project-from-env",
        "WANDB_RUN_GROUP": "group-from-env",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    train_here(
        train_args(
            data_root,
            tmp_path,
            "tracked",
            "train.max_steps=4",
            "train.log_every_steps=1",
            "eval.every_steps=2",
            "tracking.log_with=[wandb, tensorboard]",
        )
    )
    rows = metrics(tmp_path / "tracked")
    (event_file,) = (tmp_path / "tracked" / "tensorboard").glob("*/events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent)).Reload()
    assert [(s.step, round(s.value, 4)) for s in events.Scalars("loss")] == [
        (r["step"], round(r["loss"], 4)) for r in rows if "loss" in r
    ]
    assert [s.step for s in events.Scalars("val_loss")] == [2, 4]
    (run_file,) = (tmp_path / "tracked").glob("wandb/offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    assert b"project-from-env" in data and b"group-from-env" in data
    tables = list((tmp_path / "tracked").glob("wandb/offline-run-*/files/media/table/**/*.json"))
    assert tables, "the samples table"
    last = json.loads(max(tables, key=lambda p: p.stat().st_mtime).read_text())
    assert last["columns"] == ["step", "prompt", "text"] and last["data"][-1][0] == 4


HF_SIDE = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
export, prompts, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export)
generate = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
print(json.dumps({
    "ids": [tok(t, split_special_tokens=True)["input_ids"] for t in texts],
    "special": tok("end<|endoftext|>start")["input_ids"],
    "model": [tok.decode(model.generate(**tok(p, return_tensors="pt"), max_new_tokens=10,
                                        do_sample=False, eos_token_id=None)[0])
              for p in prompts],
    "pipeline": [generate(p, max_new_tokens=10, do_sample=False, eos_token_id=None,
                          return_full_text=True)[0]["generated_text"] for p in prompts],
}))
"""


def test_a_trained_export_reads_in_a_fresh_transformers_process_as_gpt_pipeline_generates(
    trained_run, tmp_path, capsys
):
    """Exported and sampled through gpt-pipeline's own dispatch (in this process), then read
    by transformers in a fresh interpreter, which must know nothing of this project."""
    from safetensors.torch import load_file

    from pipeline.cli import main as gpt_pipeline
    from pipeline.data.tokenizer import encode

    run_dir, _ = trained_run
    export = tmp_path / "export"
    gpt_pipeline(["export", "--model", str(run_dir), "--out", str(export)])
    # trained with the head padded to 50304 (model.vocab_padding's default): no file shows it
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert load_file(str(newest / "model.safetensors"))["tok_emb.weight"].shape[0] == 50257
    assert load_file(str(export / "model.safetensors"))["transformer.wte.weight"].shape[0] == 50257
    assert json.loads((export / "config.json").read_text())["vocab_size"] == 50257
    prompts = ["Every effort moves you", "def main():", "naïve café — 東京"]
    texts = prompts + ["tabs\tand  spaces, emoji 😀", "end<|endoftext|>start"]
    capsys.readouterr()
    gpt_pipeline(
        [
            "generate",
            "--model",
            str(export),
            "--max-new-tokens",
            "10",
            *[arg for p in prompts for arg in ("--prompt", p)],
        ]
    )
    ours = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")[: len(prompts)]
    hf = subprocess.run(
        [sys.executable, "-c", HF_SIDE, str(export), json.dumps(prompts), json.dumps(texts)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert hf.returncode == 0, hf.stderr[-3000:]
    got = json.loads(hf.stdout.strip().splitlines()[-1])
    assert got["ids"] == [encode(t) for t in texts]
    assert got["special"] == [437, 50256, 9688]  # transformers reads the marker as the token
    assert got["model"] == got["pipeline"] == ours


def test_a_task_scored_during_training_is_logged_beside_the_val_loss(data_root, tmp_path, capsys):
    """eval.tasks: acc and acc_norm at the evaluations, equal to what the evaluate stage
    gives the same checkpoint, and a second panel in loss.png."""
    task = tmp_path / "mine.jsonl"
    task.write_text(
        "".join(
            json.dumps(
                {
                    "context": f"Line {i} of the file says",
                    "choices": [" hello", " def main():", " import os", " the end"],
                    "label": i % 4,
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    train_here(
        train_args(
            data_root,
            tmp_path,
            "tasks",
            "train.max_steps=4",
            "eval.every_steps=2",
            "eval.tasks=[mc]",
            f"eval.task_file={task}",
            "eval.task_every_steps=4",
            "checkpoint.every_steps=4",
        )
    )
    rows = [r for r in metrics(tmp_path / "tasks") if "val_loss" in r]
    assert [("mc_acc_norm" in r) for r in rows] == [False, True]  # step 2: not due
    assert "mc_acc_norm" in capsys.readouterr().out
    from pipeline.evaluate import main as evaluate_main

    got = evaluate_main(
        [
            "--model",
            str(tmp_path / "tasks"),
            "--task",
            "mc",
            "--task-file",
            str(task),
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert (got["acc"], got["acc_norm"]) == (rows[-1]["mc_acc"], rows[-1]["mc_acc_norm"])
    assert (tmp_path / "tasks" / "loss.png").stat().st_size > 1000
