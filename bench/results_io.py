"""How every benchmark hands back its figures: one JSON file (folders made as needed), also printed,
with the CPU it ran on, so figures from different machines are never mixed in one ratio."""

from __future__ import annotations

import json
from pathlib import Path

from provq.common.machine import machine


def write_result(result: dict, out: str | Path) -> dict:
    where = machine()
    result = {**result, "cpu": result.get("cpu", where["cpu_flags"]), "torch": where["torch"],
              "threads": where["threads"], "device": where["device"]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
