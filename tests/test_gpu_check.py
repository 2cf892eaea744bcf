"""`make gpu-check`'s CPU mode: the GPU check's steps on tiny shapes, so the check keeps
working while nobody has a GPU (`python -m benchmarks.gpu_check --cpu` runs all of them)."""

import json

import pytest

from benchmarks.gpu_check import STEPS, main

# Steps that launch processes of their own, left to the tests of what they launch:
# tests/test_fsdp.py (FSDP2 against DDP, and a compiled sharded worker that samples after a
# backward; compiling costs ~35 s here) and tests/test_evaluate.py (one process and two
# give the same numbers). On a CPU the evaluate step compares the CPU with itself.
SECOND_PROCESS = {"fsdp", "fsdp-compile", "evaluate"}


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path, stdlib_data, capsys):
    steps = [name for name, _, _ in STEPS if name not in SECOND_PROCESS]
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
        "generate-vs-transformers",
        "124m-ours-over-transformers",
    }
    assert all(rows[name]["status"] == "PASS" for name in expected)
    assert rows["vocab-padding-gain"]["numbers"]["gain"] > 0
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved["counts"]["FAIL"] == 0 and saved["device"] == "cpu"
    table = (tmp_path / "gpu-check.md").read_text()
    assert "| PASS | resume-vs-uninterrupted |" in table
