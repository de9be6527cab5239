"""What the page draws from the session's arrays: enlarged pictures, sample grids, the code grid (every
cell names its code) and the codebook plots."""

from __future__ import annotations

import colorsys
import html
import io
from collections.abc import Callable

import numpy as np


def enlarged(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Small images shown at about ``size`` pixels, each pixel a square (nearest): nothing is smoothed."""
    scale = max(1, size // max(image.shape[:2]))
    return np.kron(image, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else image


def grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one picture with `columns` per row (white padding)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = image
    return canvas


def code_colour(code: int) -> tuple[int, int, int]:
    """A code's colour: hue by a golden-ratio walk over the index, three brightness levels. A hint only:
    a codebook of thousands has more codes than distinguishable colours, so each cell also shows its code."""
    hue = (code * 0.618033988749895) % 1.0
    value = 0.55 + 0.45 * (code % 3) / 2
    return tuple(round(255 * x) for x in colorsys.hsv_to_rgb(hue, 0.75, value))


def code_grid_html(codes: np.ndarray, size: int = 256) -> str:
    """(h, w) code indices as a table about ``size`` pixels wide (cells of at least 20): each cell
    coloured by its code, showing the index and, on hover, its row and column."""
    cell = max(20, size // codes.shape[1])
    rows = []
    for r, row in enumerate(codes.tolist()):
        cells = []
        for c, code in enumerate(row):
            red, green, blue = code_colour(code)
            ink = "#000" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "#fff"
            cells.append(f'<td title="row {r}, column {c}: code {code}" style="background:rgb({red},{green},{blue});'
                         f'color:{ink};min-width:{cell}px;height:{cell}px;padding:0 2px;text-align:center;'
                         f'border:1px solid #fff">{code}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = ('<table class="code-grid" style="border-collapse:collapse;font:11px monospace;margin:0">'
             + "".join(rows) + "</table>")
    return f'<div style="overflow:auto;max-width:100%">{table}</div>'


def figure_array(draw: Callable, size=(4.2, 3.2)) -> np.ndarray:
    """A matplotlib drawing as an RGB array (shown as an image: no plot widget needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def usage_plot(counts: np.ndarray) -> np.ndarray:
    def draw(ax):
        ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0)
        ax.set_yscale("symlog")
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("uses on the test images")
    return figure_array(draw)


def geometry_plot(codes: np.ndarray, latents: np.ndarray | None, usage_known: bool) -> np.ndarray:
    """The codes (those used on the test images, or all of them when usage is unknown) and the shown
    image's encoder outputs, in the codes' first two principal axes."""
    which = "codes used on the test images" if usage_known else "all codes (usage unknown: no --dataset)"

    def draw(ax):
        ax.scatter(codes[:, 0], codes[:, 1], s=6, alpha=0.5, label=which)
        if latents is not None:
            ax.scatter(latents[:, 0], latents[:, 1], s=14, marker="x", color="crimson", label="this image's z_e")
        ax.set_title(f"first two principal axes of {'the used' if usage_known else 'all'} codes", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    return figure_array(draw)


def escaped(text: str) -> str:
    """Text for a Markdown line, with nothing in it read as markup (file names may hold * or _)."""
    return html.escape(text).replace("*", "&#42;").replace("_", "&#95;")
