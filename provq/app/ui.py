"""The page: Gradio Blocks over an AppSession (tokenizer, codebook and generate tabs)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from generator.sampling import SamplingConfig
from provq.app.session import AppSession
from provq.common.cli import user_error_line
from provq.common.errors import UserError

COMMAND = "python -m provq.app"


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


def enlarged(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Small images shown at about ``size`` pixels, each pixel a square (nearest): nothing is smoothed."""
    scale = max(1, size // max(image.shape[:2]))
    return np.kron(image, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else image


def usage_plot(counts: np.ndarray) -> np.ndarray:
    def draw(ax):
        ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0)
        ax.set_yscale("symlog")
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("uses on the test images")
    return figure_array(draw)


def geometry_plot(geometry: dict) -> np.ndarray:
    def draw(ax):
        codes = geometry["codes"]
        ax.scatter(codes[:, 0], codes[:, 1], s=6, alpha=0.5, label="codes in use")
        if geometry["latents"] is not None:
            z = geometry["latents"]
            ax.scatter(z[:, 0], z[:, 1], s=14, marker="x", color="crimson", label="this image's z_e")
        ax.set_title("first two principal axes of the used codes", fontsize=9)
        ax.legend(fontsize=7)
    return figure_array(draw)


def guarded(handler: Callable, outputs: int) -> Callable:
    """A handler whose user errors show as the CLI's one line in the page (the last output), never a
    traceback; on success that line is cleared."""
    import gradio as gr

    def run(*args):
        try:
            return (*handler(*args), "")
        except UserError as error:
            return (*[gr.update() for _ in range(outputs)], user_error_line(COMMAND, error))
    return run


def build(session: AppSession):
    import gradio as gr

    q = session.tok.config.quantizer
    with gr.Blocks(title="ProVQ") as page:
        gr.Markdown(f"## ProVQ tokenizer: {q.kind.upper()}, {q.codebook_size:,} codes, "
                    f"{session.resolution} px -> {session.tok.code_shape[0]}x{session.tok.code_shape[1]} codes")
        error = gr.Markdown("", elem_id="error")
        current = gr.State(None)
        tokenizer_tab(gr, session, error, current)
        codebook_tab(gr, session, error, current)
        if session.prior is not None:
            generate_tab(gr, session, error)
    return page


def tokenizer_tab(gr, session: AppSession, error, current) -> None:
    with gr.Tab("Tokenizer", elem_id="tab_tokenizer"):
        with gr.Row():
            index = gr.Number(value=0, precision=0, label="test image", elem_id="image_index",
                              visible=session.images is not None)
            upload = gr.File(label="or upload an image", type="filepath", elem_id="upload")
            run_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
        with gr.Row():
            original = gr.Image(label="original", elem_id="original", interactive=False, format="png")
            reconstruction = gr.Image(label="reconstruction (hard codes)", elem_id="reconstruction",
                                      interactive=False, format="png")
            code_map = gr.Image(label="code map (one colour per code)", elem_id="code_map", interactive=False,
                                format="png")
        measured = gr.Markdown(elem_id="image_metrics")
        hardness = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="hardness h: what the decoder sees "
                             "between the continuous latent (0) and its codes (1)", elem_id="hardness")
        at_hardness = gr.Image(label="decoded at h", elem_id="at_hardness", interactive=False, format="png")

    def reconstruct(number, path, h):
        image = session.uploaded_image(path) if path else session.test_image(int(number or 0))
        found = session.reconstruct(image)
        text = f"PSNR {found.psnr:.2f} dB, SSIM {found.ssim:.4f} (uint8 pixels, hard codes)"
        return (image, enlarged(found.original), enlarged(found.reconstruction), enlarged(found.code_map), text,
                enlarged(session.at_hardness(image, h)))

    def decoded_at(h, image):
        if image is None:
            raise UserError("reconstruct an image first")
        return (enlarged(session.at_hardness(image, h)),)

    run_button.click(guarded(reconstruct, 6), [index, upload, hardness],
                     [current, original, reconstruction, code_map, measured, at_hardness, error])
    hardness.change(guarded(decoded_at, 1), [hardness, current], [at_hardness, error])


def codebook_tab(gr, session: AppSession, error, current) -> None:
    with gr.Tab("Codebook", elem_id="tab_codebook"):
        button = gr.Button("Show for the current image", elem_id="codebook_refresh")
        with gr.Row():
            usage = gr.Image(label="code usage", elem_id="usage_plot", interactive=False, format="png")
            geometry = gr.Image(label="codes and encoder outputs", elem_id="geometry_plot", interactive=False,
                                format="png")
        summary = gr.Markdown(elem_id="codebook_summary")

    def codebook(image):
        counts = session.counts
        text = ("no --dataset: usage is unknown" if counts is None else
                f"{int((counts > 0).sum()):,} of {len(counts):,} codes used on "
                f"{min(len(session.images), 512)} test images; {int((counts == 0).sum()):,} never used")
        return (usage_plot(counts) if counts is not None else None,
                geometry_plot(session.code_geometry(image)), text)

    button.click(guarded(codebook, 3), [current], [usage, geometry, summary, error])


def generate_tab(gr, session: AppSession, error) -> None:
    prior = session.prior.config
    names = session.label_names or [str(i) for i in range(prior.num_classes)]
    with gr.Tab("Generate", elem_id="tab_generate"):
        with gr.Row():
            label = gr.Dropdown(choices=[(n, i) for i, n in enumerate(names)] or [("no classes", -1)],
                                value=0 if prior.num_classes else -1, label="class", elem_id="label")
            cfg = gr.Slider(0.0, 6.0, value=2.0 if prior.num_classes else 1.0, step=0.1, label="CFG scale",
                            elem_id="cfg_scale")
            temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="temperature", elem_id="temperature")
        with gr.Row():
            top_k = gr.Number(value=0, precision=0, label="top-k (0: off)", elem_id="top_k")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", elem_id="top_p")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
            count = gr.Slider(1, 16, value=8, step=1, label="images", elem_id="count")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        samples = gr.Image(label="samples", elem_id="samples", interactive=False, format="png")
        seconds = gr.Markdown(elem_id="seconds")

    def run(*values):  # in the order of the inputs below
        label_value, cfg_value, temperature_value, k, p, seed_value, n = values
        settings = SamplingConfig(cfg_scale=float(cfg_value), temperature=float(temperature_value),
                                  top_k=int(k or 0), top_p=float(p))
        label_value = None if label_value is None else int(label_value)
        picture, took = session.generate(label_value, settings, int(seed_value or 0), int(n))
        return enlarged(picture, 512), f"{int(n)} samples in {took:.2f} s"

    button.click(guarded(run, 2), [label, cfg, temperature, top_k, top_p, seed, count], [samples, seconds, error])
