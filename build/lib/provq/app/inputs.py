"""The page's and the API's raw values as checked settings: anything out of range is refused in one line
naming the range, or (the hardness slider, which the browser clamps) clamped with a note that says so."""

from __future__ import annotations

import math
from dataclasses import dataclass

from generator.sampling import SamplingConfig
from provq.common.errors import ConfigError

MAX_IMAGES = 16  # samples per Generate click (sample.py makes any number)
MAX_SEED = 2**32 - 1


def number_text(value: float) -> str:
    """A number as a person writes it: 4294967295 and 0.5, not 4.29497e+09; 1e+20 stays short."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """Where a number may lie: [low, high] (None: unbounded), an open low end, whole numbers only."""

    low: float | None = None
    high: float | None = None
    whole: bool = False
    low_open: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        if self.low is None:
            return kind
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {number_text(self.low)}"
        return f"{kind} in {'(' if self.low_open else '['}{number_text(self.low)}, {number_text(self.high)}]"

    def inside(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def check(self, name: str, value) -> float | int:
        """``value`` as a float (an int when whole), or a ConfigError naming ``name`` and the range."""
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{name} must be {self.describe()}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")
        if not math.isfinite(value) or (self.whole and value != int(value)) or not self.inside(value):
            raise ConfigError(f"{name} must be {self.describe()}, got {number_text(value)}")
        return int(value) if self.whole else float(value)


HARDNESS = Bounds(0.0, 1.0)
CFG_SCALE = Bounds(0.0)
TEMPERATURE = Bounds(0.0)
TOP_K = Bounds(0, whole=True)
TOP_P = Bounds(0.0, 1.0, low_open=True)
SEED = Bounds(0, MAX_SEED, whole=True)
IMAGES = Bounds(1, MAX_IMAGES, whole=True)


def clamped_hardness(value) -> tuple[float, str]:
    """(the hardness to decode at, a note when it is not the value asked for). The page's slider clamps
    a typed 5 to 1 after sending it; the note says so instead of doing it silently."""
    asked = Bounds().check("hardness", value)
    hardness = min(max(asked, HARDNESS.low), HARDNESS.high)
    note = "" if hardness == asked else (f"hardness {number_text(asked)} is outside [0, 1]: "
                                        f"decoded at {number_text(hardness)}")
    return hardness, note


def class_index(value, class_names: list[str]) -> int:
    """A class given by its name (what the page's menu and the API schema offer) or by its index."""
    if isinstance(value, str) and value in class_names:
        return class_names.index(value)
    if isinstance(value, int | str) and not isinstance(value, bool) and str(value).strip().isdigit():
        index = int(value)
        if index < len(class_names):
            return index
    shown = ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")
    raise ConfigError(f"class {value!r} is not one of the prior's {len(class_names)} classes ({shown})")


@dataclass
class GenerateRequest:
    """One Generate click: the class (-1: the null class of a prior without classes) and how to sample."""

    label: int
    sampling: SamplingConfig
    seed: int
    count: int

    def describe(self, class_names: list[str]) -> str:
        s = self.sampling
        what = f"class {class_names[self.label]}" if self.label >= 0 else "no class (unlabelled prior)"
        if s.temperature == 0:
            drawn = "temperature 0 (greedy: top-k and top-p do not apply)"
        else:
            drawn = f"temperature {number_text(s.temperature)}, top-k {s.top_k or 'off'}, top-p {number_text(s.top_p)}"
        return f"{what}, seed {self.seed}, CFG {number_text(s.cfg_scale)}, {drawn}"


def generate_request(values: dict, class_names: list[str]) -> GenerateRequest:
    """The Generate tab's raw values (keys: class_name, cfg_scale, temperature, top_k, top_p, seed,
    images), checked. ``class_names`` is empty for a prior trained without classes."""
    cfg_scale = CFG_SCALE.check("CFG scale", values["cfg_scale"])
    if class_names:
        label = class_index(values["class_name"], class_names)
    elif cfg_scale != 1.0:
        raise ConfigError(f"CFG scale {number_text(cfg_scale)} needs classes, but the prior was trained on unlabelled data: "
                          "use 1")
    else:
        label = -1
    sampling = SamplingConfig(cfg_scale=cfg_scale, temperature=TEMPERATURE.check("temperature", values["temperature"]),
                              top_k=TOP_K.check("top-k", values["top_k"]), top_p=TOP_P.check("top-p", values["top_p"]))
    return GenerateRequest(label, sampling, SEED.check("seed", values["seed"]), IMAGES.check("images", values["images"]))
