"""How every benchmark hands back its figures: one JSON file (folders made as needed), also printed,
with the CPU it ran on, so figures from different machines are never mixed in one ratio."""

from __future__ import annotations

import json
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


def write_result(result: dict, out: str | Path) -> dict:
    result = {**result, "cpu": result.get("cpu", cpu_description())}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
