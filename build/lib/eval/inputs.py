"""The images an evaluation reads: a dataset split, a folder, or an ADM-style .npz (arr_0), in batches
sharded over processes."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from provq.common.errors import FormatError, MissingFileError
from provq.common.files import DAMAGED_ARCHIVE, damaged_archive
from provq.data import DataConfig, DatasetError, load_split
from provq.data.images import IMAGE_EXTENSIONS, image_files, open_rgb
from provq.data.pixels import from_hwc, to_uint8


@dataclass
class Batch:
    indices: torch.Tensor  # (B,) global image indices, for IS splits and exactly-once bookkeeping
    images: torch.Tensor  # (B, 3, H, W) uint8
    floats: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], datasets only (the tokenizer's input)
    skipped: int = 0  # unreadable images dropped from this batch


def shard_batches(total: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batch k covers [k * batch_size, (k + 1) * batch_size) and goes to process k % world.

    No padding: every image lands in exactly one process, so sums over processes count it once.
    """
    starts = range(rank * batch_size, total, world * batch_size)
    return [list(range(s, min(s + batch_size, total))) for s in starts]


def _collate(items: list[dict]) -> Batch:
    kept = [item for item in items if "skipped" not in item]
    skipped = len(items) - len(kept)
    if not kept:
        return Batch(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 1, 1, dtype=torch.uint8), None, skipped)
    floats = [item["floats"] for item in kept if item.get("floats") is not None]
    return Batch(
        torch.tensor([item["index"] for item in kept]),
        torch.stack([item["images"] for item in kept]),
        torch.stack(floats) if len(floats) == len(kept) else None,
        skipped,
    )


class _MapSource(Dataset):
    """A map-style source read through a DataLoader over this process's shard."""

    name = "images"

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0) -> Iterator[Batch]:
        shard = shard_batches(len(self), batch_size, rank, world)
        return iter(DataLoader(self, batch_sampler=shard, num_workers=num_workers, collate_fn=_collate))

    def num_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        return len(shard_batches(len(self), batch_size, rank, world))


class DatasetSource(_MapSource):
    """A split through data.load_split (train=False: no flips); its [-1, 1] images become uint8."""

    def __init__(self, dataset: str, split: str, resolution: int, num_workers: int = 0,
                 data: DataConfig | None = None):
        """``data``: a preset's data section (its class subset, split names, hub columns); ``dataset``,
        ``resolution`` and ``num_workers`` replace its fields."""
        config = dataclasses.replace(data or DataConfig(), dataset=dataset, resolution=resolution,
                                     num_workers=num_workers)
        self.dataset = load_split(config, split, train=False)
        subset = f"[{Path(config.class_subset).name}]" if config.class_subset else ""
        self.name = f"{dataset}{subset}:{split}@{resolution}"

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if "skipped" in item:
            return item
        return {"index": index, "images": to_uint8(item["image"]), "floats": item["image"]}


class FolderSource(_MapSource):
    """All image files under a folder (recursively, sorted); one size for all, corrupt files skipped."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"not a folder of images: {folder}")
        candidates = image_files(folder, recursive=True)
        self.paths, self.unreadable, sizes = [], [], {}
        for path in candidates:
            try:
                with Image.open(path) as image:  # reads the header only: cheap
                    sizes.setdefault(image.size, path)
                self.paths.append(path)
            except Exception:  # PIL raises several types for garbage; all mean "skip and count"
                self.unreadable.append(path)
        if not self.paths:
            raise DatasetError(f"no readable images in {folder} (extensions {sorted(IMAGE_EXTENSIONS)}; "
                             f"{len(self.unreadable)} unreadable)")
        if len(sizes) > 1:
            (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
            raise DatasetError(f"images in {folder} have different sizes, e.g. {path_a.name} is "
                             f"{size_a[0]}x{size_a[1]} and {path_b.name} is {size_b[0]}x{size_b[1]}: "
                             "resize them to one size first")
        self.name = str(folder)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = open_rgb(self.paths[index])
        except Exception:  # a header that parsed but pixels that do not: skip and count
            return {"skipped": str(self.paths[index])}
        return {"index": index, "images": from_hwc(np.array(image, dtype=np.uint8)[None])[0]}


class NpzSource:
    """uint8 NHWC images under `arr_0` (the ADM sample layout), read in chunks, never all at once."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.member = Path(path), f"{key}.npy"
        if not self.path.is_file():
            raise MissingFileError(f"{self.path} does not exist (expected samples: an .npz with {key})")
        try:
            with zipfile.ZipFile(self.path) as archive:
                if self.member not in archive.namelist():
                    names = [n.removesuffix(".npy") for n in archive.namelist()]
                    raise FormatError(f"{self.path} has no '{key}' (ADM layout: uint8 NHWC images); keys: {names}")
                with archive.open(self.member) as file:
                    shape, dtype = self._header(file)
        except DAMAGED_ARCHIVE as error:
            raise damaged_archive(self.path, f"samples: an .npz with {key}", error) from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise FormatError(f"{self.path}:{key} must be uint8 (N, H, W, 3), got {dtype} {shape}")
        self.shape, self.name = shape, str(self.path)
        self.unreadable: list = []

    @staticmethod
    def _header(file):
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(file)
        if fortran_order:
            raise FormatError("Fortran-ordered arrays are not supported; save with np.savez")
        return shape, dtype

    def __len__(self):
        return self.shape[0]

    def num_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> int:
        return len(shard_batches(len(self), batch_size, rank, world))

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, num_workers: int = 0) -> Iterator[Batch]:
        mine = {b[0] for b in shard_batches(len(self), batch_size, rank, world)}
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as file:
            self._header(file)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                try:
                    chunk = file.read(count * row)  # read even when not ours: a zip stream cannot seek cheaply
                except DAMAGED_ARCHIVE as error:
                    raise damaged_archive(self.path, "samples", error) from None
                if len(chunk) != count * row:
                    raise FormatError(f"{self.path} ends after {start} of its {len(self)} images: it is truncated")
                if start not in mine:
                    continue
                images = np.frombuffer(chunk, dtype=np.uint8).reshape(count, *self.shape[1:])
                yield Batch(torch.arange(start, start + count), from_hwc(images.copy()).contiguous())


def open_images(path: str | Path):
    """A folder or an ADM-style samples .npz."""
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if path.suffix == ".npz":
        return NpzSource(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist: expected a folder of images or an .npz with arr_0")
    raise FormatError(f"{path}: expected a folder of images or an .npz with arr_0")
