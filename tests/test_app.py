"""The browser app, used the way a person uses it: served on 127.0.0.1 and driven in headless Chromium.

The page's pictures are fetched as the browser got them and compared with what the library computes
for the same input; bad input shows the CLI's one line, never a traceback. Skipped, saying why, only
where Chromium, its driver, selenium or gradio cannot be had (the Makefile installs them).
`PROVQ_APP_SCREENSHOTS=docs pytest tests/test_app.py` also saves a screenshot of each tab.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import reset_accelerate

from generator import ARPrior, PriorConfig
from generator.sampling import SamplingConfig
from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (make test installs the app extra)"
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return "Debian's chromium and chromium-driver are not installed (make test installs them)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    tok = ProVQTokenizer(TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                                         norm_num_groups=4, quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4)))
    tok.save_pretrained(root / "tok")
    ARPrior(PriorConfig(codebook_size=16, code_height=8, code_width=8, num_classes=4, hidden_size=32, num_layers=1,
                        num_heads=2, intermediate_size=64, tokenizer_fingerprint=tok.fingerprint())
            ).save_pretrained(root / "prior")
    return root / "tok", root / "prior"


@pytest.fixture(scope="module")
def served(image_folder, tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    from provq.app.__main__ import start
    from provq.app.session import AppSession

    tok, prior = tiny_models(tmp_path_factory.mktemp("app"))
    dataset = image_folder
    if os.environ.get("PROVQ_APP_TOKENIZER"):  # for README's screenshots: trained models, e.g. the demo's
        tok, prior, dataset = (os.environ[f"PROVQ_APP_{k}"] for k in ("TOKENIZER", "PRIOR", "DATASET"))
    port = free_port()
    argv = ["--tokenizer", str(tok), "--prior", str(prior), "--dataset", str(dataset), "--port", str(port)]
    page = start(argv, block=False)
    session = AppSession.load(str(tok), str(prior), str(dataset))  # the library, for the oracles
    yield f"http://127.0.0.1:{port}/", session
    page.close()
    reset_accelerate()


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


def picture(driver, element_id: str, previous: str | None = None, timeout: float = 90) -> tuple[np.ndarray, str]:
    """The image an <img> inside #element_id shows (fetched from its URL, as the browser did), once
    its source is there and differs from ``previous``."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
        source = found[0].get_attribute("src") if found else None
        if source and source != previous:
            with urllib.request.urlopen(source, timeout=30) as response:
                return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB")), source
        time.sleep(0.25)
    raise AssertionError(f"no picture in #{element_id} after {timeout} s; page errors: {page_error(driver)!r}")


def page_error(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#error").text.strip()


def shot(driver, name: str) -> None:
    folder = os.environ.get("PROVQ_APP_SCREENSHOTS")
    if folder:
        path = Path(folder) / f"app_{name}.png"
        driver.save_screenshot(str(path))
        Image.open(path).convert("RGB").resize((960, 825)).save(path, optimize=True)  # small PNGs for docs/


def find(driver, css: str, timeout: float = 60):
    """The element once the page (rendered client-side) has it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, css)))


def set_number(driver, css: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = find(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.XPATH, f"//button[normalize-space()='{name}']") if b.is_displayed()]
    assert buttons, f"no visible tab {name!r}"
    buttons[0].click()


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """Undo the page's nearest-neighbour enlargement."""
    step = image.shape[0] // side
    return image[::step, ::step]


def test_reconstruct_the_hardness_slider_and_the_codebook_in_a_real_browser(served, browser):
    from selenium.webdriver.common.by import By

    url, session = served
    browser.get(url)
    find(browser, "#reconstruct")
    set_number(browser, "#image_index input", 2)
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()
    shown, _ = picture(browser, "reconstruction")
    expected = session.reconstruct(session.test_image(2))
    side = session.resolution
    assert shown.shape == (256, 256, 3) and shown.std() > 0  # enlarged to 256 px: not blank
    assert np.array_equal(shrink(shown, side), expected.reconstruction)
    assert np.array_equal(shrink(picture(browser, "original")[0], side), session.test_image(2))
    text = browser.find_element(By.CSS_SELECTOR, "#image_metrics").text
    assert f"PSNR {expected.psnr:.2f} dB" in text and f"SSIM {expected.ssim:.4f}" in text
    at_one, source = picture(browser, "at_hardness")
    shot(browser, "tokenizer")
    set_number(browser, "#hardness input[type=number]", 0)  # h = 0: the continuous autoencoder
    at_zero, _ = picture(browser, "at_hardness", previous=source)
    assert np.array_equal(shrink(at_zero, side), session.at_hardness(session.test_image(2), 0.0))
    assert not np.array_equal(at_zero, at_one)

    open_tab(browser, "Codebook")
    find(browser, "#codebook_refresh").click()
    plot, _ = picture(browser, "geometry_plot")
    assert plot.std() > 0
    used = int((session.counts > 0).sum())
    assert f"{used:,} of {len(session.counts):,} codes used" in browser.find_element(By.CSS_SELECTOR, "#codebook_summary").text
    shot(browser, "codebook")


def test_generate_a_grid_in_a_real_browser(served, browser):
    from selenium.webdriver.common.by import By

    url, session = served
    browser.get(url)
    find(browser, "#reconstruct")
    open_tab(browser, "Generate")
    set_number(browser, "#seed input", 5)
    find(browser, "#generate").click()
    shown, _ = picture(browser, "samples")
    expected, _ = session.generate(0, SamplingConfig(cfg_scale=2.0), 5, 8)  # the page's defaults, seed 5
    assert shown.std() > 0 and np.array_equal(shrink(shown, expected.shape[0]), expected)
    assert re.search(r"^8 samples in \d+\.\d\d s$", browser.find_element(By.CSS_SELECTOR, "#seconds").text)
    shot(browser, "generate")


def test_a_non_image_upload_shows_the_one_line_error(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = served
    browser.get(url)
    find(browser, "#reconstruct")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(notes))
    time.sleep(1.0)
    browser.find_element(By.CSS_SELECTOR, "#reconstruct").click()
    deadline = time.monotonic() + 60
    while not page_error(browser) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert re.fullmatch(r"python -m provq.app: error: notes\.txt is not an image this app can read \(\w+\)",
                        page_error(browser))
    assert "Traceback" not in browser.page_source


def test_a_prior_of_another_tokenizer_is_refused_in_one_line(tmp_path, capsys):
    from provq.app.__main__ import main
    from provq.common.cli import run_command

    tok, _ = tiny_models(tmp_path / "a", seed=0)
    _, other_prior = tiny_models(tmp_path / "b", seed=1)
    with pytest.raises(SystemExit) as exit_info:
        run_command("python -m provq.app", main, ["--tokenizer", str(tok), "--prior", str(other_prior)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m provq.app: error: tokenizer fingerprint mismatch")


def test_a_label_out_of_range_is_a_user_error_the_page_shows_in_one_line(tmp_path):
    from provq.app.session import AppSession
    from provq.app.ui import guarded
    from provq.common.errors import ConfigError

    tok, prior = tiny_models(tmp_path)
    session = AppSession.load(str(tok), str(prior))
    with pytest.raises(ConfigError, match=r"label 7 outside the prior's classes \[0, 4\)"):
        session.generate(7, SamplingConfig(), 0, 2)
    pytest.importorskip("gradio")
    shown = guarded(lambda: session.generate(7, SamplingConfig(), 0, 2), outputs=2)()
    assert shown[-1] == "python -m provq.app: error: label 7 outside the prior's classes [0, 4)"
