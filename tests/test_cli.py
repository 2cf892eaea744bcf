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
    assert "train.precision: Literal['auto', 'no', 'bf16', 'fp16'] = no" in out


@pytest.mark.parametrize("spelling", [["train.lr=0.003"], ["--train.lr=0.003"],
                                      ["--train.lr", "0.003"]])
def test_overrides_in_all_three_spellings(capsys, spelling):
    code, out, err = run(capsys, "config", "--get", "train.lr", *spelling)
    assert code == 0, err
    assert out.strip() == "0.003"


def test_overrides_mix_with_a_stages_own_flags():
    assert normalize_overrides(["--config", "c.yaml", "--model.n_layers", "4", "--force",
                                "--name=x", "seed=3"]) == [
        "--config", "c.yaml", "model.n_layers=4", "--force", "name=x", "seed=3"]


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
