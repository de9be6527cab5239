"""Report pieces shared by the demo and the ablation: JSONL curves, plots, Markdown tables."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping lines that do not have it."""
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_panels(panels: list[tuple[str, dict[str, tuple[list, list]]]], path: str | Path,
                title: str = "", styles: dict[str, dict] | None = None) -> Path:
    """One subplot per (ylabel, {legend: (steps, values)}); written as a PNG.

    ``styles`` maps a legend entry to extra ``plot`` keywords (e.g. a line style per family).
    Past 10 lines the colours come from tab20 and the legend moves outside, so no two lines
    share a look and the legend hides no curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = max((len(lines) for _, lines in panels), default=0) > 10
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + (2.4 if many else 0), 3.4),
                             squeeze=False)
    colors = plt.get_cmap("tab20").colors if many else plt.get_cmap("tab10").colors
    for ax, (ylabel, lines) in zip(axes[0], panels, strict=True):
        for i, (label, (xs, ys)) in enumerate(lines.items()):
            style = {"linewidth": 1.4, "color": colors[i % len(colors)], **(styles or {}).get(label, {})}
            ax.plot(xs, ys, label=label, **style)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        elif len(lines) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
