"""The CPU peak behind MFU: the best figure ever measured is cached per machine and setup,
so that a busy moment at startup cannot shrink the peak (and flatter MFU) silently; the
cache never breaks a run."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.training import mfu

CPU = torch.device("cpu")
MEASURED = 1.0e11  # what the stubbed measurement "finds" now


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """XDG_CACHE_HOME in tmp_path and a cheap, fixed measurement: the path of the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(mfu, "measure_matmul_peak", lambda *a, **k: MEASURED)
    return tmp_path / "gpt-pipeline" / "matmul_peak.json"


def this_key() -> str:
    # the key peak_flops uses for an fp32 run on the CPU
    return mfu.peak_cache_key(torch.float32, 1024, "cpu")


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_the_real_measurement_is_positive_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real = mfu.measure_matmul_peak  # once, small and short: 2 shared cores in CI
    monkeypatch.setattr(
        mfu, "measure_matmul_peak", lambda dtype, size, device: real(dtype, 256, 0.05, device)
    )
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert 0 < peak < float("inf") and source.startswith("measured torch.float32")
    cached = json.loads((tmp_path / "gpt-pipeline" / "matmul_peak.json").read_text())
    assert cached == {this_key(): peak}


def test_first_run_writes_the_measured_figure_atomically(cache):
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == MEASURED
    assert source == "measured torch.float32 matmul on this CPU"
    assert json.loads(cache.read_text()) == {this_key(): MEASURED}
    assert os.listdir(cache.parent) == ["matmul_peak.json"]  # no temp file left behind


def test_a_higher_cached_figure_is_used_and_named(cache):
    write(cache, {this_key(): 1.5e11})
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == 1.5e11
    assert "best known 0.15 TFLOP/s" in source and str(cache) in source
    assert "busy" not in source  # 2/3 of the best: noise, not load
    assert json.loads(cache.read_text()) == {this_key(): 1.5e11}  # not lowered


def test_a_figure_under_half_the_cached_best_warns_of_a_busy_machine(cache):
    write(cache, {this_key(): 1.8e11 * 2})
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == 3.6e11
    assert "measured now 0.1 TFLOP/s, under half the best known" in source
    assert "this machine is busy" in source


def test_a_higher_measurement_replaces_the_cached_one_and_keeps_other_keys(cache):
    write(cache, {this_key(): 0.5e11, "other machine": 9e11})
    peak, _ = mfu.peak_flops(CPU, "no", None)
    assert peak == MEASURED
    assert json.loads(cache.read_text()) == {this_key(): MEASURED, "other machine": 9e11}


def test_a_cached_figure_for_another_setup_is_not_used(cache, monkeypatch):
    write(cache, {this_key(): 9e11})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1234)  # another thread count
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == MEASURED and "best known" not in source
    assert mfu.peak_cache_key(torch.bfloat16, 1024, "cpu") != this_key()  # another dtype


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe{}",
        "[1, 2]",
        "null",
        {"@": -1.0},
        {"@": "NaN"},
        {"@": "1e30"},
        {"@": float("nan")},
        {"@": float("inf")},
        {"@": 0},
        {"@": True},
        {"@": None},
        {"@": [1e12]},
        {"@": 10**400},
    ],
)
def test_a_bad_cache_is_ignored_and_replaced(cache, content):
    if isinstance(content, dict):
        content = json.dumps({this_key(): content["@"]})
    write(cache, content)
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == MEASURED and "best known" not in source
    assert json.loads(cache.read_text()) == {this_key(): MEASURED}


def test_a_cache_dir_that_cannot_be_created_is_ignored(cache, tmp_path, monkeypatch):
    # a regular file where the cache's parent should be: fails for root too, unlike chmod
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    peak, source = mfu.peak_flops(CPU, "no", None)
    assert peak == MEASURED and source == "measured torch.float32 matmul on this CPU"


def test_a_read_only_cache_dir_is_ignored(cache):
    cache.parent.mkdir(parents=True)
    cache.parent.chmod(0o500)  # root writes anyway; the test above covers root
    try:
        peak, _ = mfu.peak_flops(CPU, "no", None)
    finally:
        cache.parent.chmod(0o700)
    assert peak == MEASURED
    assert not [n for n in os.listdir(cache.parent) if n.startswith(".")]  # no temp files


def test_a_relative_or_missing_xdg_cache_home_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert mfu.peak_cache_path() == tmp_path / ".cache" / "gpt-pipeline" / "matmul_peak.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mfu.peak_cache_path() == tmp_path / ".cache" / "gpt-pipeline" / "matmul_peak.json"


def test_the_override_and_gpu_data_sheets_skip_the_measurement(cache, monkeypatch):
    monkeypatch.setattr(mfu, "measure_matmul_peak", lambda *a, **k: pytest.fail("measured"))
    assert mfu.peak_flops(CPU, "bf16", 5e12) == (5e12, "train.peak_flops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert mfu.peak_flops(torch.device("cuda"), "bf16", None) == (
        756e12,
        "NVIDIA H100 PCIe data sheet",
    )
    assert not cache.exists()
