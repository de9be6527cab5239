"""Improved precision and recall (Kynkaenniemi et al. 2019) on Inception pool3 features, as the ADM
evaluator computes them: each set's manifold is the union of balls around its points, each ball's
radius the distance to the point's k-th nearest neighbour in its own set (k = 3)."""

from __future__ import annotations

import torch

NEIGHBOURS = 3  # ADM's nhood_sizes=[3]


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURS, chunk: int = 1024) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    features = features.double()
    radii = []
    for part in features.split(chunk):
        # the (k + 1)-th smallest: the point itself is at distance 0
        radii.append(_squared_distances(part, features).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """The fraction of ``points`` inside at least one ball of the ``manifold`` (centres, squared radii)."""
    points, manifold = points.double(), manifold.double()
    inside = [(_squared_distances(part, manifold) <= radii).any(dim=1) for part in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = NEIGHBOURS) -> dict:
    """Precision: the share of samples on the reference manifold (fidelity); recall: the share of the
    reference on the samples' manifold (diversity). (N, D) and (M, D) features, N and M > k."""
    if min(len(samples), len(reference)) <= k:
        raise ValueError(f"precision/recall needs more than {k} images on each side")
    return {"precision": coverage(samples, reference, manifold_radii(reference, k)),
            "recall": coverage(reference, samples, manifold_radii(samples, k))}
