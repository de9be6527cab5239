"""Data for ProVQ: the built-in emoji set, hub datasets and image folders as torch Datasets."""

from .config import DataConfig
from .dataset import ImageDataset, SkipTracker, collate, load_split, resolve_source
from .images import open_rgb
from .sources import DatasetError, DatasetNotFoundError

__all__ = [
    "DataConfig",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageDataset",
    "SkipTracker",
    "collate",
    "load_split",
    "open_rgb",
    "resolve_source",
]
