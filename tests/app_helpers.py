"""What the app's tests share: tiny models to serve, a free port, the reason a browser test cannot run,
and the ways tests/test_app.py reads and drives the page in Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generator import ARPrior, PriorConfig
from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def missing(modules=("gradio", "selenium"), browser: bool = True) -> str | None:
    """Why the app cannot be tested here (a module or Chromium is missing), or None."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (make test installs the app extra)"
    if browser and not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return "Debian's chromium and chromium-driver are not installed (make test installs them)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(root: Path, seed: int = 0, label_names: list[str] | None = None) -> tuple[Path, Path]:
    """An untrained 16 px tokenizer (16 codes, 8x8) and a 4-class prior bound to it."""
    torch.manual_seed(seed)
    tok = ProVQTokenizer(TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                                         norm_num_groups=4, quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4)))
    tok.save_pretrained(root / "tok")
    ARPrior(PriorConfig(codebook_size=16, code_height=8, code_width=8, num_classes=4, hidden_size=32, num_layers=1,
                        num_heads=2, intermediate_size=64, tokenizer_fingerprint=tok.fingerprint(),
                        label_names=label_names or [])
            ).save_pretrained(root / "prior")
    return root / "tok", root / "prior"


def shrink(image: np.ndarray, side: int) -> np.ndarray:
    """Undo the page's nearest-neighbour enlargement."""
    step = image.shape[0] // side
    return image[::step, ::step]


# ---- the page in Chromium ----------------------------------------------------------------------
def until(condition, what: str, timeout: float = 60):
    """condition()'s first truthy value, polled; an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not so after {timeout} s")


TEXT = """
const found = document.querySelector(arguments[0]);
if (!found) return null;
const copy = found.cloneNode(true);
copy.querySelectorAll('[data-testid=status-tracker]').forEach(e => e.remove());  // "processing | 1.1s"
return copy.textContent;
"""


def text(driver, css: str) -> str | None:
    """An element's text, or None when the page has no such element (a tab is drawn once opened)."""
    found = driver.execute_script(TEXT, css)
    return None if found is None else " ".join(found.split())


def says(driver, css: str, part: str) -> bool:
    return part in (text(driver, css) or "")


def text_on_tab(driver, tab: str, css: str) -> str:
    """What an element on ``tab`` says, the tab opened to read it."""
    open_tab(driver, tab)
    return until(lambda: text(driver, css) is not None and [text(driver, css)], f"{css} on the {tab} tab")[0]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def source(driver, element_id: str) -> str | None:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, f"#{element_id} img")
    return found[0].get_attribute("src") if found else None


def picture(driver, element_id: str, previous: str | None = None) -> tuple[np.ndarray, str]:
    """The image #element_id shows (fetched from its URL, as the browser did), once there and new."""
    url = until(lambda: (s := source(driver, element_id)) and s != previous and s,
                f"a new picture in #{element_id} (errors: {text(driver, '[id$=_error]')!r})")
    return np.asarray(Image.open(io.BytesIO(fetch(url))).convert("RGB")), url


def code_grid(driver) -> np.ndarray | None:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#code_grid tr")
    return np.array([[int(cell.text) for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]) if rows else None


COVERING = """
const box = document.getElementById(arguments[0]), shown = box.querySelector(arguments[1]);
if (!shown) return ['nothing shown'];
const r = shown.getBoundingClientRect();
return [...box.querySelectorAll('*')].filter(e => e !== shown && !e.contains(shown) && !shown.contains(e))
  .filter(e => { const s = getComputedStyle(e), q = e.getBoundingClientRect();
    return s.display !== 'none' && s.visibility !== 'hidden' && s.opacity !== '0' && q.width > 0 && q.height > 0
      && q.left < r.right && q.right > r.left && q.top < r.bottom && q.bottom > r.top; })
  .map(e => e.tagName + ' ' + (e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40)));
"""


def covering(driver, element_id: str, what: str = "img", settle: float = 10.0) -> list[str]:
    """What inside #element_id stays drawn over its picture (labels, buttons): nothing, on this page.
    Read again for up to ``settle`` seconds while something covers it: gradio's progress overlay (an empty
    DIV) fades out after the picture is drawn, and a CI run once read it mid-fade."""
    deadline = time.monotonic() + settle
    while (found := driver.execute_script(COVERING, element_id, what)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


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


def open_page(driver, url: str) -> None:
    driver.get(url)
    find(driver, "#reconstruct")


def open_tab(driver, name: str) -> None:
    find(driver, f"#tab_{name.lower()}-button").click()


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def photo(path: Path, width: int = 64, height: int = 40) -> Path:
    """A non-square picture larger than the model's 16 px, with structure a crop would move."""
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8)).save(path)
    return path


def errors_on_the_page(driver) -> list[str]:
    """Error toasts and tracebacks: none, whatever goes wrong (a failure is one line on its tab)."""
    from selenium.webdriver.common.by import By

    toasts = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]") if t.is_displayed()]
    return toasts + (["Traceback"] if "Traceback" in driver.page_source else [])
