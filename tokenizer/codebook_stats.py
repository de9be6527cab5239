"""Codebook statistics shared by training logs and evaluation: usage and perplexity of code counts."""

from __future__ import annotations

import torch


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code frequencies: the number of equally used codes with the same entropy."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of the codebook with a count above zero."""
    return (counts > 0).to(counts.dtype if counts.is_floating_point() else torch.float32).mean()
