"""Where a figure was measured: the CPU model and the flags that decide bf16 speed, the threads, torch.

Benchmarks (bench/results_io.py) and the study's ledger (provq/ablation/ledger.py) stamp every figure
with it, so figures from different machines are never mixed in one ratio or pooled unchecked."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_description() -> dict:
    """The CPU model and the matrix-unit flags that decide bf16 speed (Linux's /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "avx512f": "avx512f" in flags}


def machine() -> dict:
    """The CPU, torch's version and thread count, and the accelerator (``cpu`` when there is none)."""
    import torch

    cpu = cpu_description()
    return {"cpu": cpu["model"], "cpu_flags": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
