"""Streamed first and second moments of rows in float64: summed over batches and processes, then the
mean and covariance. One accumulator for Inception features (FID) and for latents (their geometry)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class MomentAccumulator:
    """Count, sum and sum of outer products of (N, D) rows, so 50k images never sit in memory.

    Raw moments in float64 lose ~2 of 16 digits to cancellation for O(1) features, far below any
    metric's noise; unlike centred ones they add across processes (``tensors()`` to all-reduce in
    place, or ``reduce(fn)`` with a function that returns the sum, as ``accelerator.reduce``).
    """

    def __init__(self, dim: int, device="cpu"):
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(self.sum.device, torch.float64)
        self.count += rows.shape[0]
        self.sum += rows.sum(0)
        self.outer += rows.T @ rows

    def tensors(self) -> list[torch.Tensor]:
        """The running sums, to be summed across processes in place."""
        return [self.count, self.sum, self.outer]

    def reduce(self, summed: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace each running sum by ``summed(it)`` (its sum over the processes)."""
        for tensor in self.tensors():
            tensor.copy_(summed(tensor))

    @property
    def rows(self) -> int:
        return int(self.count.item())

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance (N - 1 in the denominator); needs at least 2 rows to mean anything."""
        n = self.count.clamp_min(2)
        mean = self.sum / n
        return (self.outer - n * torch.outer(mean, mean)) / (n - 1)
