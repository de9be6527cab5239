"""The models of a preset in configs/, with the prior sized for its tokenizer's codes, as
train_prior.py sizes it from the codes' manifest (for benchmarks and tests that have no codes)."""

from __future__ import annotations

from generator import PriorConfig
from provq.common.presets import preset_section
from tokenizer import TokenizerConfig


def preset_models(name: str, num_classes: int) -> tuple[TokenizerConfig, PriorConfig]:
    """(tokenizer config, prior config) of preset ``name`` for a dataset of ``num_classes`` classes."""
    tokenizer = preset_section(name, "tokenizer.model", TokenizerConfig)
    height, width = tokenizer.code_shape
    prior = preset_section(name, "prior.model", PriorConfig, codebook_size=tokenizer.quantizer.codebook_size,
                           code_height=height, code_width=width, num_classes=num_classes)
    return tokenizer, prior
