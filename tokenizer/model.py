"""ProVQTokenizer: diffusers VAE encoder, progressive quantizer, decoder (ProVQ, arXiv 2603.22304)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from provq.common.cards import CardContent
from provq.common.hashing import update_with_tensors
from provq.common.pretrained import PretrainedMixin

from .families import LFQ_EXACT_ENTROPY_VALUES
from .quantizer import ProgressiveQuantizer, QuantizerConfig, QuantizerOutput
from .remedies import REMEDY_FIELDS

# field: its value that means "off" (the soft readings' temperatures came with them, the remedies' fields too)
ADDED_QUANTIZER_FIELDS = {**REMEDY_FIELDS, "codebook_ema_decay": 0.99, "soft_temperature_start": 1.0,
                          "soft_temperature_end": 1e-3}


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
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def architecture(self) -> dict:
        """The fields that decide what the weights compute (not how they are trained)."""
        q = self.quantizer
        return {"resolution": self.resolution, "in_channels": self.in_channels,
                "base_channels": self.base_channels, "channel_multipliers": list(self.channel_multipliers),
                "num_res_blocks": self.num_res_blocks, "latent_channels": self.latent_channels,
                "attention": self.attention, "norm_num_groups": self.norm_num_groups,
                "quantizer.kind": q.kind, "quantizer.levels": q.levels, "quantizer.bits": q.bits,
                "quantizer.codebook_size": q.codebook_size, "quantizer.codebook_dim": q.codebook_dim,
                "quantizer.l2_normalize": q.l2_normalize, "quantizer.simvq": q.simvq}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def code_shape(self) -> tuple[int, int]:
        """The (h, w) grid of codes of one image."""
        side = self.resolution // self.downsample_factor
        return (side, side)

    def __post_init__(self) -> None:
        factor = self.downsample_factor
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} is not divisible by the downsampling {factor}")
        for mult in self.channel_multipliers:
            if (self.base_channels * mult) % self.norm_num_groups:
                raise ValueError(
                    f"channels {self.base_channels * mult} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped (losses need the raw values)
    quantizer: QuantizerOutput  # loss, indices (B, h, w), stats, ...


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


def _remedies_text(q: QuantizerConfig) -> str:
    chosen = [f"EMA codebook (decay {q.codebook_ema_decay:g})" if q.ema_codebook else "",
              f"dead-code restart under {q.dead_code_threshold:g} uses per call" if q.dead_code_threshold else "",
              "rotation trick" if q.rotation_trick else "",
              "SimVQ (a frozen random basis times a learned map)" if q.simvq else ""]
    return "".join(f", {text}" for text in chosen if text)


def _lfq_entropy_line(config: TokenizerConfig) -> str:
    """Which batch entropy LFQ trained with: exact while a process's micro-batch fits the bound."""
    q = config.quantizer
    h, w = config.code_shape
    images = LFQ_EXACT_ENTROPY_VALUES // (h * w * q.codebook_size)
    grouped = f"groups of {min(q.entropy_group_bits, q.bits)} bits (an approximation from above)"
    where = (f"exact over all {q.codebook_size:,} codes for micro-batches of up to {images:,} images per process, "
             f"else summed over {grouped}" if images else f"always summed over {grouped}")
    return (f"- LFQ's batch entropy while training: {where}; the training log's quantizer/batch_entropy_exact "
            "says which each step used.")


class ProVQTokenizer(PretrainedMixin, nn.Module):
    """Image tokenizer: images in [-1, 1] -> (B, h, w) codes -> images; see `ProgressiveQuantizer`.

    ``save_pretrained(dir)`` / ``from_pretrained(dir_or_repo_id, device="cpu")`` write and read
    ``config.json`` + ``model.safetensors`` (``common.pretrained``).
    """

    config_class = TokenizerConfig
    kind = "tokenizer"  # model_type provq-tokenizer

    @classmethod
    def card_content(cls, config: TokenizerConfig) -> CardContent:
        q, s = config.quantizer, config.quantizer.schedule
        family = {"vq": f"VQ, {q.codebook_size:,} codes of dim {q.codebook_dim}"
                        + (", l2-normalized" if q.l2_normalize else "")
                        + (", k-means init after the warm-up" if q.kmeans_init else "") + _remedies_text(q),
                  "fsq": f"FSQ, levels {q.levels} = {q.codebook_size:,} codes",
                  "lfq": f"LFQ, {q.bits} bits = {q.codebook_size:,} codes"}[q.kind]
        h, w = config.code_shape
        schedule = ("hard codes from the first step" if s.kind == "none" else
                    f"{s.kind}: continuous for {s.warmup:g}, then to hard codes"
                    + (f" over {s.transition:g}" if s.kind not in ("step",) else " at once")
                    + " (fractions of the run, or steps)")
        entropy = [_lfq_entropy_line(config)] if q.kind == "lfq" else []
        return CardContent(
            title=f"ProVQ image tokenizer ({q.kind.upper()}, {config.resolution} px -> {h}x{w} codes)",
            task="image-tokenization",
            summary=[f"- Quantizer: {family}.", *entropy,
                     f"- Hardness curriculum while training: {schedule}; encoding is always hard.",
                     f"- Encoder/decoder: diffusers VAE blocks, {config.base_channels} base channels x "
                     f"{config.channel_multipliers}, {config.num_res_blocks} res block(s) per level, "
                     f"latent {config.latent_channels} channels" + (", attention" if config.attention else "") + ".",
                     "- Codes usage and perplexity below are measured on the split they name."],
            tags=["image-tokenizer", "vector-quantization", "progressive-quantization", "provq", q.kind],
            load=("import provq\n"
                  "tok = provq.load_tokenizer(\"<this folder or repo id>\")\n"
                  f"codes = tok.encode(images)  # (B, 3, {config.resolution}, {config.resolution}) in [-1, 1] -> (B, {h}, {w})\n"
                  "images = tok.decode(codes)"))

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        # diffusers loads all its models (and torch._dynamo) on import, several seconds: only a model
        # being built pays for it, not every command's --help.
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        self.config = config
        channels = [config.base_channels * m for m in config.channel_multipliers]
        block_args = dict(
            block_out_channels=tuple(channels),
            layers_per_block=config.num_res_blocks,
            norm_num_groups=config.norm_num_groups,
            mid_block_add_attention=config.attention,
        )
        encoder = Encoder(
            in_channels=config.in_channels, out_channels=config.latent_channels,
            down_block_types=tuple(_block_types(config, down=True)), double_z=False, **block_args,
        )
        decoder = Decoder(
            in_channels=config.latent_channels, out_channels=config.in_channels,
            up_block_types=tuple(_block_types(config, down=False)), **block_args,
        )
        # The quantizer draws its random numbers last, so a seed gives the same encoder and decoder
        # whatever the quantizer (family, code count, remedy): the variants of a study stay paired.
        quantizer = ProgressiveQuantizer(config.latent_channels, config.quantizer)
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def code_shape(self) -> tuple[int, int]:
        return self.config.code_shape

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, for the VQGAN adaptive GAN weight."""
        return self.decoder.conv_out.weight

    def forward(
        self, images: torch.Tensor, hardness: float, generator: torch.Generator | None = None,
        fit_codebook: bool | None = None,
    ) -> TokenizerOutput:
        quantized = self.quantizer(self.encoder(images), hardness, generator, fit_codebook)
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

    def fingerprint(self) -> str:
        """sha256 over the canonical config JSON and every exported tensor (name, dtype, shape, bytes).

        Code shards and priors record it, so codes of one tokenizer are never decoded by another.
        """
        digest = hashlib.sha256()
        record = {"config_version": self.config_version, **dataclasses.asdict(self.config)}
        # Fields added after tokenizers were exported are left out while they hold the old behaviour, so
        # those tokenizers keep their fingerprint (and the codes and priors bound to it).
        for name, old_behaviour in ADDED_QUANTIZER_FIELDS.items():
            if record["quantizer"][name] == old_behaviour:
                del record["quantizer"][name]
        if record["quantizer"]["schedule"].get("kmeans_at") is None:  # added with the study's matched fit
            del record["quantizer"]["schedule"]["kmeans_at"]
        digest.update(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
        update_with_tensors(digest, self.state_dict())
        return digest.hexdigest()
