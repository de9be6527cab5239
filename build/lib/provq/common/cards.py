"""Model cards: the README.md of an exported model folder, with Hugging Face metadata (library,
tags, datasets, license, model-index metrics), written and read through huggingface_hub.ModelCard.

Each metric keeps its protocol (split, image count, resolution, extractor checksum, ...) in the
model-index's ``metric_args``, so a card can be re-rendered, and merged with later evaluations,
from the card alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CARD_NAME = "README.md"
LIBRARY_NAME = "provq"
LICENSE = "mit"  # the project's; the weights inherit their training data's terms too (said in the card)


@dataclass
class CardMetric:
    """One measured number and how it was measured."""

    name: str  # rfid, psnr, ssim, codebook_usage, bits_per_code, gfid, ...
    value: float
    split: str = "test"
    dataset: str = "unknown"
    protocol: dict = field(default_factory=dict)  # images, resolution, extractor checksum, command, ...


@dataclass
class CardContent:
    """What a model class says about itself: title, summary lines, tags and the lines that load it."""

    title: str
    task: str  # the model-index task_type
    summary: list[str]  # markdown bullet lines
    tags: list[str]
    load: str  # python code


def render(content: CardContent, metrics: list[CardMetric], datasets: list[str]):
    """A huggingface_hub.ModelCard of ``content`` with ``metrics`` in its model-index and a table."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [EvalResult(task_type=content.task, dataset_type=m.dataset, dataset_name=m.dataset,
                          dataset_split=m.split, metric_type=m.name, metric_value=m.value,
                          metric_args=dict(m.protocol)) for m in metrics]
    data = ModelCardData(library_name=LIBRARY_NAME, license=LICENSE, tags=content.tags,
                         datasets=datasets or None, eval_results=results or None,
                         model_name=content.title)
    table = ["| metric | value | split | protocol |", "|---|---|---|---|"]
    table += [f"| {m.name} | {m.value:.6g} | {m.dataset} / {m.split} | "
              + ", ".join(f"{k} {v}" for k, v in m.protocol.items()) + " |" for m in metrics]
    body = [f"# {content.title}", "", *content.summary, "", "## Metrics", "",
            *(table if metrics else ["No evaluation recorded yet (`python -m eval ... --card FOLDER` adds one)."]),
            "", "## Load it", "", "```python", content.load, "```", "",
            "Trained with the provq code (progressive quantization, "
            "[arXiv 2603.22304](https://arxiv.org/abs/2603.22304)). "
            f"License field: {LICENSE} (the code's); the weights also carry the terms of the data they "
            "were trained on.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def read_card(folder: str | os.PathLike) -> tuple[list[CardMetric], list[str]]:
    """The metrics and datasets of a folder's card; none when the folder has no card."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return [], []
    card = ModelCard.load(path, ignore_metadata_errors=True)
    metrics = [CardMetric(r.metric_type, r.metric_value, r.dataset_split or "", r.dataset_name,
                          dict(r.metric_args or {})) for r in (card.data.eval_results or [])]
    datasets = card.data.datasets or []
    return metrics, [datasets] if isinstance(datasets, str) else list(datasets)


def dataset_name(dataset: str) -> str:
    """How a card names a dataset: a hub name or "emoji" as is, a folder by its last component."""
    path = Path(dataset)
    return path.name if path.is_dir() else dataset


def merged(old: list[CardMetric], new: list[CardMetric]) -> list[CardMetric]:
    """``old`` with every (metric, dataset, split) that ``new`` measures again replaced."""
    keys = {(m.name, m.dataset, m.split) for m in new}
    return [m for m in old if (m.name, m.dataset, m.split) not in keys] + list(new)
