"""`evaluate --harness`: EleutherAI's lm-evaluation-harness on a trained tiny model, offline,
on local tasks. Its numbers are held against this project's own scoring of the same file:
`acc` equals `--task mc`'s, its `acc_norm` is the per-character one recomputed from our
per-choice losses, and its rolling log-likelihood is `--text --stride context-1`'s total
within 0.1%. The refusals are one paragraph each, before any model is loaded."""

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_runs import ROOT, train_args, train_here

from pipeline.data.tokenizer import encode
from pipeline.evaluate import main
from pipeline.export import export
from pipeline.model.weights import load_model
from pipeline.training.tasks import choice_losses, choice_rows, read_examples

pytest.importorskip("lm_eval")

ROWS = [  # contexts and choices of both kinds the model was trained on, and of others
    ("A man is sitting on a roof. he", [" is using wrap.", " starts pulling up roofing."], 1),
    ("A woman pours flour into a bowl. She", [" cracks two eggs into it.", " sings."], 0),
    ("def add(a, b):\n    return", [" a + b", " import os", " class Foo:"], 0),
    ("for i in range(10):\n    print(", ["i)", "def)", " while True"], 0),
    ("import os\nimport", [" sys", " the cat", " 12345"], 0),
    ("class Point:\n    def __init__(self, x):\n        self.x =", [" x", " None", " 'y'"], 0),
    ("if __name__ == '__main__':\n   ", [" main()", " yes", " the end"], 0),
    ("Two kids ride bikes down a hill. they", [" stop.", " turn into fish and swim."], 0),
    ("try:\n    f()\nexcept", [" ValueError:", " banana", ": pass"], 0),
    ("x = [1, 2, 3]\ny = len(", ["x)", "y)", " z"], 0),
    ("The chef slices an onion. He", [" puts the pieces into a hot pan.", " flies."], 0),
    ('"""Return the sum of', [' the values."""', "!!!", " def"], 0),
]


@pytest.fixture(scope="module")
def run_dir(stdlib_data, tmp_path_factory) -> Path:
    """A tiny GPT trained 40 steps on the standard library (fp32), and its export."""
    runs = tmp_path_factory.mktemp("harness-runs")
    train_here(train_args(stdlib_data, runs, "tiny", "train.max_steps=40"))
    export(runs / "tiny")
    return runs / "tiny"


@pytest.fixture(scope="module")
def model_dir(run_dir) -> Path:
    return run_dir / "export"


def write_mc_task(folder: Path) -> Path:
    """The shipped configs/harness/my_mc.yaml pointed at a file of ROWS in the mc format."""
    folder.mkdir()
    data = folder / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in ROWS)
    )
    task = yaml.safe_load((ROOT / "configs" / "harness" / "my_mc.yaml").read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    (folder / "my_mc.yaml").write_text(yaml.safe_dump(task))
    return data


def write_text_task(folder: Path, text: str) -> None:
    """A rolling log-likelihood task over one document, as lm-eval's wikitext is."""
    (folder / "text.jsonl").write_text(json.dumps({"text": text}) + "\n")
    task = {
        "task": "one_text",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "text.jsonl")}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "bits_per_byte"}],
    }
    (folder / "one_text.yaml").write_text(yaml.safe_dump(task))


def our_choice_losses(model_dir: Path, data: Path) -> list[tuple[np.ndarray, tuple, int]]:
    """Per example: the summed loss of each choice (this project's scoring), the choices
    and the label."""
    model, _ = load_model(model_dir)
    model.eval()
    rows = []
    for ex in read_examples(data, "mc"):
        sums, _ = choice_losses(
            model, choice_rows(ex, model.cfg.context_length), torch.device("cpu")
        )
        rows.append((sums.numpy().astype(np.float64), ex.choices, ex.label))
    return rows


def test_harness_scores_a_local_task_as_task_mc_does(run_dir, model_dir, tmp_path):
    tasks = tmp_path / "tasks"
    data = write_mc_task(tasks)
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("gpt-pipeline-harness-*"))

    ours = main(["--model", str(run_dir), "--task", "mc", "--task-file", str(data)])
    # a run: exported on the fly into a temporary directory, removed afterwards
    theirs = main(["--model", str(run_dir), "--harness", "my_mc", "--harness-include", str(tasks)])
    assert set(scratch.glob("gpt-pipeline-harness-*")) == before
    mc = theirs["my_mc"]
    assert mc["acc"] == ours["acc"] and mc["samples"] == ours["examples"] == len(ROWS)

    # The two acc_norms, from our own per-choice losses: per token (ours, llm.c's) and per
    # character (lm-eval's). They are different numbers on this file, so each is pinned.
    scored = our_choice_losses(model_dir, data)
    by_tokens = np.mean([np.argmin(s / [len(encode(c)) for c in ch]) == y for s, ch, y in scored])
    by_chars = np.mean([np.argmin(s / [len(c) for c in ch]) == y for s, ch, y in scored])
    assert ours["acc_norm"] == pytest.approx(by_tokens)
    assert mc["acc_norm"] == pytest.approx(by_chars) and by_tokens != by_chars
    assert mc["acc"] == pytest.approx(np.mean([np.argmin(s) == y for s, _, y in scored]))
    # and beneath the accuracies, each choice's log-likelihood: lm-eval's hf model on the
    # export (transformers' forward, lm-eval's tokenization) against our summed losses
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8)
    requests = [
        Instance("loglikelihood", doc={}, arguments=(context, choice), idx=i)
        for context, choices, _ in ROWS
        for i, choice in enumerate(choices)
    ]
    theirs_ll = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    for (context, choices, _), (ours_sums, _, _) in zip(ROWS, scored):
        gap = -np.array([next(theirs_ll) for _ in choices]) - ours_sums
        # lm-eval moves a context's trailing whitespace to the front of each choice and
        # scores it too: the same amount added to every choice, so acc does not move
        expected = gap[0] if context != context.rstrip() else 0.0
        assert gap[0] > 1 or expected == 0.0
        np.testing.assert_allclose(gap, expected, atol=1e-4, err_msg=repr(context))

    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["weights"] == str(run_dir / "checkpoints" / "step_000040")
    assert saved["tasks"]["mc"]["acc"] == ours["acc"]  # side by side, neither replaced
    assert set(saved["harness"]) == {"my_mc"} and saved["harness"]["my_mc"]["dtype"] == "float32"


def test_rolling_loglikelihood_is_text_at_stride_context_minus_one(model_dir, tmp_path):
    """lm-eval's rolling log-likelihood scores every token of a document, each window seeing
    up to a context of tokens; --text at stride context-1 does the same with one token less
    of context, so the totals agree closely. At the default stride each window's first
    token goes unscored. An export is read in place."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = Path(json.__file__).read_text(encoding="utf-8")[:6000]  # a real file, 2.3k tokens
    write_text_task(tasks, text)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    theirs = main(
        ["--model", str(model_dir), "--harness", "one_text", "--harness-include", str(tasks)]
    )
    lm_eval_nll = theirs["one_text"]["bits_per_byte"] * len(text.encode("utf-8")) * math.log(2)

    doc = str(tmp_path / "doc.txt")
    context = 64
    strided = main(["--model", str(model_dir), "--text", doc, "--stride", str(context - 1)])
    default = main(["--model", str(model_dir), "--text", doc])
    assert strided["tokens"] == default["tokens"] + math.ceil(strided["tokens"] / context) - 1
    assert abs(strided["loss"] * strided["tokens"] / lm_eval_nll - 1) < 1e-3
    assert "one_text" in json.loads((model_dir / "eval.json").read_text())["harness"]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("not a folder", ["--harness-include", "is not a directory"]),
        (
            "missing data",
            ["could not build the task(s) gone", "Unable to find", "Check the task's YAML"],
        ),
        (
            "hub offline",
            [
                "Couldn't reach 'nobody/nothing'",
                "load_dataset('nobody/nothing')",
                "HF_DATASETS_OFFLINE=1",
                "--harness-include",
            ],
        ),
        ("no lm-eval", ["pip install 'gpt-pipeline[harness]'"]),
        ("with --task", ["give it alone"]),
        ("under a launcher", ["runs in one process", "accelerate launch -m lm_eval"]),
        ("no task name", ["names no task", "--harness hellaswag"]),
        ("context too long", ["context length 65 is not possible", "only be cropped"]),
    ],
)
def test_harness_refusals_are_one_paragraph_and_write_nothing(
    case, expected, model_dir, tmp_path, capsys, monkeypatch
):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = {
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
    }
    absent = {"data_files": {"test": str(tmp_path / "absent.jsonl")}}
    (tasks / "gone.yaml").write_text(
        yaml.safe_dump({"task": "gone", "dataset_path": "json", "dataset_kwargs": absent, **common})
    )
    (tasks / "hub.yaml").write_text(
        yaml.safe_dump({"task": "hub", "dataset_path": "nobody/nothing", **common})
    )
    out = tmp_path / "eval.json"
    argv = ["--model", str(model_dir), "--out", str(out), "--harness-include", str(tasks)]
    if case == "not a folder":
        argv[-1] = str(tmp_path / "x")
        argv += ["--harness", "gone"]
    elif case == "missing data":
        argv += ["--harness", "gone"]
    elif case == "hub offline":  # as under HF_HUB_OFFLINE=1, or with no network after retries
        import datasets
        import huggingface_hub

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        argv += ["--harness", "hub"]
    elif case == "under a launcher":  # as accelerate launch or torchrun would set it
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv += ["--harness", "gone"]
    elif case == "context too long":  # the model has 64 positions
        argv += ["--harness", "gone", "--context-length", "65"]
    elif case == "no task name":
        argv += ["--harness", " , "]
    elif case == "no lm-eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)
        argv += ["--harness", "gone"]
    else:
        argv += ["--harness", "gone", "--task", "mc", "--task-file", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(argv)
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and "Traceback" not in err
    for words in expected:
        assert words in err, err
    assert not out.exists()


def test_an_unknown_task_name_gets_the_closest_ones(model_dir, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    write_mc_task(tasks)
    with pytest.raises(SystemExit):
        main(
            [
                "--model",
                str(model_dir),
                "--harness",
                "my_mcc,hellaswagg",
                "--harness-include",
                str(tasks),
            ]
        )
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(r"'my_mcc' \(did you mean my_mc", err), err
    assert re.search(r"'hellaswagg' \(did you mean hellaswag", err), err
    assert "lm-eval ls tasks" in err and "Traceback" not in err
