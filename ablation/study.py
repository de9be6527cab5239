"""The study: where annealing pays, family by family (python -m ablation --study).

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
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ablation.statistics import mean_std
from ablation.variants import STUDY, VARIANTS

WAIT_SECONDS = 30  # how often a shard looks for the other shards' runs


@dataclass(frozen=True)
class StudyPlan:
    seeds: int = 3
    resolutions: tuple[int, ...] = (32, 64)
    generation_at_high: bool = False  # priors at the higher resolutions too (4x the codes per image)
    shard: int = 0
    shards: int = 1
    families: dict = None  # family -> (hard, switch at start, at mid, at end, ramp); None: STUDY

    @property
    def variants(self) -> dict[str, tuple[str, ...]]:
        return self.families or STUDY


def mean_psnr(results: dict, name: str) -> float:
    return mean_std([r.get("psnr") for r in results[name]])[0]


def best(results: dict, names: list[str]) -> str:
    """The variant with the highest mean test PSNR (how the study picks among switches)."""
    return max(names, key=lambda name: mean_psnr(results, name))


def generation_picks(families: dict, results: dict) -> dict[str, list[str]]:
    """Per family: hard codes, the best of the three switches, and the ramp."""
    return {family: [hard, best(results, list(switches)), ramp]
            for family, (hard, *switches, ramp) in families.items()}


def high_resolution_pairs(families: dict, results: dict) -> dict[str, list[str]]:
    """Per family: hard codes, and the best progressive variant (a switch or the ramp) at 32 px."""
    return {family: [hard, best(results, list(rest))] for family, (hard, *rest) in families.items()}


class Study:
    """The runs under ``out/px<resolution>/<variant>/seed<s>/``, laid out as the ablation's."""

    def __init__(self, args, setting, plan: StudyPlan, out: Path, log: Callable[[str], None] = print):
        from ablation.__main__ import Ablation

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
            time.sleep(WAIT_SECONDS)
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
        results = self.reconstruction(low, [name for names in families.values() for name in names])
        picks = generation_picks(families, results)
        found = {low: {"results": results, "picks": picks,
                       "generation": self.generation(low, [n for names in picks.values() for n in names])}}
        for resolution in higher:
            pairs = high_resolution_pairs(families, results)
            names = [n for names in pairs.values() for n in names]
            found[resolution] = {"results": self.reconstruction(resolution, names), "picks": pairs,
                                 "generation": self.generation(resolution, names)
                                 if self.plan.generation_at_high else {}}
        return found
