"""Multiple-choice scoring (HellaSwag as llm.c scores it, and the general jsonl format)
against an independent computation with transformers' GPT2LMHeadModel on the same weights."""

import json

import pytest
import torch
import torch.nn.functional as F
from train_runs import two_cpu_processes

from pipeline.data.tokenizer import encode
from pipeline.evaluate import main
from pipeline.training.tasks import read_examples

transformers = pytest.importorskip("transformers")

ROWS = [  # HellaSwag's val structure: ctx = ctx_a + " " + ctx_b
    (
        "A man is sitting on a roof.",
        "he",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing.",
        ],
    ),
    (
        "A woman pours flour into a bowl.",
        "She",
        [
            "cracks two eggs into it.",
            "throws the bowl at the wall.",
            "begins to sing loudly.",
            "paints the ceiling blue.",
        ],
    ),
    (
        "Two kids ride bikes down a hill.",
        "they",
        [
            "reach the bottom and stop.",
            "fly into the clouds.",
            "turn into fish.",
            "read a newspaper together.",
        ],
    ),
    (
        "A chef slices an onion on a board.",
        "He",
        [
            "puts the pieces into a hot pan.",
            "swims across the lake.",
            "plays the violin.",
            "climbs a tree slowly.",
        ],
    ),
    (
        "Naïve café owners open the shop — early.",
        "They",
        [
            "unlock the door and turn on the lights.",
            "launch a rocket.",
            "eat the chairs.",
            "count to a million.",
        ],
    ),
]


def write_hellaswag(path, labels=(3, 0, 0, 0, 0)):
    with open(path, "w") as f:
        for i, ((a, b, endings), label) in enumerate(zip(ROWS, labels)):
            f.write(
                json.dumps(
                    {
                        "ind": i,
                        "activity_label": "test",
                        "ctx_a": a,
                        "ctx_b": b,
                        "ctx": f"{a} {b}",
                        "split": "val",
                        "split_type": "indomain",
                        "label": label,
                        "endings": endings,
                        "source_id": f"test~{i}",
                    }
                )
                + "\n"
            )


def hf_model(tmp_path, tie: bool):
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tie
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def reference(model, path, losses_out=None) -> dict:
    """llm.c's rule written out: per ending, the summed and the mean loss of its tokens
    after the context, with a space before the ending; the lowest wins."""
    right = right_norm = n = 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        ctx = encode(row["ctx"])
        sums, means = [], []
        for ending in row["endings"]:
            end = encode(" " + ending)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")[-len(end) :]
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        if losses_out is not None:
            losses_out.append((sums, means))
        right += min(range(4), key=sums.__getitem__) == row["label"]
        right_norm += min(range(4), key=means.__getitem__) == row["label"]
        n += 1
    return {"acc": right / n, "acc_norm": right_norm / n, "examples": n}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hellaswag_scores_equal_an_independent_transformers_computation(tmp_path, tie, capsys):
    model = hf_model(tmp_path, tie)
    task = tmp_path / "hellaswag_val.jsonl"
    write_hellaswag(task)
    per_choice = []
    expected = reference(model, task, per_choice)
    from pipeline.model.weights import load_model
    from pipeline.training.tasks import choice_losses, choice_rows

    ours, _ = load_model(tmp_path / "hf")
    for example, (sums, means) in zip(read_examples(task, "hellaswag"), per_choice):
        got_sums, got_means = choice_losses(ours, choice_rows(example, 64), torch.device("cpu"))
        torch.testing.assert_close(got_sums, torch.tensor(sums), atol=1e-4, rtol=0)
        torch.testing.assert_close(got_means, torch.tensor(means), atol=1e-5, rtol=0)
    got = main(
        [
            "--model",
            str(tmp_path / "hf"),
            "--task",
            "hellaswag",
            "--task-file",
            str(task),
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert {k: got[k] for k in expected} == expected
    saved = json.loads((tmp_path / "eval.json").read_text())["tasks"]["hellaswag"]
    assert saved["acc_norm"] == expected["acc_norm"] and saved["examples"] == 5
    # the same examples in the general format give the same numbers
    mc = tmp_path / "mine.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"context": ex.context, "choices": list(ex.choices), "label": ex.label})
            + "\n"
            for ex in read_examples(task, "hellaswag")
        )
    )
    got_mc = main(
        [
            "--model",
            str(tmp_path / "hf"),
            "--task",
            "mc",
            "--task-file",
            str(mc),
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert {k: got_mc[k] for k in expected} == expected
    tasks = json.loads((tmp_path / "eval.json").read_text())["tasks"]
    assert set(tasks) == {"hellaswag", "mc"}  # results sit side by side


def test_a_bad_task_line_is_named(tmp_path, capsys):
    hf_model(tmp_path, True)
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        '{"context": "a", "choices": ["b", "c"], "label": 0}\n'
        '{"context": "a", "choices": ["b"], "label": 0}\n'
    )
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "hf"), "--task", "mc", "--task-file", str(bad)])
    err = " ".join(capsys.readouterr().err.split())
    assert "mine.jsonl line 2 is not a mc example" in err and "Traceback" not in err


def test_the_downloaded_task_file_is_refused_when_its_sha256_differs(tmp_path, capsys, monkeypatch):
    hf_model(tmp_path, True)
    served = tmp_path / "served" / "hellaswag_val.jsonl"
    served.parent.mkdir()
    write_hellaswag(served)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = [
        "--model",
        str(tmp_path / "hf"),
        "--task",
        "hellaswag",
        "--task-url",
        served.as_uri(),
        "--out",
        str(tmp_path / "eval.json"),
    ]
    with pytest.raises(SystemExit):
        main([*args, "--task-sha256", "0" * 63 + "1"])
    err = " ".join(capsys.readouterr().err.split())
    assert "HellaSwag's val file" in err and "sha256" in err and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.jsonl"))  # nothing kept
    from pipeline.core.fileio import file_sha256

    got = main([*args, "--task-sha256", file_sha256(served)])
    assert got["examples"] == 5 and list((tmp_path / "cache").rglob("*.jsonl"))


@pytest.mark.parametrize(
    "line,words",
    [
        ('{"context": "", "choices": ["b", "c"], "label": 0}', ["context must be non-empty text"]),
        ('{"context": "a", "choices": ["b", ""], "label": 0}', ["at least two non-empty texts"]),
        ('{"context": "a", "choices": ["b", "c"], "label": true}', ["label True is not an index"]),
    ],
)
def test_task_examples_that_cannot_be_scored_honestly_are_refused(tmp_path, capsys, line, words):
    hf_model(tmp_path, True)
    bad = tmp_path / "mine.jsonl"
    bad.write_text(line + "\n")
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "hf"), "--task", "mc", "--task-file", str(bad)])
    err = " ".join(capsys.readouterr().err.split())
    assert all(w in err for w in words) and "Traceback" not in err, err


def test_a_task_file_is_held_to_its_pinned_sha256(tmp_path, capsys):
    from pipeline.core.fileio import file_sha256

    hf_model(tmp_path, True)
    task = tmp_path / "hellaswag_val.jsonl"
    write_hellaswag(task)
    args = ["--model", str(tmp_path / "hf"), "--task", "hellaswag", "--task-file", str(task)]
    with pytest.raises(SystemExit):
        main([*args, "--task-sha256", "0" * 64])
    assert "it is not the pinned file" in " ".join(capsys.readouterr().err.split())
    assert main([*args, "--task-sha256", file_sha256(task).upper()])["examples"] == 5


def test_many_choices_are_scored_in_bounded_forwards_with_the_same_result(tmp_path):
    from pipeline.model.weights import load_model
    from pipeline.training.tasks import Example, score_examples

    hf_model(tmp_path, True)
    ours, _ = load_model(tmp_path / "hf")
    example = Example("The cat sat on the", tuple(f" word{i}" for i in range(100)), 7)
    seen = []
    hook = ours.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    counts = score_examples(ours, [example], 64, torch.device("cpu"), batch_examples=2)
    hook.remove()
    assert max(seen) == 8 and sum(seen) == 100  # rows per forward stay bounded
    from pipeline.training.tasks import choice_losses, choice_rows

    sums, _ = choice_losses(ours, choice_rows(example, 64), torch.device("cpu"))
    assert counts[0].item() == float(int(sums.argmin()) == 7)


def test_a_second_evaluate_keeps_the_task_results_of_the_same_weights(tmp_path):
    from pipeline.model.weights import resolve

    hf_model(tmp_path, True)
    task = tmp_path / "hellaswag_val.jsonl"
    write_hellaswag(task)
    out = tmp_path / "eval.json"
    main(
        [
            "--model",
            str(tmp_path / "hf"),
            "--task",
            "hellaswag",
            "--task-file",
            str(task),
            "--out",
            str(out),
        ]
    )
    from helpers import write_data_set

    write_data_set(tmp_path / "data", {"train": [list(range(200))], "val": [list(range(200))]})
    main(["--model", str(tmp_path / "hf"), "--data", str(tmp_path / "data"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert "loss" in record and record["tasks"]["hellaswag"]["examples"] == 5
    from pipeline.evaluate import earlier_results

    other = resolve(tmp_path / "hf")
    other.path = tmp_path / "elsewhere"
    assert earlier_results(out, other) is None  # another model's results are not merged


@pytest.mark.parametrize("stride", [1, 32, 64])  # 1, context / 2, context
def test_text_perplexity_equals_the_hugging_face_guides_sliding_window(tmp_path, stride):
    model = hf_model(tmp_path, True)
    text = tmp_path / "wiki.txt"
    sentences = 8 if stride == 1 else 20  # stride 1: a forward per token, so a shorter text
    text.write_text(
        " ".join(f"Sentence {i} is about the number {i * 7 % 13}." for i in range(sentences))
    )
    from pipeline.data.tokenizer import EOT_ID

    ids = torch.tensor([[EOT_ID, *encode(text.read_text())]])
    max_length, nll_sum, n_tokens, prev_end = 64, 0.0, 0, 0  # the guide's loop, verbatim rules
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    got = main(
        [
            "--model",
            str(tmp_path / "hf"),
            "--text",
            str(text),
            "--stride",
            str(stride),
            "--out",
            str(tmp_path / "ppl.json"),
        ]
    )
    assert got["tokens"] == n_tokens
    # A smaller stride scores every token but the first; stride = context skips the first
    # token of each window (it has no context there), as the guide does.
    assert n_tokens == (ids.size(1) - 1 if stride < 64 else ids.size(1) - -(-ids.size(1) // 64))
    assert got["loss"] == pytest.approx(nll_sum / n_tokens, abs=1e-5)


@pytest.mark.slow
def test_two_processes_score_a_task_as_one(tmp_path, free_port):
    """Each process a disjoint share (5 examples: 3 and 2), the counts summed once."""
    import os
    import subprocess
    from pathlib import Path

    hf_model(tmp_path, False)
    task = tmp_path / "hellaswag_val.jsonl"
    write_hellaswag(task, labels=(0, 1, 2, 3, 0))
    args = [
        "--model",
        str(tmp_path / "hf"),
        "--task",
        "hellaswag",
        "--task-file",
        str(task),
        "--batch-size",
        "2",
    ]
    single = main([*args, "--out", str(tmp_path / "one.json")])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [
        *two_cpu_processes(free_port()),
        "pipeline.evaluate",
        *args,
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
    double = json.loads((tmp_path / "two.json").read_text())["tasks"]["hellaswag"]
    assert done.stdout.count("hellaswag: acc") == 1
    assert {k: double[k] for k in ("acc", "acc_norm", "examples")} == {
        k: single[k] for k in ("acc", "acc_norm", "examples")
    }


def test_every_process_makes_as_many_forwards_as_the_busiest(tmp_path):
    """500 examples over 8 processes at batch 2: shares of 63 and 62 examples need 32 and
    31 forwards; under FSDP each forward is a collective, so the lighter one pads."""
    from pipeline.model.weights import load_model
    from pipeline.training.tasks import Example, forwards_needed, score_examples

    examples = [Example("Once upon a time", (" a", " b", " c", " d"), i % 4) for i in range(500)]
    shares = [examples[rank::8] for rank in range(8)]
    needed = [forwards_needed(share, 2) for share in shares]
    assert (min(needed), max(needed)) == (31, 32)
    hf_model(tmp_path, True)
    ours, _ = load_model(tmp_path / "hf")
    seen = []
    hook = ours.register_forward_hook(lambda m, i, o: seen.append(1))
    light = shares[-1]
    plain = score_examples(ours, light, 64, torch.device("cpu"), batch_examples=2)
    seen.clear()
    padded = score_examples(ours, light, 64, torch.device("cpu"), batch_examples=2, forwards=32)
    hook.remove()
    assert len(seen) == 32 and torch.equal(plain, padded)  # the padding counts for nothing
