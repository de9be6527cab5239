"""Paired statistics over seeds: variants run with the same seed share initial weights and data order,
so a difference is judged seed by seed (the mean paired difference and its t-interval)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class PairedDifference:
    """mean(a_s - b_s) over seeds s, with a two-sided t-interval (None for a single seed)."""

    mean: float
    low: float | None
    high: float | None
    seeds: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_difference(a: list[float], b: list[float], confidence: float = 0.95) -> PairedDifference:
    """Seed-by-seed differences a - b (lists in seed order; seeds missing on either side are left out)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]  # gFID: seed 0 only
    if not pairs:
        return PairedDifference(float("nan"), None, None, 0)
    differences = [x - y for x, y in pairs]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedDifference(mean, None, None, 1)
    half = stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * statistics.stdev(differences)
    half /= math.sqrt(len(differences))
    return PairedDifference(mean, mean - half, mean + half, len(differences))


def judgement(names: tuple[str, str], difference: PairedDifference, higher: bool) -> str:
    """What a paired difference says: which of the two is better, or that it cannot tell."""
    a, b = names
    if difference.seeds == 0:
        return "no paired seeds"
    if difference.low is None:
        return "one seed: no interval"
    if not difference.excludes_zero:
        return "no measurable difference"
    return f"{a if (difference.mean > 0) == higher else b} is better"


def verdict_line(column: str, names: tuple[str, str], difference: PairedDifference, higher: bool) -> str:
    """One line: the paired difference, its interval, and what it says."""
    a, b = names
    said = judgement(names, difference, higher)
    if difference.seeds == 0:
        return f"- {column}: {said}."
    if difference.low is None:
        return f"- {column}: {a} - {b} = {difference.mean:+.4g} ({said})."
    interval = f"[{difference.low:+.3g}, {difference.high:+.3g}]"
    return (f"- {column}: {a} - {b} = {difference.mean:+.4g}, 95% interval {interval} over "
            f"{difference.seeds} paired seeds: {said}.")
