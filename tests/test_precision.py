"""train.precision: auto picks bf16 only where the hardware has bf16 units (a CPU without
them runs bf16 ~40x slower than fp32), and an explicit bf16 there is warned about."""

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.training import precision

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\n"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_the_bf16_units_are_read_from_the_cpu_flags():
    assert precision.cpu_bf16_flags(AVX2_ONLY) == []
    assert precision.cpu_bf16_flags(SAPPHIRE) == ["avx512_bf16", "amx_bf16"]
    assert precision.cpu_bf16_flags("") == []


@pytest.mark.parametrize("flags, expected", [([], "no"), (["avx512_bf16"], "bf16")])
def test_auto_on_a_cpu_picks_bf16_only_with_bf16_units(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: flags)
    chosen, why = precision.resolve("auto", "cpu")
    assert chosen == expected
    assert ("avx512_bf16" in why) if flags else ("no bf16 matrix units" in why and "40x" in why)


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_a_gpu_picks_bf16_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert precision.resolve("auto", "cuda")[0] == expected


def test_auto_on_a_gpu_with_only_emulated_bf16_picks_fp16(monkeypatch):
    """A V100 or T4: torch.cuda.is_bf16_supported() says True by counting emulation."""
    from pipeline.training.muon import fast_orthogonalize_dtype

    def v100(including_emulation: bool = True) -> bool:
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", v100)
    assert precision.resolve("auto", "cuda")[0] == "fp16"
    assert fast_orthogonalize_dtype("cuda") == "float32"


def test_an_explicit_choice_is_kept_and_bf16_on_a_slow_cpu_is_warned_about(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: [])
    for chosen in ("no", "bf16", "fp16"):
        assert precision.resolve(chosen, "cpu") == (chosen, "train.precision")
    warning = precision.slow_bf16_warning("bf16", "cpu")
    assert "~40x slower" in warning and "train.precision=auto" in warning
    assert precision.slow_bf16_warning("no", "cpu") is None
    assert precision.slow_bf16_warning("bf16", "cuda") is None
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    assert precision.slow_bf16_warning("bf16", "cpu") is None


def test_auto_is_a_valid_value_and_the_shipped_configs_use_it():
    assert load_config(None, ["train.precision=auto"]).train.precision == "auto"
    for name in ("tiny", "gpt2-124m", "gpt2-finetune"):
        assert load_config(CONFIGS / f"{name}.yaml").train.precision == "auto", name
    # The book's run is fp32 on every machine, as the book's.
    assert load_config(CONFIGS / "verdict.yaml").train.precision == "no"


@pytest.mark.parametrize("enabled", [True, False])
def test_train_tf32_sets_the_matmul_flags_torch_reads(enabled):
    from pipeline.train import use_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        use_tf32(load_config(None, [f"train.tf32={str(enabled).lower()}"]).train.tf32)
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cudnn.allow_tf32 is enabled
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
