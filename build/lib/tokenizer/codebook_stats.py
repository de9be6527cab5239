"""Codebook statistics shared by training logs and evaluation: usage, perplexity, and the geometry of
latents and codes (how many dimensions they really span)."""

from __future__ import annotations

import torch


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code frequencies: the number of equally used codes with the same entropy."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def usage(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of the codebook with a count above zero."""
    return (counts > 0).to(counts.dtype if counts.is_floating_point() else torch.float32).mean()


def participation_ratio(covariance: torch.Tensor) -> float:
    """Effective dimension (sum of eigenvalues)^2 / sum of squared eigenvalues of a covariance: D for
    an isotropic cloud in D dimensions, 1 for one on a line (Gao et al. 2017's measure)."""
    eigenvalues = torch.linalg.eigvalsh(covariance.double()).clamp_min(0)
    total = eigenvalues.sum()
    return float(total**2 / eigenvalues.pow(2).sum()) if total > 0 else 0.0
