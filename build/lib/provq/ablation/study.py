"""The study: where annealing pays, family by family (python -m provq.ablation --study).

At the first resolution (32 px), each quantizer family (VQ with l2 codes and the k-means init, FSQ,
LFQ) is trained with hard codes from the first step, three switches to hard codes (at the ramp's
start; its midpoint, where the switch has the ramp's mean hardness; its end, where it has the
ramp's time on hard codes) and the cosine ramp, over seeds paired by seed. Generation (a prior per
tokenizer seed: gFID, validation bits per code, sample diversity) for hard codes, the best switch
and the ramp. At the next resolution (64 px), hard codes against the best progressive variant of
each family. Every stage is skipped when its output exists, so an interrupted study continues
where it stopped; ``--shard i/n`` splits each phase's runs over n processes (or machines sharing
the folder), each waiting for the others' runs at the end of a phase.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from provq.ablation.runner import Ablation
from provq.ablation.statistics import mean_std
from provq.ablation.variants import STUDY, VARIANTS, select
from provq.common.errors import ConfigError
from provq.common.signals import pause

WAIT_SECONDS = 30  # how often a shard looks for the other shards' runs


@dataclass(frozen=True)
class StudyPlan:
    seeds: int = 3
    resolutions: tuple[int, ...] = (32, 64)
    generation_at_high: bool = False  # priors at the higher resolutions too (4x the codes per image)
    shard: int = 0
    shards: int = 1
    families: dict = None  # family -> (hard, switch at start, at mid, at end, ramp), a cut one None; None: STUDY
    generation: bool = True  # priors, gFID and bits/code for each family's picks

    @property
    def variants(self) -> dict[str, tuple[str, ...]]:
        return self.families or STUDY


def study_families(names: str | None) -> dict:
    """STUDY, or only the named variants of it: a variant left out is None (its comparisons are left
    out of the report), a family none of whose variants is named is left out, and a family kept keeps
    its hard codes and at least one progressive variant."""
    if not names:
        return dict(STUDY)
    wanted = {variant.name for variant in select(names)}
    unknown = wanted - {n for family in STUDY.values() for n in family}
    if unknown:
        raise ConfigError(f"--variants with --study: {', '.join(sorted(unknown))} not in the study; "
                          f"its variants: {', '.join(n for family in STUDY.values() for n in family)}")
    families = {}
    for family, names_of in STUDY.items():
        kept = tuple(n if n in wanted else None for n in names_of)
        if not any(kept):
            continue
        if kept[0] is None or not any(kept[1:]):
            raise ConfigError(f"--variants with --study: family {family} needs its hard codes ({names_of[0]}) "
                              f"and at least one of {', '.join(names_of[1:])}")
        families[family] = kept
    return families


def present(names) -> list[str]:
    """The variants of a family tuple that are run (a cut one is None)."""
    return [n for n in names if n is not None]


def mean_psnr(results: dict, name: str) -> float:
    return mean_std([r.get("psnr") for r in results[name]])[0]


def best(results: dict, names: list[str]) -> str:
    """The variant with the highest mean test PSNR (how the study picks among switches); None if none run."""
    names = present(names)
    return max(names, key=lambda name: mean_psnr(results, name)) if names else None


def generation_picks(families: dict, results: dict) -> dict[str, list[str]]:
    """Per family: hard codes, the best of the switches run, and the ramp (those of them run)."""
    return {family: present([hard, best(results, switches), ramp])
            for family, (hard, *switches, ramp) in families.items()}


def high_resolution_pairs(families: dict, results: dict) -> dict[str, list[str]]:
    """Per family: hard codes, and the best progressive variant (a switch or the ramp) at 32 px."""
    return {family: [hard, best(results, list(rest))] for family, (hard, *rest) in families.items()}


class Study:
    """The runs under ``out/px<resolution>/<variant>/seed<s>/``, laid out as the ablation's."""

    def __init__(self, args, setting, plan: StudyPlan, out: Path, log: Callable[[str], None] = print):
        self.plan, self.out, self.log = plan, out, log
        self.ablations = {}
        for resolution in plan.resolutions:
            at = copy.copy(args)
            at.resolution = resolution
            self.ablations[resolution] = Ablation(at, replace(setting, seeds=plan.seeds), out / f"px{resolution}")

    def _phase(self, what: str, resolution: int, names: list[str], done: Callable, run: Callable) -> dict:
        """Run this shard's share of names x seeds, wait for the other shards', then collect all."""
        ablation = self.ablations[resolution]
        jobs = [(name, seed) for name in names for seed in range(self.plan.seeds)]
        for name, seed in jobs[self.plan.shard :: self.plan.shards]:
            run(ablation, VARIANTS[name], seed)
        waiting = [job for job in jobs if not done(ablation.folder(VARIANTS[job[0]], job[1]))]
        while waiting:
            self.log(f"[study] {what} at {resolution} px: waiting for {len(waiting)} run(s) of other shards")
            pause(WAIT_SECONDS, f"while waiting for other shards' {what} runs")
            waiting = [job for job in waiting if not done(ablation.folder(VARIANTS[job[0]], job[1]))]
        return {name: [run(ablation, VARIANTS[name], seed) for seed in range(self.plan.seeds)] for name in names}

    def reconstruction(self, resolution: int, names: list[str]) -> dict:
        return self._phase("reconstruction", resolution, names, lambda run: (run / "rfid.json").exists(),
                           lambda ablation, variant, seed: ablation.tokenizer(variant, seed))

    def generation(self, resolution: int, names: list[str]) -> dict:
        ablation = self.ablations[resolution]
        if self.plan.shard == 0:
            ablation.reference()  # the other shards extract codes and train priors meanwhile
        return self._phase("generation", resolution, names, lambda run: (run / "gfid.json").exists(),
                           lambda ablation, variant, seed: ablation.generation(variant, seed))

    def run(self) -> dict:
        """Every phase in order; returns, per resolution, the results the report needs."""
        low, *higher = self.plan.resolutions
        families = self.plan.variants
        results = self.reconstruction(low, [name for names in families.values() for name in present(names)])
        picks = generation_picks(families, results)
        found = {low: {"results": results, "picks": picks,
                       "generation": self.generation(low, [n for names in picks.values() for n in names])
                       if self.plan.generation else {}}}
        for resolution in higher:
            pairs = high_resolution_pairs(families, results)
            names = [n for names in pairs.values() for n in names]
            found[resolution] = {"results": self.reconstruction(resolution, names), "picks": pairs,
                                 "generation": self.generation(resolution, names)
                                 if self.plan.generation and self.plan.generation_at_high else {}}
        return found
