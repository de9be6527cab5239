"""The study's ledger: one JSON line per finished tokenizer run (and generation run), appended as it finishes.

A run is known by its key (plan version, variant, seed, steps, codes, resolution, dataset, preset):
a run already in the ledger is never run again, so any machine continues a study with the same
command, and the report is made from the ledger alone. Each line also says where it ran (commit,
CPU model, torch version, threads) and how long it took. Two processes may append to one ledger:
each line is written whole under an exclusive ``flock``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from provq.common.errors import FormatError, UserError
from provq.common.machine import machine

# "compile": true for runs with compiled blocks (--compile), whose numbers differ from eager ones in the
# last bits and so, over a training, in their trajectory; absent (None) for eager runs.
# A generation line (a prior trained on the tokenizer's codes, its samples' gFID) adds "prior_steps" and
# "num_samples" to its tokenizer's key; a tokenizer line has neither.
# A check line (--recheck: a run the ledger holds, trained again on another machine) adds "recheck": the
# CPU model it ran on; the report pools two CPUs' runs when a check matches its original.
KEY = ("plan", "variant", "seed", "steps", "codebook_size", "resolution", "dataset", "config", "compile",
       "prior_steps", "num_samples", "recheck")


# What a study writes as it goes (the ledger, the report and its pictures): changed, they do not make
# the code that trains a run differ from its commit.
STUDY_OUTPUTS = ("docs/results/ledger.jsonl", "docs/results/study_ledger_*")


def commit(root: Path | None = None) -> str | None:
    """The commit of the clone at ``root`` (this code's by default), with ``+dirty`` when tracked files
    other than STUDY_OUTPUTS differ from it (a study's second version starts after its first has appended
    to the ledger); None outside a clone."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude,glob){path}" for path in STUDY_OUTPUTS)],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def key_of(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def trained_on(row: dict) -> str:
    """Where a ledger line's run trained, as the report groups runs: the GPU's name, else the CPU's model
    and its widest unit (``machine.vector_units``: one model name covers CPUs with and without bf16
    units); the model alone on a line that does not record its units."""
    if row.get("device", "cpu") != "cpu":
        return row["device"]
    return f"{row['cpu']} ({row['cpu_units']})" if row.get("cpu_units") else row["cpu"]


def this_machine() -> str:
    """``trained_on`` for a run on this machine."""
    return trained_on(machine())


# The command-line shortcuts of a training run and the fields they set.
SHORTCUTS = {"seed": "tokenizer.train.seed", "max_steps": "tokenizer.train.max_steps"}


def recipe(config: dict, argv: list[str]) -> str:
    """A study's recipe: a short hash of a resolved config (``config_to_dict`` of the training script's
    config) without the fields its command line ``argv`` sets (the seed and steps, the key's fields, the
    cadence of evaluations and checkpoints). The runner resolves it without any variant's fields
    (``Ablation.recipe``), so every run of a study on one preset gets the same recipe, and the recipe
    changes only when the preset or a default of the code does: the batch, the learning rate, the
    model, the loss, the ramp. Such a change makes another experiment, which a plan version must not
    mix in (``Ledger.check_recipe``)."""
    given = {SHORTCUTS.get(a[2:], a[2:]) for a in argv if a.startswith("--")}

    def flat(mapping: dict, prefix: str = "") -> dict:
        out = {}
        for name, value in mapping.items():
            out.update(flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
        return out

    kept = {name: value for name, value in flat(config).items() if name not in given}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


class Ledger:
    """The ledger file at ``path``; ``plan`` is the plan version each new line carries."""

    def __init__(self, path: str | Path, plan: str):
        self.path, self.plan = Path(path), plan
        # The code the runs ran: read when the process starts, not when a run ends (the working tree may
        # move on while a long run trains on the code it loaded).
        self.commit = commit()

    def rows(self) -> list[dict]:
        """Every line; a line that is not JSON (a torn write by a killed process) is named in the error."""
        if not self.path.exists():
            return []
        rows = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise FormatError(f"{self.path}:{number} is not a JSON line ({error.msg}); remove or fix that line") \
                    from None
        return rows

    def find(self, key: dict) -> dict | None:
        wanted = key_of({"plan": self.plan, **key})
        return next((row for row in self.rows() if key_of(row) == wanted), None)

    def check_recipe(self, found: str) -> None:
        """Refuse to add a run whose recipe differs from the ones this plan version's lines carry (a
        preset or a default changed since): it would mix two experiments in one comparison. Lines
        without a recipe (written before ledgers carried one) do not count."""
        other = next((row for row in self.rows() if row.get("plan") == self.plan
                      and row.get("recipe") not in (None, found)), None)
        if other is not None:
            raise UserError(
                f"plan {self.plan!r} in {self.path} was run with recipe {other['recipe']} ({other['variant']} seed "
                f"{other['seed']}, commit {other.get('commit')}); this code and preset give recipe {found}: the "
                "preset or a default changed, which makes a new plan version (docs/results/study_plan.yaml)")

    def append(self, key: dict, metrics: dict, wall_s: float, recipe: str | None = None) -> dict:
        """Add the run's line (unless a concurrent writer added the same run first); the line."""
        where = machine()
        row = {"plan": self.plan, **key, **({"recipe": recipe} if recipe else {}),
               "commit": self.commit, "cpu": where["cpu"],
               **({"cpu_units": where["cpu_units"]} if where.get("cpu_units") else {}), "torch": where["torch"],
               "threads": where["threads"], "device": where["device"], "wall_s": round(wall_s, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if self.find(key) is None:
                    f.write(json.dumps(row, sort_keys=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return row
