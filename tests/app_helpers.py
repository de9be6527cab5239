"""What the app's tests share: tiny models to serve, a free port, the reason a browser test cannot run."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

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
