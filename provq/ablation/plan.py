"""The study's report, made from its plan and its ledger alone:

    python -m provq.ablation.plan [--plan docs/results/study_plan.yaml] [--ledger docs/results/ledger.jsonl]
                                  [--out docs/results/study_ledger_report.md]
    python -m provq.ablation.plan --continue [--shards 2]      (make study-continue: runs what remains)

For each plan version: the runs planned, present and remaining; where they ran; each variant's
metrics over seeds; each planned comparison as a paired difference (mean, paired standard deviation,
95% t interval). A descriptive version (a pilot) stops there and adds the seeds each comparison
would need for two one-sided tests at the plan's margin; a version with primary comparisons gives
verdicts, Holm-adjusted over its primary family. Runs from different CPU models are kept apart unless a
check run (python -m provq.ablation ... --recheck) matched across them.
"""

from __future__ import annotations

import os
import shlex
import signal
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from provq.ablation.ledger import Ledger, key_of, this_machine, trained_on
from provq.ablation.report import GENERATION_METRICS, METRICS, interval_plot
from provq.ablation.statistics import (
    holm,
    paired_difference,
    paired_sd,
    pooled_sd,
    seeds_for_equivalence,
    tost_p,
    two_sided_p,
)
from provq.common.cli import CommandParser, command_name, run_command
from provq.common.errors import ConfigError
from provq.common.files import write_atomic
from provq.common.presets import load_yaml
from provq.pipeline.report import markdown_table

# A check run (--recheck) pools two CPU models' runs when these metrics agree within the tolerance.
CHECKED = ("psnr", "rfid", "codebook_usage")
CHECK_TOLERANCE = 1e-4
HIGHER = {key: higher for key, _, higher in METRICS + GENERATION_METRICS}
LABEL = {key: label for key, label, _ in METRICS + GENERATION_METRICS}


def relative_gap(a: float, b: float) -> float:
    """|a - b| relative to a (absolute below 1): what CHECK_TOLERANCE bounds for two runs to be the same."""
    return abs(a - b) / max(1.0, abs(a))


def margin_of(margins: dict, metric: str, baseline_mean: float) -> float | None:
    if metric in margins:
        return float(margins[metric])
    if f"{metric}_relative" in margins:
        return float(margins[f"{metric}_relative"]) * abs(baseline_mean)
    return None


def paired(runs: dict, a: str, b: str, metric: str) -> tuple[list, list]:
    """``metric`` of variants ``a`` and ``b`` over the seeds where both runs have it, in seed order (a
    generation version's seed has its tokenizer line before its generation line adds gFID)."""
    seeds = sorted(s for s in set(runs.get(a, {})) & set(runs.get(b, {}))
                   if runs[a][s]["metrics"].get(metric) is not None and runs[b][s]["metrics"].get(metric) is not None)
    return ([runs[a][s]["metrics"][metric] for s in seeds], [runs[b][s]["metrics"][metric] for s in seeds])


def by_variant(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """variant -> seed -> its run: a tokenizer line and its generation line (prior, gFID) as one, their
    metrics joined and their seconds added."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        had = found[row["variant"]].get(row["seed"])
        found[row["variant"]][row["seed"]] = row if had is None else {
            **had, "metrics": {**had["metrics"], **row["metrics"]}, "wall_s": had["wall_s"] + row["wall_s"]}
    return found


def version_section(name: str, version: dict, everything: list[dict], margins: dict, folder: Path,
                    family: int = 0) -> list[str]:
    """One plan version's section, from the whole ledger ``everything`` (its own lines, and the others for
    the tokenizers it trained again: ``retrained``); ``family``: the size of the plan's largest primary
    family, for the seed counts a pilot implies at its Holm-adjusted alpha."""
    rows = [r for r in everything if r["plan"] == name]
    setting, variants = version.get("setting", {}), version.get("variants", [])
    metrics = version.get("metrics", ["psnr", "rfid", "codebook_usage"])
    # runs_per_seed: 2 where each variant x seed is a tokenizer line and a generation line
    planned = planned_runs(version)
    lines = [f"## Plan version `{name}`", "", " ".join(str(version.get("purpose", "")).split()), ""]
    if version.get("superseded_by"):
        lines += [f"Superseded by `{version['superseded_by']}`: not run further (`--continue` skips it).", ""]
    elif version.get("command"):
        command = version_command(version)
        lines += ["Command (continues where the ledger stops; `--shard 0/2` and `--shard 1/2` share two cores, one "
                  "thread each; `make study-continue` runs both shards of every unfinished version, the bf16 ones first):", "",
                  "```", command, "```", ""]
    groups, said = pooled_groups(rows)
    rows = [r for r in rows if not r.get("recheck")]
    remaining = max(planned - len(rows), 0)
    pace = ""
    if rows and remaining:
        minutes = statistics.fmean(r["wall_s"] for r in rows) / 60
        pace = (f"At its runs' pace so far ({minutes:.1f} min each, two at once on two cores), the remaining "
                f"{remaining} take about {remaining * minutes / 2 / 60:.1f} hours. ")
    lines += [f"Runs: {len(rows)} of {planned} planned ({remaining} remaining). {pace}"
              f"Setting: {', '.join(f'{k} {v}' for k, v in setting.items())}.", ""]
    if not rows:
        return lines + ["No run of this version is in the ledger yet.", ""]
    said = said + retrained(name, everything)
    lines += [f"- {line}" for line in said] + ([""] if said else [])
    if len(groups) > 1:
        lines += [f"Runs from {len(groups)} groups of CPU models, kept apart (no check run matched across them: "
                  "`--recheck` adds one).", ""]
    for number, (cpu, group) in enumerate(groups.items()):
        commits = sorted({str(r.get("commit")) for r in group})
        recipes = sorted({r["recipe"] for r in group if r.get("recipe")})
        threads = sorted({r.get("threads") for r in group})
        wall = statistics.fmean(r["wall_s"] for r in group)
        lines += [f"### {cpu}: {len(group)} runs", "",
                  f"torch {', '.join(sorted({r['torch'] for r in group}))}; {threads} thread(s) per run; "
                  f"commit(s) {', '.join(commits)}; "
                  + (f"recipe {', '.join(recipes)} (ledger.recipe); " if recipes else "")
                  + f"{wall / 60:.1f} min per run on average (training and "
                  "evaluation; two runs shared the machine's two cores).", ""]
        lines += variant_table(variants, by_variant(group), metrics) + [""]
        if version.get("primary"):
            lines += verdict_table(version["primary"], by_variant(group), margins, complete=len(group) >= planned) + [""]
        lines += comparison_table(version.get("comparisons", []), by_variant(group), metrics, margins) + [""]
        if not version.get("primary"):
            lines += pooled_table(version.get("comparisons", []), by_variant(group), metrics, margins, family) + [""]
        panels = difference_panels(version.get("comparisons", []), by_variant(group), ("psnr", "codebook_usage", "rfid"))
        if panels:
            figure = interval_plot(panels, folder / f"study_ledger_{name}_{number}.png", "variant - baseline")
            lines += [f"![paired differences with 95% intervals, {cpu}]({figure.name})", ""]
    return lines


def pooled_groups(rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """The runs (check lines left out) grouped by where they trained (ledger.trained_on: the GPU, or the
    CPU model and its units), two groups pooled when a check line (--recheck: a run trained again on
    another machine) matches its original on CHECKED within CHECK_TOLERANCE (relative); and a sentence
    per check saying what it found."""
    checks = [r for r in rows if r.get("recheck")]
    runs = [r for r in rows if not r.get("recheck")]
    parent = {trained_on(r): trained_on(r) for r in runs + checks}

    def root(cpu: str) -> str:
        while parent[cpu] != cpu:
            cpu = parent[cpu]
        return cpu

    said = []
    for check in checks:
        original = next((r for r in runs if key_of({**r, "recheck": check["recheck"]}) == key_of(check)), None)
        name = f"{check['variant']} seed {check['seed']}"
        if original is None:
            said.append(f"check of {name} on {trained_on(check)}: its original is not in the ledger")
            continue
        pairs = [(original["metrics"].get(k), check["metrics"].get(k)) for k in CHECKED]
        same = all(a is not None and b is not None and relative_gap(a, b) <= CHECK_TOLERANCE for a, b in pairs)
        shown = ", ".join(f"{LABEL[k]} {a:.6g} / {b:.6g}" for k, (a, b) in zip(CHECKED, pairs, strict=True)
                          if a is not None and b is not None)
        if same:
            parent[root(trained_on(check))] = root(trained_on(original))
        said.append(f"check of {name}, {trained_on(original)} / {trained_on(check)}: {shown}: "
                    + ("the same within 1e-4 relative, pooled" if same else "not the same, kept apart"))
    groups: dict[str, list[dict]] = defaultdict(list)
    members = defaultdict(set)
    for cpu in parent:
        members[root(cpu)].add(cpu)
    for row in runs:
        groups[" + ".join(sorted(members[root(trained_on(row))]))].append(row)
    return dict(sorted(groups.items())), said


# A tokenizer run is the same experiment in two plan versions when these fields and the machine agree.
SAME_RUN = ("variant", "seed", "steps", "codebook_size", "resolution", "dataset", "config", "compile", "recipe")


def retrained(name: str, everything: list[dict]) -> list[str]:
    """Where version ``name`` trained a tokenizer that another version's line earlier in the ledger
    holds (the same SAME_RUN fields, on the same machine: study-1-gen retrains study-1's tokenizers where
    their folders are gone), whether the two lines agree on CHECKED within CHECK_TOLERANCE: seed s
    meaning the same run across invocations, processes and commits. One sentence, or none."""
    earlier, pairs = {}, []
    for row in everything:
        if row.get("recheck") or row.get("prior_steps") is not None or not row.get("recipe"):
            continue  # check lines, generation lines, and lines from before the recipe was recorded
        key = (*(row.get(k) for k in SAME_RUN), trained_on(row))
        if row["plan"] != name:
            earlier.setdefault(key, row)
        elif key in earlier:
            pairs.append((earlier[key], row))
    if not pairs:
        return []
    worst, differ = 0.0, []
    for before, again in pairs:
        gaps = [relative_gap(before["metrics"][k], again["metrics"][k])
                for k in CHECKED if before["metrics"].get(k) is not None and again["metrics"].get(k) is not None]
        worst = max([worst, *gaps])
        if not gaps or max(gaps) > CHECK_TOLERANCE:
            differ.append(f"{again['variant']} seed {again['seed']} (`{before['plan']}` rFID "
                          f"{before['metrics'].get('rfid', float('nan')):.6g}, here "
                          f"{again['metrics'].get('rfid', float('nan')):.6g})")
    versions = ", ".join(f"`{v}`" for v in sorted({b["plan"] for b, _ in pairs}))
    head = (f"{len(pairs)} of its tokenizers were trained again as {versions} trained them (the same variant, "
            f"seed, steps, recipe and machine; commits {', '.join(sorted({str(a.get('commit')) for _, a in pairs}))} "
            f"against {', '.join(sorted({str(b.get('commit')) for b, _ in pairs}))}): ")
    if not differ:
        return [head + f"all {len(pairs)} give the same PSNR, rFID and usage within 1e-4 relative (largest relative "
                       f"difference {worst:.2g}): a seed is the same run across invocations and commits."]
    return [head + f"{len(differ)} differ beyond 1e-4 relative: {'; '.join(differ)}."]


def variant_table(variants: list[str], runs: dict, metrics: list[str]) -> list[str]:
    table = []
    for variant in variants:
        seeds = runs.get(variant, {})
        walls = [r["wall_s"] / 60 for r in seeds.values()]
        row = {"variant": variant, "seeds": len(seeds), "min/run": f"{statistics.fmean(walls):.1f}" if walls else "-"}
        for metric in metrics:
            values = [r["metrics"][metric] for r in seeds.values() if r["metrics"].get(metric) is not None]
            row[LABEL.get(metric, metric)] = (f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"
                                              if len(values) > 1 else f"{values[0]:.4g}" if values else "-")
        table.append(row)
    columns = ["variant", "seeds", *[LABEL.get(m, m) for m in metrics], "min/run"]
    return ["Mean ± standard deviation over seeds:", "", markdown_table(table, columns)]


def verdicts(primary: list, runs: dict, margins: dict, alpha: float = 0.05) -> list[dict]:
    """Each primary (variant, baseline, metric): better, worse, equivalent within the margin, or undecided
    at n. Difference tests (paired t, two-sided) and equivalence tests (TOST) are each Holm-adjusted over
    the primary family; a comparison without two paired seeds is undecided at its n."""
    found = []
    for a, b, metric in primary:
        x, y = paired(runs, a, b, metric)
        differences = [p - q for p, q in zip(x, y, strict=True)]
        margin = margin_of(margins, metric, statistics.fmean(y)) if y else None
        tested = len(differences) > 1
        found.append({"a": a, "b": b, "metric": metric, "n": len(differences), "diff": paired_difference(x, y),
                      "p": two_sided_p(differences) if tested else 1.0,
                      "p_eq": tost_p(differences, margin) if tested and margin else 1.0, "margin": margin})
    for key in ("p", "p_eq"):
        for row, adjusted in zip(found, holm([row[key] for row in found]), strict=True):
            row[f"{key}_holm"] = adjusted
    for row in found:
        if row["p_holm"] < alpha:
            row["verdict"] = f"{row['a'] if (row['diff'].mean > 0) == HIGHER.get(row['metric'], True) else row['b']} better"
        elif row["p_eq_holm"] < alpha:
            row["verdict"] = f"equivalent within {row['margin']:.3g}"
        else:
            row["verdict"] = f"undecided at n = {row['n']}"
    return found


def verdict_table(primary: list, runs: dict, margins: dict, complete: bool = True) -> list[str]:
    """The primary comparisons' verdicts; before the version's planned n (``complete`` false) they are
    labelled interim: the plan fixes n and makes no sequential looks, so only the final table decides."""
    table = [{"comparison": f"{r['a']} - {r['b']}", "metric": LABEL.get(r["metric"], r["metric"]), "seeds": r["n"],
              "mean difference": "-" if r["n"] == 0 else f"{r['diff'].mean:+.4g}",
              "95% interval": "-" if r["diff"].low is None else f"[{r['diff'].low:+.3g}, {r['diff'].high:+.3g}]",
              "Holm p (difference)": f"{r['p_holm']:.3g}", "Holm p (equivalence)": f"{r['p_eq_holm']:.3g}",
              "verdict": r["verdict"]} for r in verdicts(primary, runs, margins)]
    columns = ["comparison", "metric", "seeds", "mean difference", "95% interval", "Holm p (difference)",
               "Holm p (equivalence)", "verdict"]
    if not complete:
        for row in table:
            row["verdict"] = f"interim ({row['verdict']})"
    head = ("Primary comparisons, decided as the plan says (Holm over the primary family, alpha 0.05):" if complete
            else "Primary comparisons, INTERIM: the planned runs are not all in, and the plan decides at its fixed n "
                 "only; these rows are a progress view, not verdicts (Holm over the primary family, alpha 0.05):")
    return [head, "", markdown_table(table, columns)]


def comparison_table(comparisons: list, runs: dict, metrics: list[str], margins: dict) -> list[str]:
    table, waiting = [], []
    for a, b in comparisons:
        if not any(paired(runs, a, b, metric)[0] for metric in metrics):
            waiting.append(f"`{a} - {b}`")
            continue
        for metric in metrics:
            x, y = paired(runs, a, b, metric)
            if not x:  # not measured yet (gFID before the seed's generation line)
                continue
            diff, sd = paired_difference(x, y), paired_sd(x, y)
            margin = margin_of(margins, metric, statistics.fmean(y))
            need = seeds_for_equivalence(sd, margin) if sd and margin else None
            table.append({
                "comparison": f"{a} - {b}", "metric": LABEL.get(metric, metric), "seeds": diff.seeds,
                "mean difference": "-" if diff.seeds == 0 else f"{diff.mean:+.4g}",
                "paired sd": "-" if sd is None else f"{sd:.3g}",
                "95% interval": "-" if diff.low is None else f"[{diff.low:+.3g}, {diff.high:+.3g}]",
                "margin": "-" if margin is None else f"{margin:.3g}",
                "seeds for TOST": "-" if sd is None or margin is None else (str(need) if need else "> 200"),
            })
    columns = ["comparison", "metric", "seeds", "mean difference", "paired sd", "95% interval", "margin",
               "seeds for TOST"]
    return ["Paired differences (same seed: same start and batches), descriptive, uncorrected. `seeds for "
            "TOST`: seeds for two one-sided tests at the margin (alpha 0.05) to show equivalence with 80% power "
            "if the true difference were 0, from this paired sd.", "", markdown_table(table, columns)] + (
        ["", f"No paired seeds yet: {', '.join(waiting)}."] if waiting else [])


def pooled_table(comparisons: list, runs: dict, metrics: list[str], margins: dict, family: int) -> list[str]:
    """Per metric, the paired sd pooled over the version's comparisons (a common sd assumed: 3 seeds
    give a comparison 2 degrees of freedom, the pool many) and the seeds it implies for two one-sided
    tests at the margin, at alpha 0.05 and at 0.05 / ``family`` (Holm's strictest step)."""
    table = []
    for metric in metrics:
        pairs = [paired(runs, a, b, metric) for a, b in comparisons]
        pairs = [(x, y) for x, y in pairs if len(x) > 1]
        sd, df = pooled_sd([[p - q for p, q in zip(x, y, strict=True)] for x, y in pairs])
        baselines = [v for _, y in pairs for v in y]
        margin = margin_of(margins, metric, statistics.fmean(baselines)) if baselines else None
        if sd is None or margin is None:
            continue
        row = {"metric": LABEL.get(metric, metric), "comparisons": len(pairs), "df": df,
               "pooled paired sd": f"{sd:.3g}", "margin": f"{margin:.3g}",
               "seeds for TOST (alpha 0.05)": seeds_for_equivalence(sd, margin) or "> 200"}
        if family > 1:
            row[f"seeds (alpha 0.05/{family})"] = seeds_for_equivalence(sd, margin, alpha=0.05 / family) or "> 200"
        table.append(row)
    if not table:
        return []
    columns = list(table[0])
    return ["The paired sd pooled over these comparisons, per metric, and the seeds it implies for two one-sided "
            "tests at the margin with 80% power when the true difference is 0" + (
                f"; at alpha 0.05/{family}, the strictest step of Holm over the plan's largest primary family"
                if family > 1 else "") + ":", "", markdown_table(table, columns)]


def difference_panels(comparisons: list, runs: dict, metrics: tuple[str, ...]) -> dict:
    """interval_plot's panels: per metric, each comparison with two or more paired seeds."""
    panels = {}
    for metric in metrics:
        points = []
        for a, b in comparisons:
            x, y = paired(runs, a, b, metric)
            if len(x) > 1:
                points.append((f"{a} - {b}", paired_difference(x, y)))
        if points:
            panels[LABEL.get(metric, metric)] = ([p[0] for p in points], [p[1].mean for p in points],
                                                 [p[1].low for p in points], [p[1].high for p in points])
    return panels


def write_plan_report(plan_path: Path, ledger_path: Path, out: Path) -> Path:
    plan = load_yaml(plan_path)
    if "versions" not in plan:
        raise ConfigError(f"{plan_path}: no 'versions' (a study plan names its versions)")
    rows = Ledger(ledger_path, plan="").rows()
    lines = ["# The study, from its ledger", "",
             f"Generated by `python -m provq.ablation.plan` from `{plan_path.as_posix()}` and "
             f"`{ledger_path.as_posix()}` ({len(rows)} runs); do not edit by hand.", ""]
    family = max((len(v.get("primary") or []) for v in plan["versions"].values()), default=0)
    for name, version in plan["versions"].items():
        lines += version_section(name, version, rows, plan.get("margins", {}), out.parent, family)
    others = sorted({r["plan"] for r in rows} - set(plan["versions"]))
    if others:
        lines += [f"Runs of no planned version (exploratory, not reported): {', '.join(others)}.", ""]
    text = "\n".join(lines)
    write_atomic(out, lambda tmp: tmp.write_text(text), "the study's report")
    return out


def planned_runs(version: dict) -> int:
    """A version's planned ledger lines: variants x seeds (x 2 where a seed is a tokenizer and a
    generation line)."""
    return (len(version.get("variants", [])) * int(version.get("setting", {}).get("seeds", 0))
            * int(version.get("runs_per_seed", 1)))


def version_command(version: dict) -> str:
    """A version's command with its variants filled in, on one line."""
    variants = ",".join(version.get("variants", []))
    return " ".join(version["command"].split()).replace("<the variants below>", f'"{variants}"')


def next_version(plan: dict, rows: list[dict], skip: Iterable[str] = ()) -> str | None:
    """The first version with a command and runs still missing from the ledger, the versions in bf16
    first (``run_order``); neither one in ``skip`` nor one the plan says was superseded (``superseded_by``:
    replaced by a later version before it ran to its end)."""
    for name, version in run_order(plan):
        done = sum(1 for r in rows if r["plan"] == name and not r.get("recheck"))
        if (version.get("command") and not version.get("superseded_by") and name not in skip
                and done < planned_runs(version)):
            return name
    return None


def shard_commands(command: str, shards: int) -> list[list[str]]:
    """The version's command line as ``shards`` argument lists, share i of n each: its leading
    ``OMP_NUM_THREADS=1`` goes to the environment (continue_study sets one thread per shard), and
    ``python`` is this interpreter."""
    words = [w for w in shlex.split(command) if not w.startswith("OMP_NUM_THREADS=")]
    if words[:1] != ["python"] or "--shard" not in words:
        raise ConfigError(f"a plan command must start with 'python' and name --shard i/n: {command}")
    at = words.index("--shard") + 1
    return [[sys.executable, *words[1:at], f"{i}/{shards}", *words[at + 1:]] for i in range(shards)]


def launch(argv: list[str], log: Path) -> subprocess.Popen:
    """One shard, one torch thread, in a session of its own: a terminal's Ctrl-C reaches continue_study
    alone, which passes it on once (a second signal would stop a shard without its checkpoint)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def recipe_precision(version: dict) -> str:
    """The mixed precision a version's preset trains its tokenizers in ("no" without a preset)."""
    from provq.common.presets import load_preset

    preset = version.get("setting", {}).get("config")
    return load_preset(preset)["tokenizer"]["train"].get("mixed_precision", "no") if preset else "no"


def run_order(plan: dict) -> list[tuple[str, dict]]:
    """The plan's versions in the order ``--continue`` takes them: those whose recipe is in bf16 first,
    then the others, each group in the plan's order. Only a machine with bf16 units (AMX, AVX-512 BF16)
    or a GPU can add to a bf16 version, any machine to an fp32 one: such a machine spends its time where
    no other can (one without bf16 units refuses the bf16 versions and goes on to the rest)."""
    versions = list(plan["versions"].items())
    return sorted(versions, key=lambda item: item[1].get("command") is None or recipe_precision(item[1]) != "bf16")


def precision_refusal(version: dict) -> str | None:
    """Why this machine cannot train a version's runs at its recipe's precision (None when it can): a
    preset in bf16 on a CPU that would emulate it (training.accelerator.resolve_precision refuses it)."""
    from provq.training.accelerator import emulated_bf16

    return emulated_bf16() if recipe_precision(version) == "bf16" else None


def last_line(log: Path) -> str:
    """A shard log's last line of text (progress bars end their lines with carriage returns)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def standing(rows: list[dict], here: str) -> str:
    """Where the machine ``here`` (ledger.trained_on) stands in one version's ledger lines, check lines
    included: ``first`` (no run yet), ``member`` (some runs are its own, or pooled with its own by a
    matching check), ``unchecked`` (every run is from elsewhere and it has no check yet) or ``apart``
    (its check did not match: the report keeps its runs apart)."""
    if not any(not r.get("recheck") for r in rows):
        return "first"
    groups, _ = pooled_groups(rows)
    if any(here in key.split(" + ") for key in groups):
        return "member"
    return "apart" if any(r.get("recheck") and trained_on(r) == here for r in rows) else "unchecked"


def run_processes(argvs: list[list[str]], logs: list[Path]) -> tuple[list[int], list[int]]:
    """Start each argument list (``launch``: one thread, a session of its own), pass SIGINT and SIGTERM
    on to each once, and wait for all: their exit codes and the signals received."""
    processes = [launch(argv, log) for argv, log in zip(argvs, logs, strict=True)]
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [process.wait() for process in processes]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return codes, stopped


def continue_study(plan_path: Path, ledger_path: Path, out: Path, shards: int, logs: Path) -> int:
    """Run the next unfinished version's command (``run_order``: the bf16 versions first) as ``shards``
    one-thread processes, wait for them, write
    the report, and go on to the next version until the plan is done or a shard stops (a signal: the
    shards stop after a step, keeping their checkpoints; run this again to continue).

    A version this machine cannot add to usefully is left for another, and the next one runs: a recipe
    in bf16 on a CPU that would emulate it; runs from another machine that this machine's check (the
    command with ``--recheck``, run first: the first variant's first seed trained again here) does not
    match, since the report keeps such runs apart. Returns the exit status: 0 when every version has
    its planned runs."""
    plan, here, left, checked = load_yaml(plan_path), this_machine(), {}, set()
    while (name := next_version(plan, rows := Ledger(ledger_path, plan="").rows(), left)) is not None:
        version = plan["versions"][name]
        if refusal := precision_refusal(version):
            print(f"[plan] {name}: {refusal}; its recipe is fixed, so its runs wait for a machine with bf16 units "
                  "(AMX, AVX-512 BF16) or a GPU; on to the next version", flush=True)
            left[name] = "bf16 recipe: a machine with bf16 units"
            continue
        mine = [r for r in rows if r["plan"] == name]
        where, others = standing(mine, here), ", ".join(sorted({trained_on(r) for r in mine} - {here}))
        if where == "apart":
            print(f"[plan] {name}: its runs come from {others}, and this machine's check ({here}) did not match them "
                  "(the report keeps them apart); on to the next version", flush=True)
            left[name] = f"its runs come from {others}"
            continue
        if where == "unchecked":
            if name in checked:  # the check ran and added nothing: do not loop
                print(f"[plan] {name}: its check finished without a check line in {ledger_path}", flush=True)
                return 1
            checked.add(name)
            print(f"[plan] {name}: its runs so far come from {others}; first a check on this machine ({here}): "
                  f"the first variant's first seed trained again, one thread; log {logs}/{name}_recheck.log",
                  flush=True)
            argvs, names = [[*shard_commands(version_command(version), 1)[0], "--recheck"]], ["recheck"]
        else:
            argvs = shard_commands(version_command(version), shards)
            names = [f"shard{i}" for i in range(shards)]
            print(f"[plan] {name}: {shards} shard(s), one thread each; logs {logs}/{name}_shard*.log", flush=True)
        codes, stopped = run_processes(argvs, [logs / f"{name}_{n}.log" for n in names])
        write_plan_report(plan_path, ledger_path, out)
        if any(codes) or stopped:
            status = max(codes, key=abs) or 128 + stopped[0]
            for n, code in zip(names, codes, strict=True):
                if code and not stopped:  # a process that failed on its own: its error is its log's last line
                    print(f"[plan] {name} {n.replace('shard', 'shard ')}: {last_line(logs / f'{name}_{n}.log')}",
                          flush=True)
            print(f"[plan] {name}: stopped (exit {status}); see {logs}/{name}_*.log. "
                  "Run the same command again to continue.", flush=True)
            return status
        if where == "unchecked":
            continue  # its check is in: pooled, or kept apart
        if next_version(plan, Ledger(ledger_path, plan="").rows(), left) == name:  # its command cannot finish it
            planned = planned_runs(version)
            print(f"[plan] {name}: its command finished, yet the ledger has fewer than the {planned} runs the "
                  "plan's setting counts: the plan's variants, seeds and command disagree", flush=True)
            return 1
    if left:
        write_plan_report(plan_path, ledger_path, out)
        print("[plan] every version this machine can add to has its planned runs; left for other machines: "
              + "; ".join(f"{n} ({why})" for n, why in left.items()) + f"; report: {out}", flush=True)
        return 1
    print(f"[plan] every version of {plan_path} has its planned runs; report: {out}", flush=True)
    return 0


def main(argv=None) -> Path:
    parser = CommandParser(prog="python -m provq.ablation.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="docs/results/study_plan.yaml")
    parser.add_argument("--ledger", default="docs/results/ledger.jsonl")
    parser.add_argument("--out", default="docs/results/study_ledger_report.md")
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="run the next unfinished version's command (bf16 versions first, then the plan's order), shard by "
                             "shard, until "
                             "the plan is done; the report is written after each version and at every stop")
    parser.add_argument("--shards", type=int, default=2, help="with --continue: one-thread processes (default 2)")
    parser.add_argument("--logs", default="runs/study_logs", help="with --continue: the shards' logs")
    args = parser.parse_args(argv)
    if args.continue_:
        status = continue_study(Path(args.plan), Path(args.ledger), Path(args.out), args.shards, Path(args.logs))
        if status:
            raise SystemExit(status)
        return Path(args.out)
    out = write_plan_report(Path(args.plan), Path(args.ledger), Path(args.out))
    print(f"[plan] report: {out}", flush=True)
    return out


if __name__ == "__main__":
    run_command(command_name("python -m provq.ablation.plan"), main)
