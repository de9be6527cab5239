"""The ablation's tokenizer variants: they differ only in how discretization arrives."""

from __future__ import annotations

from dataclasses import dataclass

Q = "--tokenizer.model.quantizer."
# The preset's ramp (emoji32, imagenet256 differ; the study's switches are placed on emoji32's):
# h = 0 for the first 10% of the run, then a cosine ramp to 1 over the next 30%.
RAMP_WARMUP, RAMP_TRANSITION = 0.1, 0.3
# FSQ levels for a target code count (Mentzer et al. 2023, section 4.1); LFQ takes log2(count) bits.
FSQ_LEVELS = {256: [8, 6, 5], 1024: [8, 5, 5, 5], 4096: [7, 5, 5, 5, 5], 16384: [8, 8, 8, 6, 5],
              65536: [8, 8, 8, 5, 5, 5]}


@dataclass(frozen=True)
class Variant:
    name: str
    schedule: str  # none | step | linear | cosine | sigmoid
    kmeans: bool
    l2: bool = False
    mechanism: str = "interpolate"
    warmup: float | None = None  # None: the preset's (emoji32: 10% continuous, then a 30% ramp)
    transition: float | None = None
    family: str = "vq"  # the quantizer kind: vq | fsq | lfq

    @property
    def hard(self) -> bool:
        """Hard VQ from the first step (the baselines ProVQ is judged against)."""
        return self.schedule == "none"

    @property
    def smooth(self) -> bool:
        """A ProVQ variant proper: a smooth ramp of the hardness."""
        return self.schedule not in ("none", "step")

    def overrides(self, codebook_size: int) -> list[str]:
        """The command-line fields of this variant at about ``codebook_size`` codes."""
        fields = [f"{Q}kind", self.family, *family_fields(self.family, codebook_size),
                  f"{Q}schedule.kind", self.schedule, f"{Q}kmeans_init", str(self.kmeans).lower(),
                  f"{Q}l2_normalize", str(self.l2).lower(), f"{Q}mechanism", self.mechanism]
        for name in ("warmup", "transition"):
            if getattr(self, name) is not None:
                fields += [f"{Q}schedule.{name}", str(getattr(self, name))]
        return fields


def family_fields(family: str, codebook_size: int) -> list[str]:
    """The family's parameters for about ``codebook_size`` codes (fsq: the paper's levels for that
    count; lfq: log2 of it in bits); the code count and dimension then follow from them."""
    from common.errors import ConfigError

    if family == "vq":
        return [f"{Q}codebook_size", str(codebook_size)]
    if family == "fsq" and codebook_size not in FSQ_LEVELS:
        raise ConfigError(f"no FSQ levels for {codebook_size} codes; the sizes with levels are {sorted(FSQ_LEVELS)}")
    if family == "lfq" and codebook_size & (codebook_size - 1):
        raise ConfigError(f"LFQ needs a power of two codes, not {codebook_size}")
    chosen = ([f"{Q}levels", str(FSQ_LEVELS[codebook_size]).replace(" ", "")] if family == "fsq"
              else [f"{Q}bits", str(codebook_size.bit_length() - 1)])
    return [*chosen, f"{Q}codebook_size", "null", f"{Q}codebook_dim", "null"]


def _switches_and_ramp(family: str, suffix: str, kmeans: bool, l2: bool) -> list[Variant]:
    """The study's curriculum variants of one family: a switch to hard codes at the ramp's start
    (`step`), midpoint (`step@mid`: the ramp's mean hardness) and end (`step@end`: the ramp's time on
    hard codes), and the cosine ramp, all with the ramp placed as RAMP_WARMUP / RAMP_TRANSITION."""
    at = {"step": RAMP_WARMUP, "step@mid": RAMP_WARMUP + RAMP_TRANSITION / 2,
          "step@end": RAMP_WARMUP + RAMP_TRANSITION}
    found = [Variant(f"{name}{suffix}", "step", kmeans, l2, warmup=warmup, family=family)
             for name, warmup in at.items()]
    return found + [Variant(f"cosine{suffix}", "cosine", kmeans, l2, warmup=RAMP_WARMUP,
                            transition=RAMP_TRANSITION, family=family)]


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
        Variant("step@mid+kmeans+l2", "step", True, True, warmup=RAMP_WARMUP + RAMP_TRANSITION / 2),
        Variant("step@end+kmeans+l2", "step", True, True, warmup=RAMP_WARMUP + RAMP_TRANSITION),
        # hardness as a temperature (issue 35): the decoder gets codebook mixtures annealed to hard
        # codes; each differs from cosine+kmeans+l2 in the mechanism only
        Variant("cosine+soft+kmeans+l2", "cosine", True, True, mechanism="soft"),
        Variant("cosine+gumbel+kmeans+l2", "cosine", True, True, mechanism="gumbel"),
    ]
    for family in ("fsq", "lfq"):  # the lookup-free families: no codebook, so no k-means and no l2
        found += [Variant(family, "none", False, family=family),
                  *_switches_and_ramp(family, f"+{family}", kmeans=False, l2=False),
                  Variant(f"cosine+{family}+stochastic", "cosine", False, mechanism="stochastic",
                          warmup=RAMP_WARMUP, transition=RAMP_TRANSITION, family=family)]
    return {v.name: v for v in found}


VARIANTS = _all()

# The comparisons that decide the question (README, "The ablation"): hard VQ with and without
# l2 codes and the k-means init; the warm-up-then-hard baseline; ProVQ as the paper states it
# (a smooth ramp, no k-means) and with the k-means init, with the 30% and a 60% ramp.
DEFAULT = ("vq", "vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+l2", "cosine+kmeans+l2",
           "cosine+kmeans+l2+long", "cosine+kmeans")
SWEEP = ("vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
QUICK = ("vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
# The three readings of hardness side by side (README, "Three readings of hardness"), with hard VQ:
# python -m ablation --variants <these> --seeds 3 (1,024 codes, 400 steps).
READINGS = ("vq+kmeans+l2", "cosine+kmeans+l2", "cosine+kmeans+l2+stochastic", "cosine+soft+kmeans+l2",
            "cosine+gumbel+kmeans+l2")
# The study (python -m ablation --study): per family, hard codes from the first step, the three
# switches and the ramp (VQ with LlamaGen's l2 codes and the k-means init after the warm-up).
STUDY = {
    "vq": ("vq+kmeans+l2", "step+kmeans+l2", "step@mid+kmeans+l2", "step@end+kmeans+l2", "cosine+kmeans+l2"),
    "fsq": ("fsq", "step+fsq", "step@mid+fsq", "step@end+fsq", "cosine+fsq"),
    "lfq": ("lfq", "step+lfq", "step@mid+lfq", "step@end+lfq", "cosine+lfq"),
}


def select(names: str | tuple[str, ...]) -> list[Variant]:
    """Variants by name (a tuple, or a comma-separated string); an unknown name lists the known ones."""
    from common.errors import ConfigError

    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    wanted = [n for n in wanted if n]
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant {unknown[0]!r}; the variants are {sorted(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(wanted)]
