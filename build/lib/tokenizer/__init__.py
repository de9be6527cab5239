"""Stage 1 of ProVQ (arXiv 2603.22304): progressive-quantization image tokenizer."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Lazy exports: the quantizer is a standalone module for any modality, so importing
# it must not pay for diffusers (seconds), which only the image model needs.
_EXPORTS = {
    "codebook_init": ("LatentBuffer", "kmeans"),
    "discriminator": ("DiscriminatorConfig", "PatchDiscriminator"),
    "losses": (
        "LossConfig", "LPIPSLoss", "adaptive_gan_weight", "gan_active", "hinge_d_loss",
        "hinge_g_loss", "make_perceptual_loss", "reconstruction_loss",
    ),
    "model": ("ProVQTokenizer", "TokenizerConfig", "TokenizerOutput"),
    "quantizer": (
        "KINDS", "STAT_NAMES", "ProgressiveQuantizer", "QuantizerConfig", "QuantizerOutput",
        "quantizer_loss_weight",
    ),
    "schedule": ("ScheduleConfig", "hardness"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from .codebook_init import LatentBuffer, kmeans  # noqa: F401
    from .discriminator import DiscriminatorConfig, PatchDiscriminator  # noqa: F401
    from .losses import (  # noqa: F401
        LossConfig,
        LPIPSLoss,
        adaptive_gan_weight,
        gan_active,
        hinge_d_loss,
        hinge_g_loss,
        make_perceptual_loss,
        reconstruction_loss,
    )
    from .model import ProVQTokenizer, TokenizerConfig, TokenizerOutput  # noqa: F401
    from .quantizer import (  # noqa: F401
        KINDS,
        STAT_NAMES,
        ProgressiveQuantizer,
        QuantizerConfig,
        QuantizerOutput,
        quantizer_loss_weight,
    )
    from .schedule import ScheduleConfig, hardness  # noqa: F401


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
