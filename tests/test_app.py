"""The browser app, used the way a person uses it: served on 127.0.0.1 and driven in headless Chromium.

The page's pictures and code indices are fetched as the browser got them and compared with what the
library computes for the input the page says it shows; bad input is one line on its own tab and clears
what it replaced; no label or button covers a picture. Skipped, saying why, only where Chromium, its
driver, selenium or gradio cannot be had (the Makefile installs them).
`PROVQ_APP_SCREENSHOTS=docs pytest tests/test_app.py` also saves a screenshot of each tab.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
from app_helpers import (
    CHROMIUM,
    DRIVER,
    code_grid,
    covering,
    errors_on_the_page,
    fetch,
    find,
    free_port,
    missing,
    open_page,
    open_tab,
    photo,
    picture,
    says,
    set_number,
    shot,
    shrink,
    source,
    text,
    text_on_tab,
    tiny_models,
    until,
    upload,
)
from PIL import Image
from training_helpers import reset_accelerate

from generator.sampling import SamplingConfig

pytestmark = pytest.mark.slow
NAMES = ["cat", "dog", "owl", "fox"]


def serve(tok, prior, dataset=None):
    """The app in this process on a free port, and the library session the oracles use."""
    from provq.app.__main__ import start
    from provq.app.session import AppSession

    port = free_port()
    argv = ["--tokenizer", str(tok), "--prior", str(prior), "--port", str(port)]
    page = start(argv + (["--dataset", str(dataset)] if dataset else []), block=False)
    return page, f"http://127.0.0.1:{port}/", AppSession.load(str(tok), str(prior), dataset and str(dataset))


@pytest.fixture(scope="module")
def served(image_folder, tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    tok, prior = tiny_models(tmp_path_factory.mktemp("app"))
    dataset = image_folder
    if os.environ.get("PROVQ_APP_TOKENIZER"):  # for README's screenshots: trained models, e.g. the demo's
        tok, prior, dataset = (os.environ[f"PROVQ_APP_{k}"] for k in ("TOKENIZER", "PRIOR", "DATASET"))
    page, url, session = serve(tok, prior, dataset)
    yield url, session
    page.close()
    reset_accelerate()


@pytest.fixture(scope="module")
def served_without_dataset(tmp_path_factory):
    """No --dataset, and a prior that stores its class names."""
    why = missing()
    if why:
        pytest.skip(why)
    page, url, session = serve(*tiny_models(tmp_path_factory.mktemp("app_named"), label_names=NAMES))
    yield url, session
    page.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_reconstruct_the_code_grid_the_hardness_slider_and_the_codebook_in_a_real_browser(served, browser):
    from selenium.webdriver.common.by import By

    url, session = served
    open_page(browser, url)
    set_number(browser, "#image_index input", 2)
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()
    shown, _ = picture(browser, "reconstruction")
    image = session.test_image(2).pixels
    expected = session.reconstruct(image)
    side = session.resolution
    assert shown.shape == (256, 256, 3) and shown.std() > 0  # enlarged to 256 px: not blank
    assert np.array_equal(shrink(shown, side), expected.reconstruction)
    assert np.array_equal(shrink(picture(browser, "original")[0], side), image)
    assert text(browser, "#image_metrics") == (f"test image 2: PSNR {expected.psnr:.2f} dB, SSIM {expected.ssim:.4f} "
                                               "(uint8 pixels, hard codes)")
    # every cell names its code (colours alone cannot tell thousands of codes apart); the .npy is the same
    until(lambda: code_grid(browser) is not None, "the code grid")
    assert np.array_equal(code_grid(browser), expected.codes)
    cell = browser.find_element(By.CSS_SELECTOR, "#code_grid tr:nth-child(2) td:nth-child(3)")
    assert cell.get_attribute("title") == f"row 1, column 2: code {expected.codes[1, 2]}"
    link = find(browser, "#codes_file a").get_attribute("href")
    assert np.array_equal(np.load(io.BytesIO(fetch(link))), expected.codes)
    at_one, source_at_one = picture(browser, "at_hardness")
    assert np.array_equal(shrink(at_one, side), session.at_hardness(image, 1.0))
    for element in ("original", "reconstruction", "at_hardness"):
        assert covering(browser, element) == [], element
    assert covering(browser, "code_grid", "table") == []
    shot(browser, "tokenizer")
    set_number(browser, "#hardness input[type=number]", 0)  # h = 0: the continuous autoencoder
    at_zero, _ = picture(browser, "at_hardness", previous=source_at_one)
    assert np.array_equal(shrink(at_zero, side), session.at_hardness(image, 0.0))
    assert not np.array_equal(at_zero, at_one)

    open_tab(browser, "Codebook")  # drawn for the shown image without a click
    until(lambda: says(browser, "#codebook_summary", "encoder outputs of: test image 2"), "the codebook follows")
    assert picture(browser, "geometry_plot")[0].std() > 0
    used = int((session.counts > 0).sum())
    assert f"{used:,} of {len(session.counts):,} codes used" in text(browser, "#codebook_summary")
    for element in ("usage_plot", "geometry_plot"):
        assert covering(browser, element) == [], element
    assert errors_on_the_page(browser) == []
    shot(browser, "codebook")


def test_generate_a_grid_in_a_real_browser(served, browser):
    from selenium.webdriver.common.by import By

    url, session = served
    open_page(browser, url)
    open_tab(browser, "Generate")
    set_number(browser, "#seed input", 5)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    shown, _ = picture(browser, "samples")
    expected, _ = session.generate(0, SamplingConfig(cfg_scale=2.0), 5, 8)  # the page's defaults, seed 5
    assert shown.std() > 0 and np.array_equal(shrink(shown, expected.shape[0]), expected)
    assert re.fullmatch(r"8 samples in \d+\.\d\d s: class class0, seed 5, CFG 2, temperature 1, top-k off, top-p 1",
                        text(browser, "#seconds"))
    assert covering(browser, "samples") == []
    shot(browser, "generate")


def test_a_bad_number_is_one_line_on_its_tab_and_clears_the_samples_it_replaced(served, browser):
    from selenium.webdriver.common.by import By

    url, session = served
    open_page(browser, url)
    open_tab(browser, "Generate")
    generate = browser.find_element(By.CSS_SELECTOR, "#generate")
    refused = [("seed", "1e20", 0, "seed must be a whole number in [0, 4294967295], got 1e+20"),
               ("top_k", -5, 0, "top-k must be a whole number >= 0, got -5"),
               ("count", 1000, 8, "images must be a whole number in [1, 16], got 1000"),
               ("top_p", 0, 1, "top-p must be a number in (0, 1], got 0")]
    for element, value, default, line in refused:
        generate.click()
        picture(browser, "samples")
        # A click while it runs is dropped; and the page draws one update's outputs one by one: the last
        # error line may still show after the seconds appear, and be read as the next one's.
        until(lambda: text(browser, "#seconds") and text(browser, "#generate_error") == "",
              "the generation finished and the last error line cleared")
        set_number(browser, f"#{element} input", value)
        generate.click()
        until(lambda: text(browser, "#generate_error"), f"an error line for {element} {value}")
        assert text(browser, "#generate_error") == f"python -m provq.app: error: {line}"
        until(lambda: source(browser, "samples") is None and text(browser, "#seconds") == "",
              "the old samples and the line under them cleared")
        set_number(browser, f"#{element} input", default)
    assert text_on_tab(browser, "Tokenizer", "#tokenizer_error") == ""  # the error stays on its tab
    assert text_on_tab(browser, "Codebook", "#codebook_error") == ""
    open_tab(browser, "Generate")
    # what the library takes, the page takes: CFG 50, and temperature 0 samples greedily
    set_number(browser, "#cfg_scale input", 50)
    set_number(browser, "#temperature input", 0)
    generate.click()
    shown, _ = picture(browser, "samples")
    expected, _ = session.generate(0, SamplingConfig(cfg_scale=50.0, temperature=0.0), 0, 8)
    assert np.array_equal(shrink(shown, expected.shape[0]), expected)
    summary = until(lambda: text(browser, "#seconds"), "the line under the samples")  # drawn after the picture
    assert "CFG 50, temperature 0 (greedy: top-k and top-p do not apply)" in summary
    assert text(browser, "#generate_error") == "" and errors_on_the_page(browser) == []


def test_the_views_follow_an_uploaded_photo_which_the_page_says_was_cropped(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, session = served
    open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()  # test image 0 first
    _, before = picture(browser, "original")
    _, decoded_before = picture(browser, "at_hardness")
    upload(browser, photo(tmp_path / "photo.png"))  # no click: the page shows the upload at once
    shown, _ = picture(browser, "original", previous=before)
    uploaded = session.uploaded_image(str(tmp_path / "photo.png"))
    side = session.resolution
    assert np.array_equal(shrink(shown, side), uploaded.pixels)
    assert ("photo.png is 64x40 px: resized and centre-cropped to 16x16, the model's input size"
            in text(browser, "#image_metrics"))
    at_one, decoded = picture(browser, "at_hardness", previous=decoded_before)
    assert np.array_equal(shrink(at_one, side), session.at_hardness(uploaded.pixels, 1.0))
    assert np.array_equal(code_grid(browser), session.reconstruct(uploaded.pixels).codes)
    set_number(browser, "#hardness input[type=number]", 0)  # the slider decodes the upload, not test image 0
    at_zero, decoded = picture(browser, "at_hardness", previous=decoded)
    assert np.array_equal(shrink(at_zero, side), session.at_hardness(uploaded.pixels, 0.0))
    set_number(browser, "#hardness input[type=number]", 5)  # clamped by the browser: the page says so
    until(lambda: text(browser, "#hardness_note"), "a note on the hardness")
    assert text(browser, "#hardness_note") == "hardness 5 is outside [0, 1]: decoded at 1"
    clamped, _ = picture(browser, "at_hardness", previous=decoded)
    assert np.array_equal(clamped, at_one)
    open_tab(browser, "Codebook")
    until(lambda: says(browser, "#codebook_summary", "encoder outputs of: photo.png"), "the codebook follows")
    open_tab(browser, "Tokenizer")  # the upload removed: back to the test image
    browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label=Clear]").click()
    until(lambda: says(browser, "#image_metrics", "test image 0: PSNR"), "test image 0 shown again")
    assert np.array_equal(shrink(picture(browser, "original")[0], side), session.test_image(0).pixels)
    assert errors_on_the_page(browser) == []


def test_a_failed_upload_is_one_line_on_its_tab_and_clears_the_previous_results(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = served
    open_page(browser, url)
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()
    picture(browser, "at_hardness")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    upload(browser, notes)
    until(lambda: text(browser, "#tokenizer_error"), "an error line")
    assert re.fullmatch(r"python -m provq.app: error: notes\.txt is not an image this app can read \(\w+\)",
                        text(browser, "#tokenizer_error"))
    for element in ("original", "reconstruction", "at_hardness"):  # test image 0's results are gone
        until(lambda element=element: source(browser, element) is None, f"#{element} cleared")
    assert code_grid(browser) is None and text(browser, "#image_metrics") == ""
    assert not browser.find_elements(By.CSS_SELECTOR, "#codes_file a")
    open_tab(browser, "Codebook")
    until(lambda: says(browser, "#codebook_summary", "no image shown"), "the codebook follows")
    assert text(browser, "#codebook_error") == ""  # the error stays on its tab
    assert text_on_tab(browser, "Generate", "#generate_error") == ""
    assert errors_on_the_page(browser) == []


def test_without_a_dataset_the_classes_keep_their_stored_names_and_usage_is_unknown(served_without_dataset,
                                                                                     browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, session = served_without_dataset
    open_page(browser, url)
    open_tab(browser, "Codebook")  # drawn when the page loads
    unknown = "code usage is unknown (no --dataset): the plot shows all 16 codes, used or not"
    until(lambda: says(browser, "#codebook_summary", unknown), "usage said to be unknown")
    open_tab(browser, "Tokenizer")
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()  # nothing to reconstruct yet
    until(lambda: text(browser, "#tokenizer_error"), "an error line")
    assert text(browser, "#tokenizer_error") == "python -m provq.app: error: no --dataset given: upload an image instead"
    upload(browser, photo(tmp_path / "photo.png"))
    picture(browser, "original")
    assert text(browser, "#tokenizer_error") == ""
    open_tab(browser, "Codebook")
    until(lambda: says(browser, "#codebook_summary", "encoder outputs of: photo.png"), "the codebook follows")
    assert source(browser, "usage_plot") is None  # no usage to plot
    open_tab(browser, "Generate")
    assert find(browser, "#label input").get_attribute("value") == "cat"
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    shown, _ = picture(browser, "samples")
    expected, _ = session.generate(0, SamplingConfig(cfg_scale=2.0), 0, 8)
    assert np.array_equal(shrink(shown, expected.shape[0]), expected)
    assert text(browser, "#seconds").endswith("class cat, seed 0, CFG 2, temperature 1, top-k off, top-p 1")


def test_the_api_names_its_endpoints_and_parameters_and_takes_what_its_schema_lists(served):
    from gradio_client import Client

    url, session = served
    client = Client(url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    parameters = {name: [p["parameter_name"] for p in endpoint["parameters"]]
                  for name, endpoint in api["named_endpoints"].items()}
    assert parameters == {"/reconstruct": ["test_image", "upload"], "/decode_at_hardness": ["hardness"],
                          "/codebook": [], "/generate": ["class_name", "cfg_scale", "temperature", "top_k",
                                                         "top_p", "seed", "images"]}
    assert not api["unnamed_endpoints"]
    advertised = api["named_endpoints"]["/generate"]["parameters"][0]["type"]
    assert advertised == {"type": "string", "enum": session.class_names}
    settings = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, seed=3, images=2)
    grid, summary, line = client.predict(class_name=advertised["enum"][2], **settings, api_name="/generate")
    expected, _ = session.generate(2, SamplingConfig(cfg_scale=1.0), 3, 2)
    assert line == "" and np.array_equal(shrink(np.asarray(Image.open(grid).convert("RGB")), expected.shape[0]), expected)
    assert client.predict(class_name="dog", **settings, api_name="/generate") == (
        None, None, "python -m provq.app: error: class 'dog' is not one of the prior's 4 classes (class0, class1, class2, "
                    "class3)")
    assert client.predict(test_image=1, upload=None, api_name="/reconstruct")[-1] == ""
    decoded, note = client.predict(hardness=5, api_name="/decode_at_hardness")  # this client's image: test image 1
    assert note == "hardness 5 is outside [0, 1]: decoded at 1"
    assert np.array_equal(shrink(np.asarray(Image.open(decoded).convert("RGB")), session.resolution),
                          session.at_hardness(session.test_image(1).pixels, 1.0))
