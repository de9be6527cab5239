"""PatchGAN discriminator in the shape of taming-transformers' NLayerDiscriminator (pix2pix, Isola et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from provq.common.typed_config import check_ranges


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3
    base_channels: int = 64
    # Convolution blocks after the stem (taming's n_layers): the stem and all but the last block
    # have stride 2, the last block and the output conv stride 1; 3 layers: 256 px -> 30x30 logits.
    num_layers: int = 3
    norm: str = "batch"  # batch (taming) | group (no cross-sample statistics under DDP)

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {self.norm!r}")
        check_ranges(self, positive=("in_channels", "base_channels", "num_layers"))


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, h, w); written out because diffusers has none."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        ndf, kernel = config.base_channels, 4
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, ndf, kernel, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, config.num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < config.num_layers else 1  # the last one keeps the grid (taming)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel, stride=stride, padding=1, bias=False),
                _norm(config.norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # pix2pix / taming init: N(0, 0.02) convolutions, N(1, 0.02) norm scales.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
