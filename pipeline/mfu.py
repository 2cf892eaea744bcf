"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

MFU = flops_per_token (6N + 12·L·d·T, see model.flops_per_token) × tokens/s per device
/ peak FLOP/s of the device. Peaks of known GPUs are dense (no sparsity) figures from
the vendors' data sheets; `train.peak_flops` overrides them, and on a CPU, which has no
data sheet figure that means anything, the peak is measured with a large matmul.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

# Dense peak FLOP/s: (bf16/fp16 tensor cores, fp32 without TF32).
GPU_PEAKS = {
    "H200": (989e12, 67e12),
    "H100 NVL": (835e12, 60e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "A100": (312e12, 19.5e12),
    "A10G": (125e12, 31.2e12),
    "A10": (125e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def gpu_peak_flops(device_name: str, low_precision: bool) -> float | None:
    """Peak of a known GPU by the name CUDA reports, or None."""
    for key, (half, single) in GPU_PEAKS.items():  # longest names first in the table
        if key in device_name:
            return half if low_precision else single
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024,
                        seconds: float = 0.5, device: str = "cpu") -> float:
    """FLOP/s of a square matmul on this device: a practical peak for MFU on CPUs.
    The best of many short timings, so that a busy moment does not lower the peak."""
    # A private generator: drawing from the global one would shift a resumed run's dropout.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device).to(dtype)
    b = torch.randn(size, size, generator=gen, device=device).to(dtype)
    c = a @ b  # warm-up; then into the same output: allocating 4 MB each time would
    # time the allocator's page faults too, and differently in every process
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, precision: str, override: float | None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from)."""
    if override:
        return override, "train.peak_flops"
    low = precision in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, low)
        if peak:
            return peak, f"{name} data sheet"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cpu":
        return measure_matmul_peak(dtype), f"measured {dtype} matmul on this CPU"
    return measure_matmul_peak(dtype, size=4096, device=device.type), "measured matmul"


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512_BF16 or AMX), where bf16
    autocast is faster than fp32. Without them (AVX2-only CPUs, most laptops) torch's bf16
    matmuls take slow paths: one step of a 4-layer model measured ~40x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, so do not promise speed
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float) -> float:
    return flops_per_token * tokens_per_s_per_device / peak
