"""Metrics of a run: one JSON line per logged step (main process), mirrored to the trackers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from provq.common.files import write_atomic, writing


class JsonlLogger:
    """``metrics.jsonl`` of a run folder; ``truncate_after`` keeps a resumed run's log exact."""

    def __init__(self, path: str | Path, accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so no step appears twice
        (and a line cut short by the kill)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = "".join(line + "\n" for line in self.path.read_text().splitlines() if _logged_step(line) <= step)
        write_atomic(self.path, lambda tmp: tmp.write_text(kept), "the metrics log")  # a kill keeps the old log

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if self.accelerator.is_main_process:
            with writing(self.path, "the metrics log"), self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a partial or foreign line: dropped


def flat_hparams(mapping: dict, prefix: str = "") -> dict:
    """Tracker-friendly flat hyper-parameters (TensorBoard takes scalars and strings only)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


@dataclass
class StepTerms:
    """What a training step reports: ``averaged`` holds this process's values (losses), averaged
    over the processes when logged; ``shared`` holds values every process already agrees on
    (statistics the model reduced itself, the hardness)."""

    averaged: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)


def global_terms(terms: StepTerms, accelerator) -> dict:
    """The logged numbers of the global batch, with one collective for all the averaged ones."""
    logs = {k: v.item() if torch.is_tensor(v) else v for k, v in {**terms.averaged, **terms.shared}.items()}
    names = list(terms.averaged)
    if names and accelerator.num_processes > 1:
        values = torch.stack([torch.as_tensor(terms.averaged[k], device=accelerator.device).float()
                              for k in names])
        logs.update(zip(names, accelerator.reduce(values, "mean").tolist(), strict=True))
    return logs
