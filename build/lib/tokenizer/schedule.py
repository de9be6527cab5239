"""Hardness schedules h(step) in [0, 1] for progressive quantization (ProVQ, arXiv 2603.22304)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from provq.common.typed_config import check_ranges

SCHEDULE_KINDS = ("none", "step", "linear", "cosine", "sigmoid")

# Steepness of the sigmoid ramp; rescaled below so it still starts at 0 and ends at 1.
_SIGMOID_STEEPNESS = 10.0


@dataclass
class ScheduleConfig:
    """When and how the quantization hardness goes from 0 (continuous) to 1 (hard VQ).

    `warmup` and `transition` are lengths: a value in (0, 1) is a fraction of the
    run (`total_steps`), any other value a number of steps (so 1 means one step).
    `kmeans_at` (a length too) is when the k-means init fits the codebook: at the first
    step after it, where a ramp that starts there first has h > 0; None: at the first
    step with h > 0 of this schedule. Setting it lets two schedules fit their codebooks at the same
    step from the same encoder state (a switch compared with a ramp, issue 30).
    """

    kind: str = "cosine"  # none | step | linear | cosine | sigmoid
    warmup: float = 0.1  # h == 0 for this long
    transition: float = 0.3  # then a ramp to h == 1 over this long (ignored by step/none)
    kmeans_at: float | None = None  # the k-means fit's step; None: when h first leaves 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule.kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        check_ranges(self, non_negative=("warmup", "transition", "kmeans_at"), prefix="schedule.")


def resolve_steps(length: float, total_steps: int | None, name: str = "length") -> int:
    """A schedule length in steps: fractions in (0, 1) are scaled by `total_steps`."""
    if 0 < length < 1:
        if total_steps is None:
            raise ValueError(f"schedule {name}={length} is a fraction of the run: pass total_steps")
        return int(round(length * total_steps))
    return int(round(length))


def kmeans_due(step: int, config: ScheduleConfig, total_steps: int | None = None) -> bool:
    """Whether the k-means init may fit the codebook at `step` (it fits once, at the first such step)."""
    if config.kmeans_at is None:
        return hardness(step, config, total_steps) > 0.0
    return step > resolve_steps(config.kmeans_at, total_steps, "kmeans_at")


def _ramp(kind: str, t: float) -> float:
    """Shape of the transition for progress t in [0, 1]; every shape maps 0 -> 0 and 1 -> 1."""
    if kind == "linear":
        return t
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "sigmoid":
        k = _SIGMOID_STEEPNESS
        low, high = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
        return (1 / (1 + math.exp(-k * (t - 0.5))) - low) / (high - low)
    raise ValueError(f"unknown ramp kind {kind!r}")


def hardness(step: int, config: ScheduleConfig, total_steps: int | None = None) -> float:
    """Hardness at `step`: a pure function of the step, so a resumed run reproduces it."""
    if config.kind == "none":
        return 1.0
    warmup = resolve_steps(config.warmup, total_steps, "warmup")
    if step < warmup:
        return 0.0
    if config.kind == "step":
        return 1.0
    transition = resolve_steps(config.transition, total_steps, "transition")
    if transition <= 0:
        return 1.0
    t = (step - warmup) / transition
    if t >= 1.0:
        return 1.0  # exactly 1 from here on, whatever the ramp's rounding
    return min(1.0, max(0.0, _ramp(config.kind, t)))
