"""Where images come from: the built-in emoji set, a Hugging Face hub dataset, an image folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from provq.common.errors import UserError
from provq.common.hashing import digest

from .config import DataConfig
from .images import image_files, in_test_split, is_image_file

SPLIT_FOLDERS = ("train", "val", "validation", "test")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as asked: no images, a missing split, an unknown class."""


class DatasetNotFoundError(DatasetError):
    """--dataset names neither emoji, nor an existing folder, nor a loadable hub dataset."""


@dataclass
class Source:
    """Per item: a payload for open_rgb (file path or bytes), a label, a name for reports."""

    names: list[str]
    labels: list[int]
    label_names: list[str]
    payloads: object  # indexable: payloads[i] -> str path or bytes
    sizes: list[tuple[int, int]] | None = field(default=None)  # (width, height) when known
    # What the items' pixels depend on, as a string: equal fingerprints, equal images (the key of
    # cached statistics). Files: path, size and modification time of each; emoji: the font's hash.
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.names)


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """Cheap and content-sensitive: an edited, added, removed or renamed file changes it."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return digest("folder", str(root.resolve()), entries)


class ArrowPayloads:
    """Lazy image bytes/paths of a `datasets` column, so big hub datasets stay on disk."""

    def __init__(self, hf_dataset, column: str):
        import datasets

        feature = hf_dataset.features[column]
        if isinstance(feature, datasets.Image):
            # Undecoded: we decode ourselves, so one bad file is skipped, not a crash.
            hf_dataset = hf_dataset.cast_column(column, datasets.Image(decode=False))
        self.column = hf_dataset.select_columns([column])
        self.name = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, index: int):
        value = self.column[index][self.name]
        if isinstance(value, dict):  # {"bytes": ..., "path": ...} of an Image feature
            return value["bytes"] if value.get("bytes") else value["path"]
        return value


class SelectedPayloads:
    """payloads[indices[i]] without copying: a class subset of a hub dataset stays lazy."""

    def __init__(self, payloads, indices: list[int]):
        self.payloads, self.indices = payloads, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.payloads[self.indices[index]]


def split_name(config: DataConfig, split: str) -> str:
    """The roles "train"/"test" map to the configured split names; others pass through."""
    return {"train": config.train_split, "test": config.test_split}.get(split, split)


def emoji_source(config: DataConfig, split: str) -> Source:
    from .emoji import CACHE_VERSION, input_fingerprint, load_emoji

    splits = load_emoji(config.cache_dir)
    if split not in splits:
        raise DatasetError(f"the emoji dataset has splits {list(splits)}, not {split!r}")
    table = splits[split]
    # list(): datasets >= 4 returns lazy Column objects for table["name"].
    return Source(names=list(table["codepoints"]), labels=list(table["label"]),
                  label_names=table.features["label"].names,
                  payloads=ArrowPayloads(table, "image"),
                  sizes=list(zip(table["width"], table["height"], strict=True)),
                  fingerprint=digest("emoji", CACHE_VERSION, input_fingerprint(), split))


def _hub_label_names(config: DataConfig, table, split: str) -> list[str] | None:
    import datasets

    feature = table.features[config.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if split != config.train_split:  # plain int/str labels: name them from train, for all splits
        table = datasets.load_dataset(config.dataset, config.hub_config, split=config.train_split)
    values = sorted(set(table[config.label_column]))  # set() consumes a Column fine
    return [str(v) for v in values]


def hub_source(config: DataConfig, split: str) -> Source:
    import datasets

    try:
        table = datasets.load_dataset(config.dataset, config.hub_config, split=split)
    except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset
        raise DatasetNotFoundError(unknown_dataset_message(config.dataset, error)) from error
    columns = table.column_names
    if config.image_column not in columns:
        raise DatasetError(f"hub dataset {config.dataset!r} has no image column "
                         f"{config.image_column!r}; its columns are {columns} (set image_column)")
    labelled = config.label_column is not None and config.label_column in columns
    if config.label_column is not None and not labelled:
        logging.warning("hub dataset %r has no label column %r (columns %s): loading it "
                        "unlabelled", config.dataset, config.label_column, columns)
    labels, label_names = [-1] * len(table), []
    if labelled:
        label_names = _hub_label_names(config, table, split)
        raw = list(table[config.label_column])
        if not isinstance(table.features[config.label_column], datasets.ClassLabel):
            lookup = {name: i for i, name in enumerate(label_names)}
            raw = [lookup[str(v)] for v in raw]
        labels = list(raw)
    names = [f"{config.dataset}[{split}][{i}]" for i in range(len(table))]
    return Source(names=names, labels=labels, label_names=label_names,
                  payloads=ArrowPayloads(table, config.image_column),
                  fingerprint=digest("hub", config.dataset, config.hub_config, split, config.image_column,
                                     getattr(table, "_fingerprint", None)))


def unknown_dataset_message(name: str, reason: object = None) -> str:
    why = f" ({reason})" if reason else ""
    return (f"unknown dataset {name!r}{why}. --dataset takes one of: 'emoji' (built-in), "
            "the path of an existing image folder, or a Hugging Face hub dataset name "
            "(needs network access, or a local hub cache with HF_HUB_OFFLINE=1)")


def _class_folders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders holding at least one image (stops at the first found)."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p for p in subfolders if any(map(is_image_file, p.rglob("*")))]


def list_folder(folder: Path, class_names: list[str] | None = None):
    """(files, labels, class_names): class = sub-folder name, or unlabelled (-1)
    when the images sit directly in `folder`. `class_names` fixes the label order
    (a val/ folder reuses train/'s classes)."""
    classes = _class_folders(folder)
    if not classes:
        return image_files(folder, recursive=False), None, class_names or []
    if class_names is None:
        class_names = [c.name for c in classes]
    unknown = sorted({c.name for c in classes} - set(class_names))
    if unknown:
        raise DatasetError(f"{folder} has class folders not in the train split: {unknown[:5]}")
    loose = image_files(folder, recursive=False)
    if loose:
        logging.warning("%s: %d images beside the class folders are ignored", folder, len(loose))
    files, labels = [], []
    for class_folder in classes:
        images = image_files(class_folder, recursive=True)
        files += images
        labels += [class_names.index(class_folder.name)] * len(images)
    return files, labels, class_names


def _split_folder(root: Path, split: str, config: DataConfig) -> Path:
    present = [name for name in SPLIT_FOLDERS if (root / name).is_dir()]
    if split in present:
        return root / split
    if split == config.test_split == "test" and {"val", "validation"} & set(present):
        fallback = "val" if "val" in present else "validation"
        logging.info("%s has no test/ folder: using %s/ as the test split", root, fallback)
        return root / fallback
    raise DatasetError(f"{root} has split folders {present}, not {split!r} "
                     "(set train_split / test_split, e.g. test_split=val)")


def folder_source(config: DataConfig, split: str) -> Source:
    root = Path(config.dataset).expanduser()
    has_split_folders = (root / "train").is_dir() and any(
        (root / name).is_dir() for name in SPLIT_FOLDERS[1:])
    if has_split_folders:
        # Labels follow train/'s class folders, so every split agrees on them.
        class_names = [p.name for p in _class_folders(root / config.train_split)]
        folder = _split_folder(root, split, config)
        files, labels, class_names = list_folder(folder, class_names)
    else:
        if split not in (config.train_split, config.test_split):
            raise DatasetError(f"{root} has no split folders; its splits are "
                             f"{config.train_split!r} and {config.test_split!r} (90/10 by hash)")
        all_files, all_labels, class_names = list_folder(root)
        keys = [p.relative_to(root).as_posix() for p in all_files]
        # Hash of the relative path: stable across machines and when files are added.
        want_test = split == config.test_split
        keep = [i for i, k in enumerate(keys) if in_test_split(k) == want_test]
        files = [all_files[i] for i in keep]
        labels = None if all_labels is None else [all_labels[i] for i in keep]
    names = [p.relative_to(root).as_posix() for p in files]
    return Source(names=names, labels=labels if labels is not None else [-1] * len(files),
                  label_names=class_names if labels is not None else [],
                  payloads=[str(p) for p in files], fingerprint=files_fingerprint(root, files))
