"""Smoke test of `python -m benchmarks --quick`: it runs and writes results of the promised
shape (no speed assertions: the machine is shared)."""

import json

import pytest

from benchmarks.__main__ import byte_sizes, main
from benchmarks.common import bf16_meaningful

pytest.importorskip("transformers")


@pytest.mark.slow  # end to end: real models, seconds
def test_quick_train_evaluate_and_padding_write_their_tables(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path), "train", "evaluate", "vocab-padding"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert {"cpu", "cores", "torch", "device", "cpu_capability"} <= set(train["machine"])
    # bf16 rows only where bf16 is fast (a GPU, or a CPU with bf16 matrix units)
    precisions = {"fp32", "bf16"} if bf16_meaningful() else {"fp32"}
    assert train["machine"]["bf16_rows"] == ("bf16" in precisions)
    assert set(train["matmul_peak_flops"]) == precisions
    shape = train["shapes"][0]
    # same weights through both models: the same first loss
    assert shape["first_loss"]["hf/fp32"] == pytest.approx(
        shape["first_loss"]["ours/fp32"], abs=1e-4
    )
    rows = {r["contender"]: r for r in shape["rows"]}
    expected = {f"{who}/{p}" for who in ("hf", "ours", "ours-logits") for p in precisions}
    # the quick shape is not compiled; the train stage's own step runs beside the model's
    assert expected | {"hf-fast", "ours-fast", "train stage"} == set(rows)
    assert rows["train stage"]["stage_over_model_step"].endswith("%")
    assert all("-" in r["x_hf_rounds"] for r in rows.values())  # each ratio's spread
    assert {"others_cpu_share", "quiet"} <= set(train["quiet"])  # how busy, recorded
    assert rows["hf-fast"]["x_hf_same_precision"] == 1.0  # ours-fast's reference
    # ours-fast runs in the precision the train stage's `auto` picks here, and says so
    assert rows["ours-fast"]["precision"] == ("bf16" if "bf16" in precisions else "fp32")
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["seconds"]) == shape["repeats"]
    assert rows["hf/fp32"]["x_hf_same_precision"] == 1.0
    evaluate = json.loads((tmp_path / "evaluate.json").read_text())
    assert evaluate["losses_agree"]
    assert [r["contender"] for r in evaluate["rows"]][0] == "evaluate stage"
    padding = json.loads((tmp_path / "vocab-padding.json").read_text())
    rows = [r for shape in padding["shapes"] for r in shape["rows"]]
    assert {r["head_rows"] for r in rows} == {50257, 50304, 50432}
    assert all(r["x_unpadded"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "x_hf_same_precision" in out and "x_unpadded" in out and "wrote" in out


def test_unknown_benchmark_is_named(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["no-such-bench"])
    assert exit.value.code != 0 and "no-such-bench" in capsys.readouterr().err


def test_prepare_sizes_are_read_with_units_and_bad_ones_named(capsys):
    assert byte_sizes("20MB, 1GB,512MiB") == [20_000_000, 10**9, 512 * 2**20]
    with pytest.raises(SystemExit):
        main(["data", "--prepare-sizes", "20XB"])
    assert "'20XB' is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--prepare-sizes", "20MB"])  # would be ignored: refused instead
    assert "option of the data benchmark" in capsys.readouterr().err


def test_huge_corpus_is_real_utf8_text_with_one_single_line_file(tmp_path):
    from benchmarks.data import HUGE_FILES, write_huge_corpus

    files = write_huge_corpus(tmp_path / "a", 1_000_003)
    again = write_huge_corpus(tmp_path / "b", 1_000_003)
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]  # deterministic
    huge = [f for f in files if f.parent == tmp_path / "a"]
    assert len(huge) == HUGE_FILES + 1 and sum(f.stat().st_size for f in huge) == 1_000_003
    single = (tmp_path / "a" / "single_line.txt").read_bytes()
    assert len(single) == 200_000 and b"\n" not in single and b"\r" not in single
    for f in files:
        f.read_bytes().decode("utf-8")  # whole characters only, also where a file is cut
    assert b"def " in huge[0].read_bytes()  # Python sources, not random bytes


@pytest.mark.slow  # end to end: a model step, prepare in-process and in two subprocesses, ~45 s
def test_quick_data_measures_prepare_memory(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path), "data", "--prepare-sizes", "1MB,2MB"])
    data = json.loads((tmp_path / "data.json").read_text())
    assert "cpu_capability" in data["machine"]
    memory = data["prepare_memory"]
    assert [r["corpus_mb"] for r in memory["rows"]] == [1, 2]
    for r in memory["rows"]:
        assert r["peak_process_rss"] == max(r["peak_main_rss"], r["peak_worker_rss"])
        assert r["peak_main_rss"] > 0 and r["peak_tree_rss"] > 0
        assert r["processes"] >= (2 if memory["workers"] > 1 else 1)  # main + workers
        assert r["tokens"] > 0
    assert memory["peak_rss_ratio_largest_to_smallest"] > 0
    assert set(memory) >= {"under_1gib", "flat", "target_met"}
    assert "target" in capsys.readouterr().out


# ---------------------------------------------------------------- time to loss


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    from benchmarks.time_to_loss import crossing

    evals = [
        {"step": 20, "train_s": 10.0, "val_loss": 5.0},
        {"step": 40, "train_s": 20.0, "val_loss": 4.5},
        {"step": 60, "train_s": 32.0, "val_loss": 3.5},
        {"step": 80, "train_s": 40.0, "val_loss": 3.0},
    ]
    # 4.0 is halfway from 4.5 (step 40, 20 s) to 3.5 (step 60, 32 s)
    assert crossing(evals, 4.0) == pytest.approx({"train_s": 26.0, "step": 50.0})
    assert crossing(evals, 6.0) == {"train_s": 10.0, "step": 20.0}  # at the first evaluation
    assert crossing(evals, 2.0) is None  # never reached


def test_our_evaluations_count_training_time_without_evaluation(tmp_path):
    from benchmarks.time_to_loss import Contender, evaluations

    rows = [
        {"step": 10, "step_time": 0.5},
        {"step": 20, "step_time": 1.0, "val_loss": 6.0},
        {"step": 30, "step_time": 0.5},
        {"step": 40, "step_time": 0.5, "val_loss": 5.0},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = evaluations(Contender("ours", "configs/tiny.yaml", "ours"), tmp_path)
    assert got == [
        {"step": 20, "train_s": 15.0, "val_loss": 6.0},
        {"step": 40, "train_s": 25.0, "val_loss": 5.0},
    ]


def test_the_trainer_contender_scores_the_same_tokens_as_our_train_stage(tmp_path):
    """The Trainer's batches carry our targets as shift_labels (its column pruning would
    drop them, and GPT-2 would then learn the token after next), and GPT2LMHeadModel's
    loss on them equals our model's on the same weights and windows."""
    import numpy as np
    import torch
    import transformers
    from helpers import write_data_set

    from benchmarks.hf_trainer import Windows, estimate_windows, gpt2_model, training_arguments
    from pipeline.config import load_config
    from pipeline.data.loader import TokenWindows
    from pipeline.model.gpt import GPTModel
    from pipeline.model.gpt2 import to_hf

    rng = np.random.default_rng(0)
    write_data_set(
        tmp_path / "data" / "d",
        {"train": [rng.integers(0, 50257, 700)], "val": [rng.integers(0, 50257, 300)]},
    )
    config = load_config(
        "configs/tiny.yaml",
        [
            f"data.root={tmp_path / 'data'}",
            "data.name=d",
            "model.context_length=32",
            "model.qkv_bias=true",
            "train.micro_batch_size=4",
            "eval.batches=2",
        ],
    )
    val = Windows(TokenWindows(config.data_dir, "val", 32), range(8))
    hf = gpt2_model(config)
    ours = GPTModel(config.model).eval()
    hf.load_state_dict(to_hf(ours.state_dict(), config.model), strict=False)
    trainer = transformers.Trainer(
        model=hf, eval_dataset=val, args=training_arguments(config, str(tmp_path / "t"), "no")
    )
    batch = next(iter(trainer.get_eval_dataloader()))
    assert set(batch) == {"input_ids", "labels", "shift_labels"}
    x, y = TokenWindows(config.data_dir, "val", 32).batch(np.arange(8))
    assert torch.equal(batch["input_ids"], x[:4]) and torch.equal(batch["shift_labels"], y[:4])
    with torch.no_grad():
        ours_loss = ours(x, targets=y).item()  # all 8 val windows: two eval batches of 4
        assert hf.eval()(**batch).loss.item() == pytest.approx(
            ours(x[:4], targets=y[:4]).item(), abs=1e-5
        )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(ours_loss, abs=1e-5)
    # the Trainer evaluates the windows our train stage's estimate reads: spread over the
    # split (9 windows here, 8 wanted), not its first ones
    assert list(estimate_windows(config, 9)) == [0, 1, 2, 3, 5, 6, 7, 8]


def test_the_performance_page_is_what_the_results_say():
    """docs/performance.md is generated from benchmarks/results/*.json: a hand edit, or
    new results without `make bench-report`, fails here."""
    from benchmarks.common import RESULTS
    from benchmarks.report import PAGE, page

    assert PAGE.read_text() == page(RESULTS), "run `make bench-report`"
    assert "CPU capability **" in PAGE.read_text()  # every figure with its machine


@pytest.mark.slow  # a 5-second sample of the machine
def test_a_busy_neighbour_is_seen_named_and_stops_a_benchmark_before_it_measures():
    """A process outside the benchmark's own tree that holds a core: Watch counts it and
    names it, and `python -m benchmarks` refuses to measure (one line) instead of writing
    a table it would distort. The neighbour is double-forked, so it is nobody's child."""
    import os
    import subprocess
    import sys
    import time

    from benchmarks import quiet

    spin = f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"
    pid = int(subprocess.run(["sh", "-c", spin], capture_output=True, text=True).stdout)
    try:
        watch = quiet.Watch().start()
        time.sleep(1.5)
        sample = watch.stop()
        assert not sample.quiet and sample.others_cpu_s > 0.5, sample
        # named among the busiest others (other test workers may outrank it under xdist)
        assert any(f"({pid})" in name for name, _ in sample.top) or len(sample.top) == 3
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--patience", "1"])
        assert "not measuring train" in str(stopped.value) and "--busy-ok" in str(stopped.value)
    finally:
        os.kill(pid, 9)
