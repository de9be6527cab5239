"""The ablation's tokenizer variants: they differ only in how discretization arrives, or in the remedy
for codebook collapse (EMA codebook, dead-code restart, rotation trick, SimVQ) that meets it."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from tokenizer.schedule import ScheduleConfig

Q = "--tokenizer.model.quantizer."
# Switches are placed on the preset's own ramp (preset_ramp: emoji32's is 10% continuous, then a 30%
# ramp): at its start, its middle (its mean hardness) or its end (its time on hard codes).
SWITCH_POINTS = ("start", "mid", "end")
# Dead-code restart's threshold on a code's EMA use per training call (vector-quantize-pytorch's unit). The
# emoji32 preset's calls hold 32 x 64 = 2,048 rows over 1,024 codes, 2 per code when used evenly: 0.5 is a
# quarter of that, which a code never used falls under about 70 steps after its codebook is set (its count
# starts at 1 and decays by 0.99 a step).
RESTART_THRESHOLD = 0.5
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
    at: str | None = None  # a switch placed on the preset's ramp: start | mid | end
    fit: str | None = None  # "start": the k-means fit at the ramp's start (the ramp's own fit), not at the switch
    ema: bool = False  # the remedies (vq only): EMA codebook, dead-code restart, rotation trick, SimVQ
    restart: bool = False
    rotation: bool = False
    simvq: bool = False

    @property
    def hard(self) -> bool:
        """Hard VQ from the first step (the baselines ProVQ is judged against)."""
        return self.schedule == "none"

    @property
    def smooth(self) -> bool:
        """A ProVQ variant proper: a smooth ramp of the hardness."""
        return self.schedule not in ("none", "step")

    def overrides(self, codebook_size: int, ramp: tuple[float, float] | None = None) -> list[str]:
        """The command-line fields of this variant at about ``codebook_size`` codes; ``ramp`` is the
        preset's (warmup, transition) (``preset_ramp``; None: ScheduleConfig's defaults), on which
        `at` and `fit` are placed."""
        warmup, transition = ramp or (ScheduleConfig.warmup, ScheduleConfig.transition)
        fields = [f"{Q}kind", self.family, *family_fields(self.family, codebook_size),
                  f"{Q}schedule.kind", self.schedule, f"{Q}kmeans_init", str(self.kmeans).lower(),
                  f"{Q}l2_normalize", str(self.l2).lower(), f"{Q}mechanism", self.mechanism]
        placed = {"start": warmup, "mid": warmup + transition / 2, "end": warmup + transition}
        schedule = {"warmup": placed[self.at] if self.at else self.warmup, "transition": self.transition,
                    "kmeans_at": placed[self.fit] if self.fit else None}
        for name, value in schedule.items():
            if value is not None:
                fields += [f"{Q}schedule.{name}", f"{value:g}"]
        return fields + self.remedy_fields()

    def remedy_fields(self) -> list[str]:
        """The remedies' fields, every one of them set (a preset's own values never leak in)."""
        return [f"{Q}ema_codebook", str(self.ema).lower(), f"{Q}codebook_ema_decay", "0.99",
                f"{Q}dead_code_threshold", str(RESTART_THRESHOLD if self.restart else 0.0),
                f"{Q}rotation_trick", str(self.rotation).lower(), f"{Q}simvq", str(self.simvq).lower()]


def family_fields(family: str, codebook_size: int) -> list[str]:
    """The family's parameters for about ``codebook_size`` codes (fsq: the paper's levels for that
    count; lfq: log2 of it in bits); the code count and dimension then follow from them."""
    from provq.common.errors import ConfigError

    if family == "vq":
        return [f"{Q}codebook_size", str(codebook_size)]
    if family == "fsq" and codebook_size not in FSQ_LEVELS:
        raise ConfigError(f"no FSQ levels for {codebook_size} codes; the sizes with levels are {sorted(FSQ_LEVELS)}")
    if family == "lfq" and codebook_size & (codebook_size - 1):
        raise ConfigError(f"LFQ needs a power of two codes, not {codebook_size}")
    chosen = ([f"{Q}levels", str(FSQ_LEVELS[codebook_size]).replace(" ", "")] if family == "fsq"
              else [f"{Q}bits", str(codebook_size.bit_length() - 1)])
    return [*chosen, f"{Q}codebook_size", "null", f"{Q}codebook_dim", "null"]


def preset_ramp(config: str) -> tuple[float, float]:
    """The preset's ramp (warmup, transition), both fractions of the run or both steps."""
    from provq.common.errors import ConfigError
    from provq.common.presets import preset_section

    schedule = preset_section(config, "tokenizer.model.quantizer.schedule", ScheduleConfig)
    fractions = [0 < x < 1 for x in (schedule.warmup, schedule.transition) if x]
    if len(set(fractions)) > 1:
        raise ConfigError(f"{config}: schedule warmup {schedule.warmup} and transition {schedule.transition} mix a "
                          "fraction of the run with steps; the study places its switches on a ramp given in one unit")
    return schedule.warmup, schedule.transition


def _switches_and_ramp(family: str, suffix: str, kmeans: bool, l2: bool) -> list[Variant]:
    """The study's curriculum variants of one family: a switch to hard codes at the preset ramp's start
    (`step`), midpoint (`step@mid`: the ramp's mean hardness) and end (`step@end`: the ramp's time on
    hard codes), and the preset's cosine ramp."""
    found = [Variant(f"{name}{suffix}", "step", kmeans, l2, at=at, family=family)
             for name, at in (("step", "start"), ("step@mid", "mid"), ("step@end", "end"))]
    return found + [Variant(f"cosine{suffix}", "cosine", kmeans, l2, family=family)]


def _remedies() -> list[Variant]:
    """Each remedy alone on hard VQ and with the preset's cosine ramp, each one thing away from its
    baseline (vq+kmeans+l2, cosine+kmeans+l2); EMA + restart together, as users combine them; and
    post-hoc quantization: continuous for 85% of the run, then k-means and hard codes to the end."""
    found = []
    for label, schedule in (("vq", "none"), ("cosine", "cosine")):
        for suffix, remedy in (("+ema", {"ema": True}), ("+restart", {"restart": True}),
                               ("+rotation", {"rotation": True}), ("+ema+restart", {"ema": True, "restart": True})):
            found.append(Variant(f"{label}+kmeans+l2{suffix}", schedule, True, True, **remedy))
        # SimVQ's codes are the map of a frozen basis, which k-means cannot set: one thing away from
        # vq+l2 / cosine+l2 (no k-means), two from the k-means baselines.
        found.append(Variant(f"{label}+l2+simvq", schedule, False, True, simvq=True))
    return [*found, Variant("step@0.85+kmeans+l2", "step", True, True, warmup=0.85)]


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
        Variant("step@mid+kmeans+l2", "step", True, True, at="mid"),
        Variant("step@end+kmeans+l2", "step", True, True, at="end"),
        # the switch with the k-means fit matched to the ramp's (issue 30): the codebook is fitted at the
        # ramp's start, on the same encoder state as cosine+kmeans+l2's, then the switch comes later
        Variant("step@mid+kmeans+l2+fit@start", "step", True, True, at="mid", fit="start"),
        Variant("step@end+kmeans+l2+fit@start", "step", True, True, at="end", fit="start"),
        *_remedies(),
        # hardness as a temperature (issue 35): the decoder gets codebook mixtures annealed to hard
        # codes; each differs from cosine+kmeans+l2 in the mechanism only
        Variant("cosine+soft+kmeans+l2", "cosine", True, True, mechanism="soft"),
        Variant("cosine+gumbel+kmeans+l2", "cosine", True, True, mechanism="gumbel"),
    ]
    for family in ("fsq", "lfq"):  # the lookup-free families: no codebook, so no k-means and no l2
        found += [Variant(family, "none", False, family=family),
                  *_switches_and_ramp(family, f"+{family}", kmeans=False, l2=False),
                  Variant(f"cosine+{family}+stochastic", "cosine", False, mechanism="stochastic", family=family)]
    return {v.name: v for v in found}


VARIANTS = _all()
# Is the curriculum better than what users would do anyway? Hard VQ and the ramp, each with every remedy,
# and a switch placed late (python -m provq.ablation --variants "$(python -c 'from provq.ablation.variants import
# REMEDIES; print(",".join(REMEDIES))')").
REMEDIES = ("vq+kmeans+l2", "cosine+kmeans+l2", *(v.name for v in _remedies()))

# The comparisons that decide the question (README, "The ablation"): hard VQ with and without
# l2 codes and the k-means init; the warm-up-then-hard baseline; ProVQ as the paper states it
# (a smooth ramp, no k-means) and with the k-means init, with the 30% and a 60% ramp.
DEFAULT = ("vq", "vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+l2", "cosine+kmeans+l2",
           "cosine+kmeans+l2+long", "cosine+kmeans")
SWEEP = ("vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
QUICK = ("vq+l2", "vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
# The three readings of hardness side by side (README, "Three readings of hardness"), with hard VQ:
# python -m provq.ablation --variants <these> --seeds 3 (1,024 codes, 400 steps).
READINGS = ("vq+kmeans+l2", "cosine+kmeans+l2", "cosine+kmeans+l2+stochastic", "cosine+soft+kmeans+l2",
            "cosine+gumbel+kmeans+l2")
# The study (python -m provq.ablation --study): per family, hard codes from the first step, the three
# switches and the ramp (VQ with LlamaGen's l2 codes and the k-means init after the warm-up).
STUDY = {
    "vq": ("vq+kmeans+l2", "step+kmeans+l2", "step@mid+kmeans+l2", "step@end+kmeans+l2", "cosine+kmeans+l2"),
    "fsq": ("fsq", "step+fsq", "step@mid+fsq", "step@end+fsq", "cosine+fsq"),
    "lfq": ("lfq", "step+lfq", "step@mid+lfq", "step@end+lfq", "cosine+lfq"),
}


def variant(name: str) -> Variant:
    """A variant by name: one of VARIANTS, or a switch at any fraction of the run, `step@F<suffix>` for a
    `step<suffix>` variant (post-hoc quantization: `step@0.85+kmeans+l2`, continuous for 85% of the run)."""
    from provq.common.errors import ConfigError

    if name in VARIANTS:
        return VARIANTS[name]
    switch = re.fullmatch(r"step@(0?\.\d+)(\+.*)?", name)
    base = VARIANTS.get("step" + (switch.group(2) or "")) if switch else None
    if base is None or base.schedule != "step" or not 0 < float(switch.group(1)) < 1:
        raise ConfigError(f"unknown variant {name!r}; the variants are {sorted(VARIANTS)}, and step@F<suffix> "
                          "for a fraction 0 < F < 1 of the run and a step<suffix> variant")
    fraction = float(switch.group(1))
    return replace(base, name=f"step@{fraction:g}{switch.group(2) or ''}", warmup=fraction, at=None)


def select(names: str | tuple[str, ...]) -> list[Variant]:
    """Variants by name (a tuple, or a comma-separated string); an unknown name lists the known ones."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    chosen = [variant(n) for n in wanted if n]
    return list({v.name: v for v in chosen}.values())
