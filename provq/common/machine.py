"""Where a figure was measured: the CPU model and the flags that decide bf16 speed, the threads, torch.

Benchmarks (bench/results_io.py) and the study's ledger (provq/ablation/ledger.py) stamp every figure
with it, so figures from different machines are never mixed in one ratio or pooled unchecked."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU model and the matrix-unit flags that decide bf16 speed (Linux's /proc/cpuinfo).

    ``bf16_units``: True where the CPU computes bf16 itself (AMX or AVX-512 BF16 on x86, the BF16
    extension on Arm), False where the flags were read and show none (torch then emulates bf16: a
    bf16 matmul ran at 0.02x the fp32 rate on an AVX2-only AMD EPYC), None where they could not be read.
    ``units``: the widest of those units in a word (``AMX``, ``AVX-512 BF16``, ``AVX-512``, ``AVX2``...),
    None where unread: one model name ("AMD EPYC") covers CPUs with and without bf16 units, whose
    kernels, speed and last digits differ.
    """
    model, flags, arm = platform.processor() or platform.machine(), None, False
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("flags", "Features") and flags is None:
                flags, arm = set(value.split()), key.strip() == "Features"
    except OSError:
        pass
    units = None if flags is None else vector_units(flags, arm)
    flags = flags or set()
    return {"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "avx512f": "avx512f" in flags, "bf16_units": None if units is None else units in BF16_UNITS,
            "units": units}


# The units of vector_units that compute bf16 themselves.
BF16_UNITS = ("AMX", "AVX-512 BF16", "BF16")


def vector_units(flags: set, arm: bool = False) -> str:
    """The widest matrix or vector unit among a CPU's flags, in a word (BF16_UNITS compute bf16)."""
    if arm:
        return "BF16" if "bf16" in flags else "no BF16"
    named = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
    return next((name for flag, name in named if flag in flags), "no AVX2")


def machine() -> dict:
    """The CPU, torch's version and thread count, and the accelerator (``cpu`` when there is none)."""
    import torch

    cpu = cpu_description()
    return {"cpu": cpu["model"], "cpu_units": cpu.get("units"), "cpu_flags": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
