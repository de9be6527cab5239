"""The ablation's tokenizer variants: they differ only in how discretization arrives."""

from __future__ import annotations

from dataclasses import dataclass

Q = "--tokenizer.model.quantizer."


@dataclass(frozen=True)
class Variant:
    name: str
    schedule: str  # none | step | linear | cosine | sigmoid
    kmeans: bool
    l2: bool = False
    mechanism: str = "interpolate"

    @property
    def hard(self) -> bool:
        """Hard VQ from the first step (the baselines ProVQ is judged against)."""
        return self.schedule == "none"

    @property
    def smooth(self) -> bool:
        """A ProVQ variant proper: a smooth ramp of the hardness."""
        return self.schedule not in ("none", "step")

    def overrides(self) -> list[str]:
        return [
            f"{Q}schedule.kind", self.schedule,
            f"{Q}kmeans_init", str(self.kmeans).lower(),
            f"{Q}l2_normalize", str(self.l2).lower(),
            f"{Q}mechanism", self.mechanism,
        ]


def base_variants() -> list[Variant]:
    """Every schedule with and without the k-means init, plus hard VQ with l2 codes."""
    found = []
    for schedule in ("none", "step", "linear", "cosine"):
        for kmeans in (False, True):
            label = "vq" if schedule == "none" else schedule
            found.append(Variant(label + ("+kmeans" if kmeans else ""), schedule, kmeans))
    found.append(Variant("vq+l2", "none", False, l2=True))
    return found


def derived_variants(best: Variant) -> list[Variant]:
    """The best smooth variant with l2 codes, and with the stochastic mechanism."""
    return [
        Variant(best.name + "+l2", best.schedule, best.kmeans, l2=True),
        Variant(best.name + "+stochastic", best.schedule, best.kmeans, mechanism="stochastic"),
    ]
