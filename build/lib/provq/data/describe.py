"""`python -m provq.data describe`: one JSON object summarising a dataset's splits, labels and files."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys

from tqdm import tqdm

from provq.common.cli import CommandParser

from .config import DataConfig
from .dataset import resolve_source
from .images import open_rgb
from .sources import DatasetError, DatasetNotFoundError, Source


def scan_sizes(source: Source, desc: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Decode every file (that is the only way to catch truncation): sizes and bad names."""
    sizes, unreadable = [], []
    for index in tqdm(range(len(source)), desc=desc, file=sys.stderr, leave=False):
        try:
            sizes.append(open_rgb(source.payloads[index]).size)
        except Exception:  # any decoder error marks the file unreadable
            unreadable.append(source.names[index])
    return sizes, unreadable


def size_summary(sizes: list[tuple[int, int]]) -> str | dict | None:
    if not sizes:
        return None
    if len(set(sizes)) == 1:
        return "{}x{}".format(*sizes[0])
    widths, heights = zip(*sizes, strict=True)
    return {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)],
            "distinct_sizes": len(set(sizes))}


def describe_split(config: DataConfig, role: str) -> tuple[dict, list[str], list]:
    source = resolve_source(config, role)
    if source.sizes is not None:  # the emoji build decoded every bitmap already
        sizes, unreadable = source.sizes, []
    else:
        sizes, unreadable = scan_sizes(source, f"scanning {role} images")
    counts = collections.Counter(source.labels)
    label_counts = {name: counts.get(i, 0) for i, name in enumerate(source.label_names)}
    if counts.get(-1):
        label_counts["(unlabelled)"] = counts[-1]
    split = {"split": getattr(config, f"{role}_split"), "images": len(source),
             "label_counts": label_counts, "skipped": len(unreadable),
             "resolution_on_disk": size_summary(sizes)}
    if unreadable:
        split["skipped_examples"] = unreadable[:5]
    return split, source.label_names, sizes


def describe(config: DataConfig) -> dict:
    splits, label_names, all_sizes = {}, [], []
    for role in ("train", "test"):
        try:
            splits[role], names, sizes = describe_split(config, role)
        except DatasetNotFoundError:
            raise
        except DatasetError as error:  # e.g. a hub dataset without a test split
            splits[role] = {"split": getattr(config, f"{role}_split"), "error": str(error)}
            continue
        label_names = label_names or names
        all_sizes += sizes
    return {"dataset": config.dataset, "load_resolution": config.resolution,
            "images": sum(s.get("images", 0) for s in splits.values()),
            "num_classes": len(label_names), "label_names": label_names, "splits": splits,
            "resolution_on_disk": size_summary(all_sizes),
            "skipped": sum(s.get("skipped", 0) for s in splits.values())}


def _optional(text: str) -> str | None:
    return None if text.lower() in ("none", "null", "") else text


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m provq.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    describe_parser = commands.add_parser("describe", help="print one JSON summary of a dataset")
    for field in dataclasses.fields(DataConfig):
        convert = int if field.type == "int" else _optional if "None" in field.type else str
        describe_parser.add_argument(f"--{field.name}", type=convert, default=field.default)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    config = DataConfig(**{k: v for k, v in vars(args).items() if k in fields})
    config.in_memory = False  # describing never needs decoded tensors
    print(json.dumps(describe(config), indent=2, ensure_ascii=False))
    return 0
