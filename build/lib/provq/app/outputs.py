"""The files the page hands to Gradio (pictures, code indices), each written whole under a name made of
its content.

Gradio's own cache for a returned array rewrites a file shared by every session that shows the same
picture, in place: a download of it at that moment gets a truncated body (seen with 16 clients at
once). A finished file path, by contrast, Gradio copies into its cache atomically and only once.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from provq.common.files import write_atomic


class OutputFolder:
    """Content-named files under one folder, those unused for ``max_age_s`` removed now and then (Gradio
    has its copy by then)."""

    PRUNE_EVERY = 256  # saves

    def __init__(self, root: str | os.PathLike | None = None, max_age_s: float = 3600.0):
        if root is None:  # a folder of its own, removed when the server's process ends
            root = tempfile.mkdtemp(prefix="provq-app-")
            atexit.register(shutil.rmtree, root, True)
        self.root = Path(root)
        self.max_age_s = max_age_s
        self._saves = 0
        self._lock = threading.Lock()  # one writer and pruner at a time within the server

    def save(self, name: str, data: bytes) -> str:
        folder = self.root / hashlib.sha256(data).hexdigest()[:32]
        path = folder / name
        with self._lock:
            if path.exists():
                os.utime(folder)  # in use again: not pruned yet
            else:
                folder.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp: tmp.write_bytes(data))
            self._saves += 1
            if self._saves % self.PRUNE_EVERY == 0:
                self._prune()
        return str(path)

    def image(self, pixels: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="png")
        return self.save("image.png", buffer.getvalue())

    def codes(self, codes: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, codes.astype(np.int64))
        return self.save(f"codes_{codes.shape[0]}x{codes.shape[1]}.npy", buffer.getvalue())

    def _prune(self) -> None:
        oldest = time.time() - self.max_age_s
        for folder in self.root.iterdir():
            if folder.stat().st_mtime < oldest:
                shutil.rmtree(folder, ignore_errors=True)
