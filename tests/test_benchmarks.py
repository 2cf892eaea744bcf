"""Smoke test of `python -m benchmarks --quick`: it runs and writes results of the promised
shape (no speed assertions: the machine is shared)."""
import json

import pytest

from benchmarks.__main__ import byte_sizes, main
from benchmarks.common import bf16_meaningful

pytest.importorskip("transformers")


@pytest.mark.slow  # end to end: real models, seconds
def test_quick_train_and_evaluate_write_their_tables(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path), "train", "evaluate"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert {"cpu", "cores", "torch", "device", "cpu_capability"} <= set(train["machine"])
    # bf16 rows only where bf16 is fast (a GPU, or a CPU with bf16 matrix units)
    precisions = {"fp32", "bf16"} if bf16_meaningful() else {"fp32"}
    assert train["machine"]["bf16_rows"] == ("bf16" in precisions)
    assert set(train["matmul_peak_flops"]) == precisions
    shape = train["shapes"][0]
    # same weights through both models: the same first loss
    assert shape["first_loss"]["hf/fp32"] == pytest.approx(shape["first_loss"]["ours/fp32"],
                                                            abs=1e-4)
    rows = {r["contender"]: r for r in shape["rows"]}
    expected = {f"{who}/{p}" for who in ("hf", "ours", "ours-logits") for p in precisions}
    assert expected | ({"ours-fast"} if "bf16" in precisions else set()) == set(rows)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["seconds"]) == shape["repeats"]
    assert rows["hf/fp32"]["x_hf_same_precision"] == 1.0
    evaluate = json.loads((tmp_path / "evaluate.json").read_text())
    assert evaluate["losses_agree"]
    assert [r["contender"] for r in evaluate["rows"]][0] == "evaluate stage"
    out = capsys.readouterr().out
    assert "x_hf_same_precision" in out and "wrote" in out


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
