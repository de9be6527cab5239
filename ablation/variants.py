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
    warmup: float | None = None  # None: the preset's (emoji32: 10% continuous, then a 30% ramp)
    transition: float | None = None

    @property
    def hard(self) -> bool:
        """Hard VQ from the first step (the baselines ProVQ is judged against)."""
        return self.schedule == "none"

    @property
    def smooth(self) -> bool:
        """A ProVQ variant proper: a smooth ramp of the hardness."""
        return self.schedule not in ("none", "step")

    def overrides(self) -> list[str]:
        fields = [f"{Q}schedule.kind", self.schedule, f"{Q}kmeans_init", str(self.kmeans).lower(),
                  f"{Q}l2_normalize", str(self.l2).lower(), f"{Q}mechanism", self.mechanism]
        for name in ("warmup", "transition"):
            if getattr(self, name) is not None:
                fields += [f"{Q}schedule.{name}", str(getattr(self, name))]
        return fields


def _all() -> dict[str, Variant]:
    found = []
    for schedule in ("none", "step", "linear", "cosine"):
        label = "vq" if schedule == "none" else schedule
        for kmeans in (False, True):
            for l2 in (False, True):
                name = label + ("+kmeans" if kmeans else "") + ("+l2" if l2 else "")
                found.append(Variant(name, schedule, kmeans, l2))
    found += [
        # the long ramp: 10% continuous, then 60% of the run from continuous to hard
        Variant("cosine+kmeans+l2+long", "cosine", True, True, warmup=0.1, transition=0.6),
        Variant("cosine+l2+long", "cosine", False, True, warmup=0.1, transition=0.6),
        Variant("cosine+kmeans+l2+stochastic", "cosine", True, True, mechanism="stochastic"),
        Variant("linear+kmeans+stochastic", "linear", True, False, mechanism="stochastic"),
    ]
    return {v.name: v for v in found}


VARIANTS = _all()

# The comparisons that decide the question (README, "The ablation"): hard VQ with and without
# l2 codes and the k-means init; the warm-up-then-hard baseline; ProVQ as the paper states it
# (a smooth ramp, no k-means) and with the k-means init, with the 30% and a 60% ramp.
DEFAULT = ("vq", "vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+l2", "cosine+kmeans+l2",
           "cosine+kmeans+l2+long", "cosine+kmeans")
SWEEP = ("vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
QUICK = ("vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")


def select(names: str | tuple[str, ...]) -> list[Variant]:
    """Variants by name (a tuple, or a comma-separated string); an unknown name lists the known ones."""
    from common.errors import ConfigError

    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant {unknown[0]!r}; the variants are {sorted(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(wanted)]
