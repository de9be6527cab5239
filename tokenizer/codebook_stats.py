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


class MomentAccumulator:
    """Count, sum and sum of outer products of rows (N, D), float64: add over batches and processes,
    then the covariance."""

    def __init__(self, dim: int, device="cpu"):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).double()
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.outer += rows.T @ rows

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.sum, self.outer]

    def covariance(self) -> torch.Tensor:
        n = self.count.clamp_min(2)
        mean = self.sum / n
        return (self.outer - n * torch.outer(mean, mean)) / (n - 1)
