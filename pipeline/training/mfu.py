"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

MFU = flops_per_token (6N + 12·L·d·T, see model.flops_per_token) × tokens/s per device
/ peak FLOP/s of the device. Peaks of known GPUs are dense (no sparsity) figures from
the vendors' data sheets; `train.peak_flops` overrides them, and on a CPU, which has no
data sheet figure that means anything, the peak is measured with a large matmul.
A measurement taken while the machine is busy comes out low and would flatter MFU, so the
best figure ever measured is kept per machine and setup in
`$XDG_CACHE_HOME/gpt-pipeline/matmul_peak.json` and used when higher; a figure measured now
under half of it is reported as a busy machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.core.fileio import atomic_write_json

# Dense peak FLOP/s: (bf16/fp16 tensor cores, fp32 without TF32).
GPU_PEAKS = {
    "H200 NVL": (835e12, 60e12),
    "H200": (989e12, 67e12),
    "H100 NVL": (835e12, 60e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),  # SXM
    "A100": (312e12, 19.5e12),
    "A10G": (125e12, 31.2e12),
    "A10": (125e12, 31.2e12),
    "L40S": (362e12, 91.6e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def gpu_peak_flops(device_name: str, low_precision: bool) -> float | None:
    """Peak of a known GPU by the name CUDA reports, or None. A key matches as whole
    words ("L4" not inside "L40", "H200" not for "H200 NVL": the longest match wins)."""
    import re

    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            half, single = GPU_PEAKS[key]
            return half if low_precision else single
    return None


def measure_matmul_peak(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5, device: str = "cpu"
) -> float:
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
        return best_known_peak(dtype, 1024, "cpu", f"measured {dtype} matmul on this CPU")
    return best_known_peak(dtype, 4096, device.type, "measured matmul")


def best_known_peak(
    dtype: torch.dtype, size: int, device_type: str, source: str
) -> tuple[float, str]:
    """The matmul peak measured now or the best one cached for this setup, whichever is
    higher: load only lowers a measurement, so the higher one is nearer the true peak."""
    measured = measure_matmul_peak(dtype, size=size, device=device_type)
    path, key = peak_cache_path(), peak_cache_key(dtype, size, device_type)
    cache = read_peak_cache(path) if path else {}
    best = cache.get(key, 0.0)
    if measured > best:
        if path:
            cache[key] = measured
            write_peak_cache(path, cache)
        return measured, source
    source += f" (best known {best / 1e12:.3g} TFLOP/s, from {_shown(path)})"
    if measured < best / 2:  # more than noise: something else holds the cores now
        source += (
            f"; measured now {measured / 1e12:.3g} TFLOP/s, under half the best "
            f"known: this machine is busy, so this run's speed is lower than it can be"
        )
    return best, source


def peak_cache_path() -> Path | None:
    """Where the best peaks are kept (XDG cache dir), or None when there is no home."""
    env = os.environ.get("XDG_CACHE_HOME", "")
    try:  # the XDG spec says to ignore a relative XDG_CACHE_HOME
        root = Path(env) if os.path.isabs(env) else Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry: run without the cache
        return None
    return root / "gpt-pipeline" / "matmul_peak.json"


def peak_cache_key(dtype: torch.dtype, size: int, device_type: str) -> str:
    """Everything that changes the measured figure: another CPU, instruction set, thread
    count, dtype, size, device or torch build gives another peak, never a comparable one."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    parts = [
        processor_name(),
        capability,
        f"{torch.get_num_threads()} threads",
        str(dtype),
        f"{size}x{size}",
        device_type,
        f"torch {torch.__version__}",
    ]
    if device_type == "cuda":  # the GPU, not the host CPU, sets this figure
        parts.insert(0, torch.cuda.get_device_name())
    return " | ".join(parts)


def read_peak_cache(path: Path) -> dict[str, float]:
    """The cache's valid entries; anything unreadable counts as no cache, since a cache
    must never stop a run (a corrupt file is replaced on the next write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not JSON, not UTF-8
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if _positive_finite(v)}


def write_peak_cache(path: Path, cache: dict[str, float]) -> None:
    """Write atomically (readers in other runs see the old file or the new one); a cache
    dir that cannot be created or written only means the figure is not remembered."""
    try:
        atomic_write_json(path, cache)
    except OSError:
        pass


def _positive_finite(value) -> bool:
    # bool is an int to Python but no FLOP/s; NaN and inf fail isfinite, huge ints overflow
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def processor_name() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shown(path: Path) -> str:
    """The path as people write it: ~/… under the home directory."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except (ValueError, RuntimeError):
        return str(path)


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float) -> float:
    return flops_per_token * tokens_per_s_per_device / peak
