"""The page: Gradio Blocks over an AppSession, one function per tab, each event a named API endpoint.

Every failure is one line on the tab where it happened, and the results it would have replaced are
cleared with it: nothing on the page describes an input other than the one it says.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from generator.sampling import DEFAULT_CFG_SCALE
from provq.app.inputs import MAX_IMAGES, MAX_SEED, clamped_hardness, generate_request
from provq.app.outputs import OutputFolder
from provq.app.session import AppSession, ShownImage
from provq.app.views import code_grid_html, enlarged, escaped, geometry_plot, usage_plot
from provq.common.cli import user_error_line
from provq.common.errors import UserError

COMMAND = "python -m provq.app"
logger = logging.getLogger("app")


def guarded(handler: Callable, blanks: int) -> Callable:
    """``handler`` returns its outputs and, last, the line under them ("" or a note). On any
    failure the outputs are cleared (``blanks`` Nones) and the line says what went wrong: a user error
    as the CLI's one line, anything else as one line that names it a bug (the traceback goes to the
    server's log, never to the page)."""

    @functools.wraps(handler)
    def run(*args, **values):  # Gradio passes the inputs by position where the handler's names allow
        try:
            return handler(*args, **values)
        except UserError as error:
            line = user_error_line(COMMAND, error)
        except Exception as error:
            logger.exception("%s failed", handler.__name__)
            message = " ".join(f"{type(error).__name__}: {error}".split())
            line = f"{COMMAND}: internal error (a bug; the server's log has its traceback): {message}"
        return (*[None] * blanks, line)
    return run


def picture(gr, caption: str, elem_id: str):
    """An output image under its caption: no label or buttons drawn over the picture."""
    with gr.Column(min_width=160):
        gr.Markdown(f"**{caption}**", elem_id=f"{elem_id}_caption")
        return gr.Image(label=caption, show_label=False, buttons=[], elem_id=elem_id, interactive=False,
                        type="filepath")  # the handlers return PNG files (app.outputs)


def build(session: AppSession):
    import gradio as gr

    q = session.tok.config.quantizer
    # Gradio keeps every output file in its cache: clear files older than an hour, hourly.
    with gr.Blocks(title="ProVQ", delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## ProVQ tokenizer: {q.kind.upper()}, {q.codebook_size:,} codes, "
                    f"{session.resolution} px -> {session.tok.code_shape[0]}x{session.tok.code_shape[1]} codes")
        shown = gr.State(None)  # the ShownImage the Tokenizer tab shows; the other views follow it
        files = OutputFolder()
        image_changes = tokenizer_tab(gr, session, shown, files)
        show_codebook = codebook_tab(gr, session, shown, files)
        if session.prior is not None:
            generate_tab(gr, session, files)
        page.load(**show_codebook, api_name="codebook")
        for event in image_changes:
            event.then(**show_codebook, api_visibility="private")
    return page


@dataclass
class TokenizerWidgets:
    """The Tokenizer tab's inputs and outputs."""

    error: object
    index: object
    upload: object
    run_button: object
    measured: object
    original: object
    reconstruction: object
    code_grid: object
    codes_file: object
    hardness: object
    hardness_note: object
    at_hardness: object


def tokenizer_widgets(gr, session: AppSession) -> TokenizerWidgets:
    with gr.Tab("Tokenizer", elem_id="tab_tokenizer"):
        error = gr.Markdown(elem_id="tokenizer_error")
        with gr.Row():
            index = gr.Number(value=0, label="test image", elem_id="image_index", visible=session.images is not None)
            upload = gr.File(label="or upload an image (shown instead of the test image until removed)",
                             type="filepath", elem_id="upload")
            run_button = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct")
        measured = gr.Markdown(elem_id="image_metrics")
        with gr.Row():
            original = picture(gr, "original (the tokenizer's input)", "original")
            reconstruction = picture(gr, "reconstruction (hard codes)", "reconstruction")
            with gr.Column(min_width=160):
                gr.Markdown("**code indices** (coloured by index, a hint: each cell shows its code; hover for "
                            "its row and column)", elem_id="code_grid_caption")
                code_grid = gr.HTML(elem_id="code_grid")
                codes_file = gr.File(label="the code indices as .npy", elem_id="codes_file", interactive=False)
        hardness = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="hardness h: what the decoder sees "
                             "between the continuous latent (0) and its codes (1)", elem_id="hardness")
        hardness_note = gr.Markdown(elem_id="hardness_note")
        at_hardness = picture(gr, "decoded at h", "at_hardness")
    return TokenizerWidgets(error, index, upload, run_button, measured, original, reconstruction, code_grid,
                            codes_file, hardness, hardness_note, at_hardness)


def tokenizer_tab(gr, session: AppSession, shown, files: OutputFolder) -> list:
    """The tab and its events; returns the events after which another image (or none) is shown."""
    w = tokenizer_widgets(gr, session)

    def show(test_image, upload):
        image = session.uploaded_image(upload) if upload else session.test_image(test_image)
        found = session.reconstruct(image.pixels)
        text = f"{escaped(image.source)}: PSNR {found.psnr:.2f} dB, SSIM {found.ssim:.4f} (uint8 pixels, hard codes)"
        if image.note:
            text += f"  \n{escaped(image.note)}"
        return (image, files.image(enlarged(found.original)), files.image(enlarged(found.reconstruction)),
                code_grid_html(found.codes), files.codes(found.codes), text, "")

    def show_without_upload(test_image):  # the upload was removed: back to the test image, if there are any
        return show(test_image, None) if session.images is not None else (None,) * 6 + ("",)

    def decode_at_hardness(hardness, image: ShownImage | None):
        h, note = clamped_hardness(hardness)
        if image is None:
            return None, note or "reconstruct an image first: the slider decodes the image shown above"
        return files.image(enlarged(session.at_hardness(image.pixels, h))), note

    outputs = [shown, w.original, w.reconstruction, w.code_grid, w.codes_file, w.measured, w.error]
    source = {"test_image": w.index, "upload": w.upload}
    decode = dict(fn=guarded(decode_at_hardness, 1), inputs_kwargs={"hardness": w.hardness, "image": shown},
                  outputs=[w.at_hardness, w.hardness_note], preprocess=False)  # the range is checked here
    events = [w.run_button.click(guarded(show, 6), inputs_kwargs=source, outputs=outputs, api_name="reconstruct"),
              w.upload.upload(guarded(show, 6), inputs_kwargs=source, outputs=outputs, api_visibility="private"),
              w.upload.clear(guarded(show_without_upload, 6), inputs_kwargs={"test_image": w.index},
                             outputs=outputs, api_visibility="private"),
              w.index.submit(guarded(show, 6), inputs_kwargs=source, outputs=outputs, api_visibility="private")]
    # On release: the browser sends a typed 5 before it clamps the box to 1 (and sends no release then).
    # Registered first, so the endpoint's name is not taken by the private events below.
    w.hardness.release(**decode, api_name="decode_at_hardness")
    for event in events:
        event.then(**decode, api_visibility="private")
    return events


def codebook_tab(gr, session: AppSession, shown, files: OutputFolder) -> dict:
    """The tab's widgets; returns its event (for ``.then`` and ``load``): it follows the shown image."""
    with gr.Tab("Codebook", elem_id="tab_codebook"):
        error = gr.Markdown(elem_id="codebook_error")
        summary = gr.Markdown(elem_id="codebook_summary")
        with gr.Row():
            usage = picture(gr, "code usage on the test images", "usage_plot")
            geometry = picture(gr, "codes and the shown image's encoder outputs", "geometry_plot")

    def show_codebook(image: ShownImage | None):
        counts = session.counts
        if counts is None:
            size = session.tok.config.quantizer.codebook_size
            text = f"code usage is unknown (no --dataset): the plot shows all {size:,} codes, used or not"
        else:
            text = (f"{int((counts > 0).sum()):,} of {len(counts):,} codes used on "
                    f"{min(len(session.images), 512)} test images; {int((counts == 0).sum()):,} never used")
        text += f"  \nencoder outputs of: {escaped(image.source)}" if image is not None else "  \nno image shown"
        found = session.code_geometry(None if image is None else image.pixels)
        return (files.image(usage_plot(counts)) if counts is not None else None,
                files.image(geometry_plot(found.codes, found.latents, found.usage_known)), text, "")

    return dict(fn=guarded(show_codebook, 3), inputs_kwargs={"image": shown},
                outputs=[usage, geometry, summary, error])


def generate_tab(gr, session: AppSession, files: OutputFolder) -> None:
    names = session.class_names
    labelled = bool(names)
    with gr.Tab("Generate", elem_id="tab_generate"):
        error = gr.Markdown(elem_id="generate_error")
        with gr.Row():
            choices = names or ["none (the prior was trained on unlabelled data)"]
            label = gr.Dropdown(choices=choices, value=choices[0], label="class", elem_id="label",
                                interactive=labelled)
            cfg = gr.Number(value=DEFAULT_CFG_SCALE if labelled else 1.0, label="CFG scale (>= 0; 1: no guidance)",
                            elem_id="cfg_scale", interactive=labelled)
            temperature = gr.Number(value=1.0, label="temperature (>= 0; 0: greedy)", elem_id="temperature")
        with gr.Row():
            top_k = gr.Number(value=0, label="top-k (a whole number >= 0; 0: off)", elem_id="top_k")
            top_p = gr.Number(value=1.0, label="top-p (in (0, 1]; 1: off)", elem_id="top_p")
            seed = gr.Number(value=0, label=f"seed (0 to {MAX_SEED})", elem_id="seed")
            count = gr.Number(value=8, label=f"images (1 to {MAX_IMAGES})", elem_id="count")
        if labelled and not session.prior.config.label_names and names != session.label_names:
            gr.Markdown("this prior stores no class names (saved before they were kept) and no --dataset "
                        "names them: classes are numbered", elem_id="class_names_note")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        summary = gr.Markdown(elem_id="seconds")
        samples = picture(gr, "samples", "samples")

    def generate(**values):
        request = generate_request(values, names)
        grid, took = session.generate(request.label, request.sampling, request.seed, request.count)
        return files.image(enlarged(grid, 512)), f"{request.count} samples in {took:.2f} s: {request.describe(names)}", ""

    inputs = {"class_name": label, "cfg_scale": cfg, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "seed": seed, "images": count}
    # preprocess=False: the values arrive as typed (the API's too) and generate_request checks them.
    button.click(guarded(generate, 2), inputs_kwargs=inputs, outputs=[samples, summary, error],
                 api_name="generate", preprocess=False)
