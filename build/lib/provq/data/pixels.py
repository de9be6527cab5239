"""One set of pixel conversions: uint8 <-> float images in [-1, 1], NCHW <-> NHWC, and picture grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from provq.common.files import writing


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 in [-1, 1]: the models' input range."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [-1, 1] -> uint8 in [0, 255], rounded as a PNG writer does."""
    return ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_hwc(pixels: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, H, W) tensor -> (B, H, W, 3) array: the layout of image files and ADM's npz."""
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def from_hwc(array: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) array -> (B, 3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, upscale: int = 0) -> Path:
    """A grid PNG of (B, 3, H, W) images in [-1, 1]; small images are upscaled (nearest) so a
    32 px grid is readable."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=nrow, padding=2,
                     normalize=True, value_range=(-1, 1), pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    scale = upscale or max(1, 128 // max(1, images.shape[-1]))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    with writing(path, "a picture grid"):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    return path
