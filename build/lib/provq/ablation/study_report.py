"""The study's report: a table per family and resolution, paired verdicts, plots of the paired differences."""

from __future__ import annotations

from pathlib import Path

from provq.ablation.report import (
    FAMILY_COMPARISONS,
    METRICS,
    _cell,
    interval_plot,
    time_line,
    values,
)
from provq.ablation.statistics import judgement, paired_difference, verdict_line
from provq.ablation.study import present
from provq.pipeline.report import markdown_table

RECONSTRUCTION = [m for m in METRICS if not m[0].startswith("train_")]
GENERATION = [("fid", "gFID", False), ("bits_per_code", "prior bits/code", False),
              ("bits_per_image", "prior bits/image", False), ("distinct_grids", "distinct sample grids", True),
              ("copied_grids", "samples copying a training grid", False),
              ("vocabulary_used", "share of the codes the samples use", True)]
PLOTTED = [("psnr", "PSNR (dB)", True), ("rfid", "rFID", False), ("codebook_usage", "usage", True)]


def family_table(names: list[str], results: dict, generation: dict) -> str:
    rows = []
    for name in names:
        row = {"variant": name, **{c: _cell(values(results[name], k)) for k, c, _ in RECONSTRUCTION}}
        row.update({c: _cell(values(generation.get(name, []), k)) for k, c, _ in GENERATION[:3]})
        rows.append(row)
    columns = ["variant"] + [c for _, c, _ in RECONSTRUCTION] + [c for _, c, _ in GENERATION[:3]]
    return markdown_table(rows, [c for c in columns if any(r.get(c) for r in rows)])


def questions(family: str, names: tuple[str, ...], found: dict) -> list[tuple[str, str, str]]:
    """(question, a, b) pairs of this family that decide the study's questions at 32 px; a pair with a
    variant that was not run (None in ``names``) is left out."""
    hard, start, mid, end, ramp = names
    picks = found["picks"][family]
    switch = picks[1] if len(picks) == 3 else None
    progressive = present((start, mid, end, ramp))
    pairs = [
        ("Does a continuous phase help? Best progressive variant vs hard codes",
         max(progressive, key=lambda n: _mean(found["results"][n], "psnr")), hard),
        ("Does the smooth ramp help beyond a switch at the same time on hard codes?", ramp, end),
        ("... beyond a switch at the same mean hardness?", ramp, mid),
        ("... beyond a switch at the ramp's start (the earlier study's baseline)?", ramp, start),
        ("Generation: the ramp vs hard codes", ramp, hard),
        ("Generation: the best switch vs hard codes", switch, hard),
        ("Generation: the ramp vs the best switch", ramp, switch),
    ]
    return [(q, a, b) for q, a, b in pairs if a is not None and b is not None]


def reconstruction_questions(family: str, names: tuple[str, ...], found: dict) -> list[tuple[str, str, str]]:
    return [q for q in questions(family, names, found) if not q[0].startswith("Generation")]


def _mean(runs: list[dict], key: str) -> float:
    present = [v for v in values(runs, key) if v is not None]
    return sum(present) / len(present) if present else float("-inf")


def verdicts(a: str, b: str, results: dict, generation: dict) -> list[str]:
    lines = []
    for key, column, higher in RECONSTRUCTION:
        lines.append(verdict_line(column, (a, b), paired_difference(values(results[a], key),
                                                                    values(results[b], key)), higher))
    if a in generation and b in generation:
        for key, column, higher in GENERATION:
            lines.append(verdict_line(column, (a, b), paired_difference(
                values(generation[a], key), values(generation[b], key)), higher))
    return lines


def summary_rows(families: dict, found: dict, resolution: int) -> list[dict]:
    """One row per family and comparison: the paired PSNR, rFID and usage differences and verdicts."""
    rows = []
    at = found[resolution]
    for family, names in families.items():
        pairs = reconstruction_questions(family, names, at) if resolution == min(found) else [
            ("Best progressive variant vs hard codes", at["picks"][family][1], at["picks"][family][0])]
        for _question, a, b in pairs:
            row = {"family": family, "comparison": f"`{a}` - `{b}`"}
            for key, column, higher in PLOTTED:
                d = paired_difference(values(at["results"][a], key), values(at["results"][b], key))
                interval = "" if d.low is None else f" [{d.low:+.3g}, {d.high:+.3g}]"
                row[column] = f"{d.mean:+.3g}{interval}: {judgement((a, b), d, higher)}"
            rows.append(row)
    return rows


def difference_panels(families: dict, found: dict) -> dict:
    """Per plotted metric: (comparison labels, mean paired differences, interval lows, highs) of every
    family's four reconstruction questions at the first resolution."""
    low = min(found)
    panels = {}
    for key, column, _ in PLOTTED:
        xs, means, lows, highs = [], [], [], []
        for family, names in families.items():
            for _question, a, b in reconstruction_questions(family, names, found[low]):
                d = paired_difference(values(found[low]["results"][a], key), values(found[low]["results"][b], key))
                xs.append(f"{family}: {a.split('+')[0]}-{b.split('+')[0]}")
                means.append(d.mean)
                lows.append(d.low)
                highs.append(d.high)
        panels[column] = (xs, means, lows, highs)
    return panels


def family_comparisons(at: dict, resolution: int) -> list[str]:
    """The families against each other (hard codes, then the ramp), paired by seed, where both ran."""
    pairs = [(title, a, b) for title, a, b in FAMILY_COMPARISONS if a in at["results"] and b in at["results"]]
    lines = [f"## The families side by side at {resolution} px", ""] if pairs else []
    for title, a, b in pairs:
        lines += [f"### {title}: `{a}` vs `{b}`", "", *verdicts(a, b, at["results"], at["generation"]), ""]
    return lines


def write_study_report(out: Path, families: dict, found: dict, info: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    low, *higher = sorted(found)
    plot = interval_plot(difference_panels(families, found), out / "study_differences.png", "paired difference")
    lines = ["# Where annealing pays: the study", "", info["description"], "", time_line(info), "",
             f"## {low} px: paired differences (95% t-intervals over {info['seeds']} seeds)", "",
             markdown_table(summary_rows(families, found, low), ["family", "comparison", "PSNR (dB)", "rFID", "usage"]),
             "", f"![paired differences at {low} px]({plot.name})", ""]
    for family, names in families.items():
        at = found[low]
        lines += [f"## {family} at {low} px", "",
                  "Mean ± std over seeds (the std is the seed-to-seed spread).", "",
                  family_table(present(names), at["results"], at["generation"]), ""]
        for question, a, b in questions(family, names, at):
            if question.startswith("Generation") and a not in at["generation"]:
                continue
            lines += [f"### {question}: `{a}` vs `{b}`", "", *verdicts(a, b, at["results"], at["generation"]), ""]
    lines += family_comparisons(found[low], low)
    for resolution in higher:
        at = found[resolution]
        lines += [f"## {resolution} px: hard codes vs the best progressive variant at {low} px", "",
                  markdown_table(summary_rows(families, found, resolution),
                                 ["family", "comparison", "PSNR (dB)", "rFID", "usage"]), ""]
        for family in families:
            hard, progressive = at["picks"][family]
            lines += [f"### {family}", "", family_table([hard, progressive], at["results"], at["generation"]), "",
                      *verdicts(progressive, hard, at["results"], at["generation"]), ""]
    path = out / "study_report.md"
    path.write_text("\n".join(lines))
    return path
