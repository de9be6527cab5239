"""ProVQTokenizer: diffusers VAE encoder, progressive quantizer, decoder (ProVQ, arXiv 2603.22304)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import Decoder, Encoder

from . import serialization
from .quantizer import ProgressiveQuantizer, QuantizerConfig, QuantizerOutput
from .schedule import hardness as schedule_hardness


@dataclass
class TokenizerConfig:
    resolution: int = 32  # square input images, in [-1, 1]
    in_channels: int = 3
    base_channels: int = 32
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4])  # one level each
    num_res_blocks: int = 1  # per encoder level (the decoder uses one more, as diffusers' VAE)
    latent_channels: int = 32  # encoder output / decoder input channels
    attention: bool = False  # self-attention in the mid block and the lowest-resolution level
    norm_num_groups: int = 8
    quantizer: QuantizerConfig = field(
        default_factory=lambda: QuantizerConfig(codebook_size=1024, codebook_dim=8, l2_normalize=True)
    )

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.channel_multipliers) - 1)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling {factor}")
        for mult in self.channel_multipliers:
            if (self.base_channels * mult) % self.norm_num_groups:
                raise ValueError(
                    f"channels {self.base_channels * mult} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )


def demo32() -> TokenizerConfig:
    """CPU demo: 32 px -> 8x8 codes, 1,024 codes of dim 8 (l2); ~2.7M parameters."""
    return TokenizerConfig()


def imagenet256_f16() -> TokenizerConfig:
    """LlamaGen VQ-16 shape: 256 px -> 16x16 codes, 16,384 l2-normalized codes of dim 8."""
    return TokenizerConfig(
        resolution=256,
        base_channels=128,
        channel_multipliers=[1, 1, 2, 2, 4],
        num_res_blocks=2,
        latent_channels=256,
        attention=True,
        norm_num_groups=32,
        quantizer=QuantizerConfig(
            codebook_size=16384, codebook_dim=8, l2_normalize=True, kmeans_buffer=65536
        ),
    )


PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "demo32": demo32,
    "imagenet256_f16": imagenet256_f16,
}


def preset(name: str) -> TokenizerConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped (losses need the raw values)
    quantizer: QuantizerOutput  # vq_loss, indices (B, h, w), stats, ...


def _block_types(config: TokenizerConfig, down: bool) -> list[str]:
    # LlamaGen / taming put attention at the lowest resolution: the encoder's last
    # level and the decoder's first; diffusers' Attn*Block2D are those levels.
    n = len(config.channel_multipliers)
    plain, attn = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D") if down else (
        "UpDecoderBlock2D", "AttnUpDecoderBlock2D")
    types = [plain] * n
    if config.attention:
        types[-1 if down else 0] = attn
    return types


class ProVQTokenizer(nn.Module):
    """Image tokenizer: images in [-1, 1] -> (B, h, w) codes -> images; see `ProgressiveQuantizer`."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        channels = [config.base_channels * m for m in config.channel_multipliers]
        common = dict(
            block_out_channels=tuple(channels),
            layers_per_block=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            mid_block_add_attention=config.attention,
        )
        self.encoder = Encoder(
            in_channels=config.in_channels, out_channels=config.latent_channels,
            down_block_types=tuple(_block_types(config, down=True)), double_z=False, **common,
        )
        self.quantizer = ProgressiveQuantizer(config.latent_channels, config.quantizer)
        self.decoder = Decoder(
            in_channels=config.latent_channels, out_channels=config.in_channels,
            up_block_types=tuple(_block_types(config, down=False)), **common,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_multipliers) - 1)

    @property
    def code_shape(self) -> tuple[int, int]:
        side = self.config.resolution // self.downsample_factor
        return (side, side)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for the VQGAN adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def hardness_at(self, step: int, total_steps: int | None = None) -> float:
        return schedule_hardness(step, self.config.quantizer.schedule, total_steps)

    def forward(
        self, images: torch.Tensor, hardness: float, generator: torch.Generator | None = None
    ) -> TokenizerOutput:
        quantized = self.quantizer(self.encoder(images), hardness, generator)
        return TokenizerOutput(self.decoder(quantized.z_out), quantized)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Hard codes, always: images (B, 3, H, W) in [-1, 1] -> LongTensor (B, h, w)."""
        return self.quantizer.indices_from_latents(self.encoder(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, H, W), clamped to [-1, 1]."""
        if codes.dim() != 3:
            raise ValueError(f"expected codes of shape (B, h, w), got {tuple(codes.shape)}")
        images = self.decoder(self.quantizer.decode_indices(codes.long()))
        return images.float().clamp(-1.0, 1.0)

    # ---- files ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the canonical config JSON and the exported weights."""
        return serialization.fingerprint(self.config, self)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` (with `config_version`) and `model.safetensors`; no pickle."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        serialization.write_config(self.config, directory / serialization.CONFIG_NAME)
        serialization.save_weights(self, directory / serialization.WEIGHTS_NAME)
        return directory

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
        revision: str | None = None,
    ) -> ProVQTokenizer:
        """Load from a folder written by `save_pretrained`, or a Hub repo id (when online)."""
        config_file, weights_file = serialization.resolve_files(name_or_path, revision)
        config = serialization.read_config(config_file, TokenizerConfig)
        model = cls(config)
        serialization.load_weights(model, weights_file)
        return model.to(device).eval()
