"""The ablation's report: mean ± std per variant, usage curves, and one verdict per metric."""

from __future__ import annotations

import statistics
from pathlib import Path

from ablation.variants import Variant
from pipeline.report import markdown_table, plot_panels, read_jsonl, series

# (key in the eval JSON, column name, higher is better)
METRICS = [
    ("rfid", "rFID", False),
    ("psnr", "PSNR (dB)", True),
    ("codebook_usage", "usage", True),
    ("codebook_perplexity", "perplexity", True),
]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _values(results: list[dict], key: str) -> list[float]:
    return [r["metrics"].get(key) for r in results]


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4g} ± {std:.2g}" if len(values) > 1 else f"{mean:.4g}"


def table(variants, results, generation) -> str:
    rows = []
    for v in variants:
        row = {"variant": v.name, "seeds": len(results[v.name])}
        for key, column, _ in METRICS:
            row[column] = _cell(_values(results[v.name], key))
        row["gFID"] = _cell(_values(generation[v.name], "fid"))
        rows.append(row)
    return markdown_table(rows, ["variant", "seeds"] + [c for _, c, _ in METRICS] + ["gFID"])


def strongest(variants: list[Variant], results, predicate) -> Variant:
    """Among the variants ``predicate`` keeps, the one with the best mean PSNR."""
    chosen = [v for v in variants if predicate(v)]
    return max(chosen, key=lambda v: mean_std(_values(results[v.name], "psnr"))[0])


def verdict(name_a, a: list[float], name_b, b: list[float], column: str, higher: bool) -> str:
    """Is the difference of the means larger than the seed spread (std of a + std of b)?"""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    better = name_a if (diff > 0) == higher else name_b
    spread = sa + sb
    if len(a) < 2 or len(b) < 2:
        return f"- {column}: {name_a} {ma:.4g} vs {name_b} {mb:.4g} (one seed: no spread to compare with)"
    size = "larger" if abs(diff) > spread else "not larger"
    return (f"- {column}: {name_a} {ma:.4g} ± {sa:.2g} vs {name_b} {mb:.4g} ± {sb:.2g}; "
            f"{better} is better by {abs(diff):.3g}, {size} than the seed spread ({spread:.3g}).")


def comparison(title, a: Variant, b: Variant, results, generation) -> list[str]:
    lines = [f"### {title}: `{a.name}` vs `{b.name}`", ""]
    for key, column, higher in METRICS:
        lines.append(verdict(a.name, _values(results[a.name], key), b.name,
                             _values(results[b.name], key), column, higher))
    lines.append(verdict(a.name, _values(generation[a.name], "fid"), b.name,
                         _values(generation[b.name], "fid"), "gFID", False))
    return lines + [""]


def usage_plot(out: Path, variants) -> Path:
    lines = {}
    for v in variants:
        curves = [series(read_jsonl(p), "eval/usage") for p in sorted(out.glob(f"{v.name}/seed*/tok/metrics.jsonl"))]
        curves = [c for c in curves if c[0]]
        if curves:
            steps = curves[0][0]
            lines[v.name] = (steps, [statistics.fmean(c[1][i] for c in curves if i < len(c[1]))
                                     for i in range(len(steps))])
    # hard VQ dashed, AE warm-up then hard dotted, the smooth ramps solid
    styles = {v.name: {"linestyle": "--" if v.hard else ":" if not v.smooth else "-"} for v in variants}
    return plot_panels([("codebook usage (test split, mean over seeds)", lines)], out / "usage.png",
                       styles=styles)


def time_line(info: dict) -> str:
    """The ablation's time: its stages' own times summed (resumes included), and this invocation's."""
    line = (f"Time: {info['stage_minutes']} min summed over the {info['stages']} stages, each timed "
            f"when it ran; this invocation: {info['minutes']} min.")
    if info["untimed_stages"]:
        line += f" ({info['untimed_stages']} stages ran without a recorded time.)"
    return line


def write_report(out: Path, variants, results, generation, info: dict) -> Path:
    usage_plot(out, variants)
    provq = strongest(variants, results, lambda v: v.smooth)
    hard = strongest(variants, results, lambda v: v.hard)
    step_km = next(v for v in variants if v.name == "step+kmeans")
    smooth_km = strongest(variants, results, lambda v: v.smooth and v.kmeans and not v.l2
                          and v.mechanism == "interpolate")
    s = info["setting"]
    lines = [
        "# ProVQ ablation", "",
        f"Dataset `{info['dataset']}`, preset `{info['config']}`; {s['seeds']} seed(s); "
        f"{s['tokenizer_steps']} tokenizer steps per run; gFID from a prior of {s['prior_steps']} steps "
        f"and {s['num_samples']} samples ({'every seed' if info['full'] else 'seed 0'}) against the "
        f"{info['gfid_reference']}. "
        f"{time_line(info)}", "",
        "All metrics use hard quantization. Mean ± std over seeds. Strongest variants are chosen "
        "by mean PSNR. A difference counts as real only when it is larger than the seed spread "
        "(std of one + std of the other).", "",
        table(variants, results, generation), "",
        "![codebook usage over steps](usage.png)", "",
        "## Verdicts", "",
        *comparison("Best ProVQ vs strongest hard VQ", provq, hard, results, generation),
        *comparison("What the smooth ramp adds (both with k-means)", smooth_km, step_km, results, generation),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
