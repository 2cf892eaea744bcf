"""Smoke test of `python -m benchmarks --quick`: it runs and writes results of the promised
shape (no speed assertions: the machine is shared)."""
import json

import pytest

from benchmarks.__main__ import main
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
