"""`gpt-pipeline`: one command for every stage, help that lists every config key from the
schema, overrides in the three spellings other tools use, and suggestions for typos."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import STAGES, main
from pipeline.keys import key_reference, nearest_keys, normalize_overrides


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_installed_command_lists_the_stages():
    command = Path(sys.executable).parent / "gpt-pipeline"
    assert command.is_file(), "make install puts gpt-pipeline beside the venv's python"
    out = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert all(f"  {stage}" in out.stdout for stage in STAGES)


def test_train_help_lists_every_key_with_type_default_and_comment(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    for doc in key_reference():
        assert f"    {doc.key}: {doc.type} = {doc.default}" in out, doc.key
    assert len(key_reference()) > 60
    assert "train.micro_batch_size: int = 8\n        sequences per process per forward pass" in out
    assert "train.precision: Literal['auto', 'fp32', 'no', 'bf16', 'fp16'] = no" in out


@pytest.mark.parametrize(
    "spelling", [["train.lr=0.003"], ["--train.lr=0.003"], ["--train.lr", "0.003"]]
)
def test_overrides_in_all_three_spellings(capsys, spelling):
    code, out, err = run(capsys, "config", "--get", "train.lr", *spelling)
    assert code == 0, err
    assert out.strip() == "0.003"


def test_overrides_mix_with_a_stages_own_flags():
    assert normalize_overrides(
        ["--config", "c.yaml", "--model.n_layers", "4", "--force", "--name=x", "seed=3"]
    ) == ["--config", "c.yaml", "model.n_layers=4", "--force", "name=x", "seed=3"]


def test_a_mistyped_key_suggests_the_nearest(capsys):
    code, _, err = run(capsys, "config", "--train.lrr", "1e-3")
    assert code == 2 and "Traceback" not in err
    assert "unknown config key 'train.lrr'; did you mean train.lr" in " ".join(err.split())
    assert nearest_keys("train.temperature")[0] == "eval.temperature"  # right leaf, wrong section


def test_an_unknown_stage_is_named_with_a_suggestion(capsys):
    code, _, err = run(capsys, "traim")
    assert code == 2 and "unknown stage 'traim' (did you mean train?)" in err


def test_a_launcher_precision_other_than_the_configs_is_named_once(monkeypatch):
    from pipeline.train import launcher_precision_note

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert launcher_precision_note("no") is None  # no launcher: nothing to say
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert launcher_precision_note("bf16") is None  # they agree
    note = launcher_precision_note("no")
    assert "asked for mixed precision 'bf16'" in note and "uses the config's 'no'" in note
    assert "train.precision=bf16" in note


# ----------------------------------------------------------------------------- model stages


def test_model_stages_take_trains_dialect_and_keep_their_flags():
    """evaluate, export and generate: key=value, --key=value and --key value, dashes or
    underscores, --no-key for a boolean, a repeated list option; the same options."""
    from pipeline.evaluate import parse_args as evaluate_args
    from pipeline.export import parse_args as export_args
    from pipeline.generate import parse_args as generate_args

    flags = generate_args(
        [
            "--model",
            "gpt2",
            "--prompt",
            "a",
            "--prompt",
            "yes",
            "--max-new-tokens",
            "5",
            "--top-k=3",
            "--no-cache",
            "--dtype",
            "bf16",
        ]
    )
    keys = generate_args(
        [
            "model=gpt2",
            "prompt=a",
            "prompt=yes",
            "max_new_tokens=5",
            "--top_k",
            "3",
            "cache=false",
            "dtype=bfloat16",
        ]
    )
    assert flags == keys
    assert (keys.prompt, keys.max_new_tokens, keys.top_k, keys.cache, keys.dtype) == (
        ["a", "yes"],
        5,
        3,
        False,
        "bf16",
    )  # a prompt stays the text typed, not YAML's True
    assert export_args(["model=runs/x", "dtype=float16"]).dtype == "fp16"  # one spelling
    assert export_args(["--model", "runs/x"]).dtype == "fp32"
    e = evaluate_args(
        [
            "--model",
            "runs/x",
            "task=mc",
            "--task-file",
            "t.jsonl",
            "batch_size=4",
            "--text",
            "a.txt",
            "text=b.txt",
            "precision=fp32",
        ]
    )
    assert (e.task, e.task_file, e.batch_size, e.text, e.precision) == (
        "mc",
        "t.jsonl",
        4,
        ["a.txt", "b.txt"],
        "fp32",
    )


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["generate", "--model", "gpt2", "--max-new-token", "5"],
            ["unknown option '--max-new-token'", "did you mean --max-new-tokens"],
        ),
        (["generate", "--model", "gpt2", "temprature=0.5"], ["did you mean --temperature"]),
        (["generate", "--model", "gpt2", "--top-k", "many"], ["--top-k must be int, got 'many'"]),
        (["generate", "--model", "gpt2", "--top-k"], ["--top-k needs a value"]),
        (["export", "--dtype", "bf16"], ["--model is required"]),
        (
            ["evaluate", "--model", "gpt2", "task=mmlu"],
            ["--task='mmlu' is not one of: val, hellaswag, mc"],
        ),
    ],
)
def test_model_stages_refuse_bad_options_in_one_paragraph_before_any_work(capsys, argv, words):
    code, _, err = run(capsys, *argv)
    message = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and message.startswith("error:"), err
    assert all(word in message for word in words), message


@pytest.mark.parametrize("stage", ["evaluate", "export", "generate"])
def test_model_stage_help_is_generated_from_the_options(capsys, stage):
    import dataclasses
    import importlib

    module = importlib.import_module(f"pipeline.{stage}")
    schema = type(module.parse_args(["--model", "gpt2"]))
    code, out, _ = run(capsys, stage, "--help")
    assert code == 0
    for f in dataclasses.fields(schema):
        flag = "--" + f.name.replace("_", "-")
        assert f"  {flag}" in out, flag
        assert " ".join(f.metadata["help"].split()[:4]) in " ".join(out.split()), f.name
