"""Image files: finding them in folders, decoding to RGB (any mode, alpha on white), resizing, and the deterministic flip."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

WHITE = (255, 255, 255)
IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
}
TEST_FRACTION = 0.1  # share of the items in_test_split puts in the held-out split
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The image files in a folder (and its sub-folders when ``recursive``), sorted: the one scanner
    of image folders, for datasets and for evaluation inputs."""
    return sorted(filter(is_image_file, folder.rglob("*") if recursive else folder.iterdir()))


def _refuse_truncated_images() -> None:
    # Some libraries switch this global on; it makes PIL grey-fill truncated files
    # silently, which would train on garbage instead of skipping and counting them.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logging.warning("PIL LOAD_TRUNCATED_IMAGES was on; data/ turns it off so that "
                        "truncated images are skipped and counted, not grey-filled")
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """I;16*, I and F images hold more than 8 bits: rescale instead of clipping."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_8bit(image)
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def open_rgb(path_or_bytes: str | os.PathLike | bytes) -> Image.Image:
    """Open and fully decode an image as RGB; raises on corrupt, truncated or empty files."""
    _refuse_truncated_images()
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        image.load()  # decode now, so truncation raises here and not later
        return to_rgb(image)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution` (antialiased), then a centered square crop.

    Follows ADM's center_crop_arr (box halving, then bicubic), the preprocessing
    behind the ImageNet FID reference statistics, so our numbers stay comparable.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def resize_random_crop(image: Image.Image, resolution: int, rng: random.Random,
                       min_crop_fraction: float = 0.8) -> Image.Image:
    """ADM's random_crop_arr (LlamaGen's tokenizer augmentation): the shorter side to a random size
    in [R, ceil(R / min_crop_fraction)] (box halving, then bicubic), then a random R x R window."""
    smaller = rng.randrange(resolution, math.ceil(resolution / min_crop_fraction) + 1)
    while min(image.size) >= 2 * smaller:
        image = image.resize(tuple(side // 2 for side in image.size), Image.Resampling.BOX)
    scale = smaller / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.Resampling.BICUBIC)
    top, left = rng.randrange(size[1] - resolution + 1), rng.randrange(size[0] - resolution + 1)
    return image.crop((left, top, left + resolution, top + resolution))


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """An item's own random stream for an epoch: the same in every worker and after a resume."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}:crop".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def flip_bit(seed: int, epoch: int, index: int) -> bool:
    """A fair coin that depends only on (seed, epoch, index): resumed runs and any
    number of workers see the same flips, unlike a stateful RNG."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=1).digest()
    return bool(digest[0] & 1)


def split_bucket(key: str) -> float:
    """Stable position in [0, 1) of a string key (sha1, the same on every machine)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def in_test_split(key: str) -> bool:
    """Whether an item goes to the held-out split of a dataset that has none of its own: a hash
    of its key, so the split is stable across machines and when items are added."""
    return split_bucket(key) < TEST_FRACTION
