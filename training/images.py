"""Picture grids of images in [-1, 1] for run folders and reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), the layout image files and ADM use."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return images.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, upscale: int = 0) -> Path:
    """Write a grid PNG; small images are upscaled (nearest) so a 32 px grid is readable."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=nrow, padding=2,
                     normalize=True, value_range=(-1, 1), pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    scale = upscale or max(1, 128 // max(1, images.shape[-1]))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
