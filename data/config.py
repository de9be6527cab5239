"""DataConfig: which images to load, at which resolution, from where."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # "emoji" (built-in), a local image folder, or a Hugging Face hub dataset name.
    dataset: str = "emoji"
    # Images are resized (shorter side) and center-cropped to resolution x resolution.
    resolution: int = 32
    # Hub datasets only: the column holding the image (PIL image, bytes or path).
    image_column: str = "image"
    # Hub datasets only: the integer/ClassLabel/string label column; None = unlabelled.
    label_column: str | None = "label"
    # Hub datasets only: the configuration name passed to datasets.load_dataset.
    hub_config: str | None = None
    # Split names that the roles "train" and "test" of load_split map to
    # (an image folder with train/ and val/ sub-folders takes test_split="val").
    train_split: str = "train"
    test_split: str = "test"
    # Text file of class names, one per line: keep only these, relabelled 0..K-1 in file order.
    class_subset: str | None = None
    # DataLoader worker processes (0 = load in the main process).
    num_workers: int = 0
    # Decode + resize the whole split once into a uint8 tensor: True, False or "auto"
    # (when it fits in under 1 GB at the target resolution).
    in_memory: bool | str = "auto"
    # Where the built-in emoji dataset is cached; None = $PROVQ_CACHE or ~/.cache/provq.
    cache_dir: str | None = None
