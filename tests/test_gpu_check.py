"""`make gpu-check`'s CPU mode: every step of the GPU check on tiny shapes, so the check
keeps working while nobody has a GPU. FSDP with compile is left to tests/test_fsdp.py
(its compiled worker samples after a backward): compiling costs ~35 s here."""

import json

import pytest

from benchmarks.gpu_check import STEPS, main


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path, stdlib_data, capsys):
    steps = [name for name, _, _ in STEPS if name != "fsdp-compile"]
    args = ["--cpu", "--out", str(tmp_path), "--data-root", str(stdlib_data)]
    result = main([*args, "--data-name", "stdlib", "--budget", "600", "--only", *steps])
    rows = {r["check"]: r for r in result["rows"]}
    failed = {name: r["detail"] for name, r in rows.items() if r["status"] == "FAIL"}
    assert not failed
    assert rows["fp16-loss-scaling"]["status"] == "SKIP"  # loss scaling needs a GPU
    expected = {
        "logits-fp32-vs-transformers",
        "fused-head-gradients-bf16",
        "fused-head-gradients-fp16",
        "resume-vs-uninterrupted",
        "fsdp2-vs-without",
        "generate-vs-transformers",
        "evaluate-cpu-vs-cpu",
        "124m-ours-over-transformers",
    }
    assert all(rows[name]["status"] == "PASS" for name in expected)
    assert rows["vocab-padding-gain"]["numbers"]["gain"] > 0
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved["counts"]["FAIL"] == 0 and saved["device"] == "cpu"
    table = (tmp_path / "gpu-check.md").read_text()
    assert "| PASS | resume-vs-uninterrupted |" in table
