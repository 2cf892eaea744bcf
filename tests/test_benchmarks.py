"""Smoke test of `python -m benchmarks --quick`: it runs and writes results of the promised
shape (no speed assertions: the machine is shared)."""
import json

import pytest

from benchmarks.__main__ import main

pytest.importorskip("transformers")


def test_quick_train_and_evaluate_write_their_tables(tmp_path, capsys):
    main(["--quick", "--out", str(tmp_path), "train", "evaluate"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert {"cpu", "cores", "torch", "device"} <= set(train["machine"])
    assert set(train["matmul_peak_flops"]) == {"fp32", "bf16"}
    shape = train["shapes"][0]
    # same weights through both models: the same first loss
    assert shape["first_loss"]["hf/fp32"] == pytest.approx(shape["first_loss"]["ours/fp32"],
                                                            abs=1e-4)
    rows = {r["contender"]: r for r in shape["rows"]}
    assert {"hf/fp32", "ours/fp32", "hf/bf16", "ours/bf16", "ours-fast"} <= set(rows)
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["seconds"]) == shape["repeats"]
    assert rows["hf/fp32"]["x_hf_same_precision"] == 1.0
    evaluate = json.loads((tmp_path / "evaluate.json").read_text())
    assert evaluate["losses_agree"]
    assert [r["contender"] for r in evaluate["rows"]][0] == "evaluate stage"
    out = capsys.readouterr().out
    assert "x_hf_same_precision" in out and "wrote" in out


def test_unknown_benchmark_is_named():
    with pytest.raises(SystemExit):
        main(["no-such-bench"])
