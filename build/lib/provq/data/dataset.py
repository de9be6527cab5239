"""load_split -> ImageDataset (a torch Dataset), plus collate and SkipTracker for bad files."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from tqdm import tqdm

from provq.common.errors import ConfigError

from .config import DataConfig
from .images import (
    flip_bit,
    item_rng,
    open_rgb,
    resize_center_crop,
    resize_random_crop,
    to_uint8_chw,
)
from .pixels import to_float
from .sources import (
    DatasetError,
    DatasetNotFoundError,
    SelectedPayloads,
    Source,
    digest,
    emoji_source,
    folder_source,
    hub_source,
    split_name,
    unknown_dataset_message,
)

IN_MEMORY_LIMIT_BYTES = 1 << 30
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_source(config: DataConfig, split: str) -> Source:
    """The Source of one split, after class_subset; clear errors for unknown or empty data."""
    name = split_name(config, split)
    if config.dataset == "emoji":
        source = emoji_source(config, name)
    elif Path(config.dataset).expanduser().is_dir():
        source = folder_source(config, name)
    elif _looks_like_path(config.dataset):
        raise DatasetNotFoundError(unknown_dataset_message(config.dataset, "no such folder"))
    else:
        source = hub_source(config, name)
    if config.class_subset:
        source = keep_classes(source, config.class_subset)
    if len(source) == 0:
        raise DatasetError(f"dataset {config.dataset!r}, split {name!r} has no images "
                         "(an image folder needs .jpg/.jpeg/.png/... files, directly or in "
                         "one sub-folder per class)")
    return source


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else can only have meant a folder.
    return HUB_ID.match(name) is None


def read_class_subset(path: str) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def keep_classes(source: Source, subset_file: str) -> Source:
    """Only the classes listed in `subset_file`, relabelled 0..K-1 in file order."""
    wanted = read_class_subset(subset_file)
    if not source.label_names:
        raise DatasetError(f"class_subset {subset_file} given, but the dataset is unlabelled")
    unknown = [name for name in wanted if name not in source.label_names]
    if unknown:
        raise DatasetError(f"class_subset {subset_file}: {len(unknown)} unknown class names, "
                         f"e.g. {unknown[:5]}; known classes start {source.label_names[:5]}")
    new_label = {source.label_names.index(name): i for i, name in enumerate(wanted)}
    keep = [i for i, label in enumerate(source.labels) if label in new_label]
    return Source(names=[source.names[i] for i in keep],
                  labels=[new_label[source.labels[i]] for i in keep], label_names=wanted,
                  payloads=SelectedPayloads(source.payloads, keep),
                  sizes=None if source.sizes is None else [source.sizes[i] for i in keep],
                  fingerprint=digest(source.fingerprint, "classes", wanted))


def _wants_in_memory(in_memory: bool | str, count: int, resolution: int) -> bool:
    if isinstance(in_memory, str):
        options = {"auto": None, "true": True, "false": False}
        if in_memory.lower() not in options:
            raise ConfigError(f"in_memory must be true, false or 'auto', not {in_memory!r}")
        in_memory = options[in_memory.lower()]
    if in_memory is None:
        return count * 3 * resolution * resolution < IN_MEMORY_LIMIT_BYTES
    return bool(in_memory)


class ImageDataset(torch.utils.data.Dataset):
    """Items {"image": float32 (3, R, R) in [-1, 1], "label": int, "index": i}, or
    {"skipped": name, "index": i} for an unreadable file (see collate)."""

    def __init__(self, source: Source, resolution: int, train: bool, seed: int = 0,
                 in_memory: bool | str = "auto", random_crop: bool = False):
        self.source = source
        self.resolution = resolution
        self.train = train
        self.random_crop = random_crop and train
        self.seed = seed
        self.epoch = 0
        self.label_names = list(source.label_names)
        self.num_classes = len(self.label_names)
        self.pixels = None  # uint8 (N, 3, R, R) when decoded up front
        self.unreadable: set[int] = set()
        if self.random_crop and in_memory is True:
            logging.info("train_crop random: every item is decoded when read (crops differ per epoch)")
        if _wants_in_memory(in_memory, len(source), resolution) and not self.random_crop:
            self._decode_all()

    @property
    def fingerprint(self) -> str:
        """What this split's images are (source, resolution, crop): the key of cached statistics."""
        return digest(self.source.fingerprint, self.resolution, "random crop" if self.random_crop else "center")

    @property
    def names(self) -> list[str]:
        """Per item: file path relative to the dataset, emoji code points, or hub index."""
        return self.source.names

    @property
    def labels(self) -> list[int]:
        return self.source.labels

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decode(self, index: int) -> torch.Tensor | None:
        """uint8 (3, R, R), or None when the file cannot be decoded."""
        try:
            image = open_rgb(self.source.payloads[index])
        except Exception:  # any decoder error on a bad file: skip it, never end the epoch
            return None
        if self.random_crop:
            image = resize_random_crop(image, self.resolution, item_rng(self.seed, self.epoch, index))
        else:
            image = resize_center_crop(image, self.resolution)
        return to_uint8_chw(image)

    def _decode_all(self) -> None:
        # Decode + resize once so each later item costs only a flip and a scale:
        # on CPU the PNG/JPEG decode would otherwise dominate every step.
        R = self.resolution
        self.pixels = torch.zeros(len(self), 3, R, R, dtype=torch.uint8)
        for index in tqdm(range(len(self)), desc=f"decoding images at {R}px", leave=False):
            pixels = self.decode(index)
            if pixels is None:
                self.unreadable.add(index)
            else:
                self.pixels[index] = pixels

    def __getitem__(self, index: int) -> dict:
        if self.pixels is not None:
            pixels = None if index in self.unreadable else self.pixels[index]
        else:
            pixels = self.decode(index)
        if pixels is None:
            return {"skipped": self.source.names[index], "index": index}
        if self.train and flip_bit(self.seed, self.epoch, index):
            pixels = pixels.flip(-1)
        return {"image": to_float(pixels), "label": int(self.source.labels[index]),
                "index": index}


def load_split(config: DataConfig, split: str, train: bool, seed: int = 0) -> ImageDataset:
    """One split ("train"/"test" = config.train_split/test_split, or a literal split name);
    `train` turns on the random horizontal flip, and the random crop if config.train_crop asks."""
    source = resolve_source(config, split)
    return ImageDataset(source, config.resolution, train=train, seed=seed, in_memory=config.in_memory,
                        random_crop=config.train_crop == "random")


def collate(items: list[dict]) -> dict:
    """Stack readable items; unreadable ones are dropped and named in batch["skipped"]."""
    good = [item for item in items if "skipped" not in item]
    skipped = [item["skipped"] for item in items if "skipped" in item]
    if not good:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                "index": torch.empty(0, dtype=torch.long), "skipped": skipped}
    return {"image": torch.stack([item["image"] for item in good]),
            "label": torch.tensor([item["label"] for item in good], dtype=torch.long),
            "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "skipped": skipped}


class SkipTracker:
    """Distinct unreadable files seen over batches; report() writes one warning line."""

    def __init__(self, show: int = 5):
        self.show = show
        self._names: dict[str, None] = {}  # insertion-ordered set: epochs repeat the same files
        self._reported = 0

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def count(self) -> int:
        return len(self._names)

    def update(self, batch: dict) -> None:
        self._names.update(dict.fromkeys(batch.get("skipped", [])))

    def report(self) -> str | None:
        """One logging.warning with the count and the first names; silent when
        nothing new was skipped since the last report."""
        if self.count == self._reported:
            return None
        self._reported = self.count
        first = ", ".join(self.names[: self.show])
        more = ", ..." if self.count > self.show else ""
        message = f"skipped {self.count} unreadable image(s): {first}{more}"
        logging.warning(message)
        return message
