"""Which precision a run trains in: `train.precision: auto` resolved for the machine at hand.

bf16 autocast is only fast where the hardware has bf16 matrix units: GPUs from Ampere on,
and CPUs with AVX512_BF16 or AMX. Elsewhere it is slow: on an AVX2-only CPU one
forward+backward of the 4-layer x 256 model at batch 8 took 174 s in bf16 against 4 s in
fp32 (the bf16 matmuls fall back to scalar kernels). So `auto` picks bf16 where it is
fast, fp16 with loss scaling on GPUs without bf16, and fp32 ("no") elsewhere, and says
why; an explicit bf16 on a CPU without bf16 units is kept (the user asked) with a warning.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Flags in /proc/cpuinfo of x86 CPUs whose bf16 matmuls torch's CPU kernels (oneDNN) run
# on matrix units: AVX512_BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
SLOW_BF16_FACTOR = 40  # measured on an AVX2-only EPYC: 174 s against 4 s (see above)


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 matrix-unit flags this CPU reports (Linux's /proc/cpuinfo); [] when none
    or when the file is not there (another OS: treated as without)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def gpu_has_bf16() -> bool:
    """bf16 in hardware on the current GPU (Ampere on). torch's own check counts the
    emulated bf16 of a V100 or T4 unless told not to, and emulated bf16 is slow."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve(requested: str, device_type: str) -> tuple[str, str]:
    """(precision Accelerate gets: no | bf16 | fp16, the reason in a few words). fp32 is
    the project's spelling of Accelerate's `no` (no autocast), as for stored dtypes."""
    requested = {"fp32": "no"}.get(requested, requested)
    if requested != "auto":
        return requested, "train.precision"
    if device_type == "cuda":
        if gpu_has_bf16():
            return "bf16", "auto: this GPU has bf16"
        return (
            "fp16",
            "auto: this GPU has no bf16 (compute capability below 8.0), fp16 with loss scaling",
        )
    if device_type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bf16", f"auto: this CPU has bf16 matrix units ({', '.join(flags)})"
        return "no", (
            f"auto: this CPU has no bf16 matrix units (capability "
            f"{torch.backends.cpu.get_cpu_capability()}), where bf16 is ~"
            f"{SLOW_BF16_FACTOR}x slower than fp32"
        )
    return "no", f"auto: fp32 on {device_type}"


def slow_bf16_warning(precision: str, device_type: str) -> str | None:
    """A warning when bf16 was asked for on a CPU that will run it many times slower."""
    if precision != "bf16" or device_type != "cpu" or cpu_bf16_flags():
        return None
    return (
        f"warning: train.precision=bf16 on a CPU without bf16 matrix units (capability "
        f"{torch.backends.cpu.get_cpu_capability()}, no {' or '.join(BF16_CPU_FLAGS)} in "
        f"/proc/cpuinfo): bf16 matmuls fall back to slow kernels, ~{SLOW_BF16_FACTOR}x "
        f"slower than fp32 on such a machine. Use train.precision=auto (or no) unless you "
        f"mean to measure exactly this."
    )
