"""Paired statistics over seeds: variants run with the same seed share initial weights and data order,
so a difference is judged seed by seed (the mean paired difference and its t-interval)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def _t():
    """Student's t distribution: scipy.stats takes about a second to import, which the ablation's
    --help should not pay."""
    from scipy import stats

    return stats.t


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
    half = _t().ppf((1 + confidence) / 2, len(differences) - 1) * statistics.stdev(differences)
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


def paired_sd(a: list[float], b: list[float]) -> float | None:
    """The standard deviation of the seed-by-seed differences a - b (None under two pairs)."""
    differences = [x - y for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    return statistics.stdev(differences) if len(differences) > 1 else None


def pooled_sd(samples: list[list[float]]) -> tuple[float | None, int]:
    """The pooled standard deviation of several samples (each with its own mean) and its degrees of
    freedom: sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)); samples under two values add nothing."""
    kept = [[v for v in sample if v is not None] for sample in samples]
    kept = [sample for sample in kept if len(sample) > 1]
    df = sum(len(sample) - 1 for sample in kept)
    if not df:
        return None, 0
    return math.sqrt(sum((len(sample) - 1) * statistics.variance(sample) for sample in kept) / df), df


def two_sided_p(differences: list[float]) -> float:
    """The paired t-test's two-sided p-value of mean(differences) == 0."""
    n, sd = len(differences), statistics.stdev(differences)
    if sd == 0:
        return 0.0 if statistics.fmean(differences) != 0 else 1.0
    t = statistics.fmean(differences) / (sd / math.sqrt(n))
    return float(2 * _t().sf(abs(t), n - 1))


def tost_p(differences: list[float], margin: float) -> float:
    """Two one-sided tests of equivalence within (-margin, +margin): the larger of the two p-values
    (small when the mean difference is shown to lie inside the margin)."""
    n, sd, mean = len(differences), statistics.stdev(differences), statistics.fmean(differences)
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    lower = _t().sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    upper = _t().cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
    return float(max(lower, upper))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def seeds_for_equivalence(sd: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                          most: int = 200) -> int | None:
    """Seeds n for two one-sided tests at ``margin`` to conclude equivalence with probability ``power``
    when the true paired difference is 0 and its standard deviation is ``sd``:
    n >= ((t_{1-alpha, n-1} + t_{1-(1-power)/2, n-1}) sd / margin)^2 (None beyond ``most``)."""
    for n in range(3, most + 1):
        needed = ((_t().ppf(1 - alpha, n - 1) + _t().ppf(1 - (1 - power) / 2, n - 1)) * sd / margin) ** 2
        if n >= needed:
            return n
    return None
