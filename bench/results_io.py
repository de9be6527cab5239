"""How every benchmark hands back its figures: one JSON file (folders made as needed), also printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(result: dict, out: str | Path) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
