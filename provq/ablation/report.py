"""The ablation's reports: a table per variant, paired verdicts, curves of usage and geometry, the sweep."""

from __future__ import annotations

import statistics
from pathlib import Path

from provq.ablation.statistics import judgement, mean_std, paired_difference, verdict_line
from provq.ablation.variants import Variant
from provq.pipeline.report import markdown_table, plot_panels, read_jsonl, series

# (key in a run's metrics, column, higher is better)
METRICS = [
    ("rfid", "rFID", False),
    ("psnr", "PSNR (dB)", True),
    ("ssim", "SSIM", True),
    ("codebook_usage", "usage", True),
    ("codebook_perplexity", "perplexity", True),
    ("train_psnr", "train PSNR", True),
    ("train_ssim", "train SSIM", True),
    ("dim_latents", "dim z_e", True),  # effective dimension of the encoder outputs (last evaluation)
    ("dim_codes", "dim codes", True),  # of the codes in use
]
GFID = ("fid", "gFID", False)
GENERATION_METRICS = [GFID, ("bits_per_code", "prior bits/code", False), ("distinct_grids", "distinct sample grids", True)]
SWEEP_METRICS = [("psnr", "PSNR (dB)", True), ("rfid", "rFID", False), ("codebook_usage", "usage", True),
                 ("dim_latents", "dim z_e", True)]
# Logged curves, per variant (mean over seeds): (key in metrics.jsonl, panel title)
CURVES = [
    ("eval/usage", "codebook usage (test batches)"),
    ("eval/psnr", "PSNR, test batches (dB)"),
    ("eval/dim_latents", "effective dim. of z_e"),
    ("eval/dim_codes", "effective dim. of used codes"),
    ("eval/code_distance", "mean |z_e - code|"),
    ("quantizer/ever_used", "codes ever used (training)"),
]
# The comparisons that decide the question; each is made when both of its variants ran.
COMPARISONS = [
    ("What the smooth ramp adds over a warm-up then hard codes", "cosine+kmeans+l2", "step+kmeans+l2"),
    ("A longer ramp (60% of the run) than the preset's (30%)", "cosine+kmeans+l2+long", "cosine+kmeans+l2"),
    ("ProVQ as the paper states it (no k-means) vs LlamaGen's hard VQ", "cosine+l2", "vq+l2"),
    ("What the k-means init adds to hard VQ", "vq+kmeans+l2", "vq+l2"),
    # the quantizer families at about 1,000 codes (the family variants, issue 21)
    ("FSQ: the ramp vs hard codes", "cosine+fsq", "fsq"),
    ("LFQ: the ramp vs hard codes", "cosine+lfq", "lfq"),
    ("VQ: the ramp vs hard codes (both with the k-means init)", "cosine+kmeans+l2", "vq+kmeans+l2"),
]
# The families against each other at about 1,000 codes, paired by seed (the ablation's and the study's).
FAMILY_COMPARISONS = [
    ("FSQ vs VQ, both hard", "fsq", "vq+kmeans+l2"),
    ("LFQ vs VQ, both hard", "lfq", "vq+kmeans+l2"),
    ("FSQ vs VQ, both with the ramp", "cosine+fsq", "cosine+kmeans+l2"),
    ("LFQ vs VQ, both with the ramp", "cosine+lfq", "cosine+kmeans+l2"),
]
COMPARISONS += FAMILY_COMPARISONS


def values(runs: list[dict | None], key: str) -> list[float | None]:
    return [None if r is None else r.get(key) for r in runs]


def _cell(vals: list[float | None]) -> str:
    present = [v for v in vals if v is not None]
    if not present:
        return ""
    mean, std = mean_std(present)
    return f"{mean:.4g} ± {std:.2g}" if len(present) > 1 else f"{mean:.4g}"


def table(variants: list[Variant], results: dict, generation: dict) -> str:
    rows = []
    for v in variants:
        row = {"variant": v.name, "seeds": len(results[v.name])}
        row.update({column: _cell(values(results[v.name], key)) for key, column, _ in METRICS})
        row.update({c: _cell(values(generation.get(v.name, []), k)) for k, c, _ in GENERATION_METRICS})
        rows.append(row)
    columns = ["variant", "seeds"] + [c for _, c, _ in METRICS] + [c for _, c, _ in GENERATION_METRICS]
    return markdown_table(rows, [c for c in columns if c in ("variant", "seeds") or any(r.get(c) for r in rows)])


def strongest(variants: list[Variant], results, predicate) -> Variant | None:
    """Among the variants ``predicate`` keeps, the one with the best mean test PSNR."""
    chosen = [v for v in variants if predicate(v)]
    return max(chosen, key=lambda v: mean_std(values(results[v.name], "psnr"))[0], default=None)


def comparison(title: str, a: str, b: str, results: dict, generation: dict) -> list[str]:
    lines = [f"### {title}: `{a}` vs `{b}`", ""]
    for key, column, higher in METRICS:
        difference = paired_difference(values(results[a], key), values(results[b], key))
        lines.append(verdict_line(column, (a, b), difference, higher))
    for key, column, higher in GENERATION_METRICS:
        difference = paired_difference(values(generation.get(a, []), key), values(generation.get(b, []), key))
        if difference.seeds:
            lines.append(verdict_line(column, (a, b), difference, higher))
    return lines + [""]


def comparisons(variants: list[Variant], results: dict, generation: dict) -> list[str]:
    names = {v.name for v in variants}
    provq = strongest(variants, results, lambda v: v.smooth)
    hard = strongest(variants, results, lambda v: v.hard)
    lines = []
    if provq and hard:
        lines += comparison("Best ProVQ vs strongest hard VQ (both by mean PSNR)", provq.name, hard.name,
                            results, generation)
    for title, a, b in COMPARISONS:
        if a in names and b in names:
            lines += comparison(title, a, b, results, generation)
    return lines


def mean_curve(logs: list[list[dict]], key: str) -> tuple[list, list]:
    curves = [c for c in (series(log, key) for log in logs) if c[0]]
    if not curves:
        return [], []
    steps = curves[0][0]
    return steps, [statistics.fmean(c[1][i] for c in curves if i < len(c[1])) for i in range(len(steps))]


def curve_panels(folder_of, variants: list[Variant]) -> list[tuple[str, dict]]:
    """Per logged curve, per variant, its (steps, mean over seeds) from the runs' metrics.jsonl."""
    logs = {v.name: [read_jsonl(p) for p in folder_of(v)] for v in variants}
    return [(title, {v.name: mean_curve(logs[v.name], key) for v in variants}) for key, title in CURVES]


def curves_plot(folder_of, variants: list[Variant], path: Path) -> Path:
    """Per variant, the mean over seeds of each logged curve (hard VQ dashed, warm-up dotted)."""
    panels = curve_panels(folder_of, variants)
    styles = {v.name: {"linestyle": "--" if v.hard else ":" if not v.smooth else "-"} for v in variants}
    return plot_panels(panels, path, styles=styles)


def time_line(info: dict) -> str:
    """The ablation's time: its stages' own times summed (resumes included), and this invocation's."""
    line = (f"Time: {info['stage_minutes']} min summed over the {info['stages']} stages, each timed "
            f"when it ran; this invocation: {info['minutes']} min.")
    if info["untimed_stages"]:
        line += f" ({info['untimed_stages']} stages ran without a recorded time.)"
    return line


def write_report(out: Path, variants: list[Variant], results: dict, generation: dict, info: dict) -> Path:
    curves_plot(lambda v: sorted(out.glob(f"{v.name}/seed*/tok/metrics.jsonl")), variants, out / "curves.png")
    s = info["setting"]
    lines = [
        "# ProVQ ablation", "",
        f"Dataset `{info['dataset']}`, preset `{info['config']}`, {s['codebook_size']} codes; {s['seeds']} seed(s); "
        f"{s['tokenizer_steps']} tokenizer steps per run; gFID from a prior of {s['prior_steps']} steps and "
        f"{s['num_samples']} samples ({'every seed' if info['full'] else 'seed 0'}) against the "
        f"{info['gfid_reference']}. {time_line(info)}", "",
        "All metrics use hard quantization: rFID, PSNR and SSIM on every test image, train PSNR and SSIM "
        "on every training image. Mean ± std over seeds. Seed s of every variant starts from the same "
        "weights (where shapes agree) and sees the same data order, so variants are compared seed by "
        "seed: the mean paired difference with its 95% t-interval; a difference is real when the "
        "interval excludes 0.", "",
        table(variants, results, generation), "",
        "![usage, PSNR and the geometry of latents and codes over the steps](curves.png)", "",
        "## Verdicts", "",
        *comparisons(variants, results, generation),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_sweep_report(out: Path, points: list[dict], info: dict) -> Path:
    """Per (codebook size, steps): best ProVQ minus best hard VQ, paired, for PSNR, rFID, usage and dim z_e."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key, column, higher in SWEEP_METRICS:
        for point in points:
            provq, hard, results = point["provq"], point["hard"], point["results"]
            difference = paired_difference(values(results[provq], key), values(results[hard], key))
            rows.append({"point": point["label"], "metric": column, "best ProVQ": provq, "best hard VQ": hard,
                         "ProVQ - hard": f"{difference.mean:+.4g}",
                         "95% interval": "" if difference.low is None else f"[{difference.low:+.3g}, {difference.high:+.3g}]",
                         "verdict": judgement((provq, hard), difference, higher) + "."})
    interval_plot(sweep_panels(points), out / "sweep.png", "best ProVQ - best hard VQ")
    table_rows = [{"point": p["label"], **{v: _cell(values(p["results"][v], "psnr")) for v in p["results"]}}
                  for p in points]
    lines = ["# ProVQ scale sweep", "", f"{time_line(info)}", "",
             "Test PSNR per variant (mean ± std over seeds):", "",
             markdown_table(table_rows, ["point", *points[0]["results"]]) if points else "", "",
             "Best ProVQ minus best hard VQ (each by mean PSNR at that point), paired by seed:", "",
             markdown_table(rows, ["point", "metric", "best ProVQ", "best hard VQ", "ProVQ - hard",
                                   "95% interval", "verdict"]), "",
             "![paired differences against codebook size and budget](sweep.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def sweep_panels(points: list[dict]) -> dict:
    """Per metric: (point labels, mean paired difference best ProVQ - best hard VQ, interval lows, highs)."""
    panels = {}
    for key, column, _ in SWEEP_METRICS:
        differences = [paired_difference(values(p["results"][p["provq"]], key), values(p["results"][p["hard"]], key))
                       for p in points]
        panels[column] = ([p["label"] for p in points], [d.mean for d in differences],
                          [d.low for d in differences], [d.high for d in differences])
    return panels


def interval_plot(panels: dict, path: Path, what: str) -> Path:
    """One panel per metric: a point per comparison, its mean paired difference with the 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = max(len(xs) for xs, *_ in panels.values()) > 6  # many comparisons: one row each, names on the left
    size = (4.2 * len(panels) + 3.5, 0.32 * max(len(xs) for xs, *_ in panels.values()) + 1.2) if many else \
        (4.6 * len(panels), 3.6)
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False, sharey=many)
    for i, (ax, (column, (xs, means, lows, highs))) in enumerate(zip(axes[0], panels.items(), strict=True)):
        positions = range(len(xs))
        errors = [[m - lo if lo is not None else 0 for m, lo in zip(means, lows, strict=True)],
                  [hi - m if hi is not None else 0 for m, hi in zip(means, highs, strict=True)]]
        if many:
            ax.errorbar(means, positions, xerr=errors, fmt="o", capsize=3)
            ax.axvline(0, color="grey", linewidth=0.8)
            if i == 0:  # the axes share y: the names once, on the left
                ax.set_yticks(list(positions), xs, fontsize=7)
                ax.invert_yaxis()
            else:
                ax.tick_params(labelleft=False)
        else:
            ax.errorbar(positions, means, yerr=errors, fmt="o", capsize=4)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xticks(list(positions), xs, rotation=20, fontsize=7)
        ax.set_title(f"{column}: {what}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
