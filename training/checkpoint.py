"""Atomic training checkpoints: Accelerate's save_state in a temp folder, renamed into place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint.json"
CHECKPOINT_FORMAT = 1


class CheckpointManager:
    """Atomic ``save_state`` folders under ``<output_dir>/checkpoints``, pruned to ``keep`` (0 = all).

    A save writes ``.tmp_step_N``, fsyncs it, writes the ``checkpoint.json`` marker last and
    renames the folder to ``step_N``: a kill at any moment leaves either the whole new
    checkpoint or none of it, and the previous ones untouched.

    Accelerate stores optimizer, RNG and custom states as pickles and loads them with
    ``weights_only=False``: resume only from checkpoints you wrote. What users exchange is
    the exported ``model.safetensors`` (``from_pretrained`` never unpickles).
    """

    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, accelerator, step: int) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)  # the files are on disk before the marker says they are
            marker = {"step": step, "format": CHECKPOINT_FORMAT, "time": time.time()}
            _write_json_synced(tmp / CHECKPOINT_MARKER, marker)
            if final.exists():  # only a marker-less leftover can be in the way
                _remove(final)
            os.replace(tmp, final)  # the checkpoint appears whole or not at all
            _fsync_dir(self.root)
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for leftover in self.root.glob(".tmp_step_*"):  # saves interrupted by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        for old in self.complete()[: -self.keep] if self.keep > 0 else []:
            _remove(old)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first; incomplete ones are skipped with a warning."""
        if not self.root.is_dir():
            return []
        for leftover in sorted(self.root.glob(".tmp_step_*")):
            logger.warning("ignoring %s: left by an interrupted save or deletion", leftover)
        found = []
        for path in sorted(self.root.glob("step_*")):
            if (path / CHECKPOINT_MARKER).is_file():
                found.append(path)
            else:
                logger.warning("skipping incomplete checkpoint %s (no %s)", path, CHECKPOINT_MARKER)
        return found

    def resolve(self, resume: str | None) -> Path | None:
        """The folder ``--resume`` names: ``latest``, a path, or None for a fresh run."""
        if not resume:
            return None
        if resume == "latest":
            found = self.complete()
            if not found:
                logger.warning("--resume latest: no complete checkpoint in %s; starting fresh", self.root)
                return None
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / CHECKPOINT_MARKER).is_file():
                raise FileNotFoundError(
                    f"--resume {resume}: not a complete checkpoint (no {CHECKPOINT_MARKER}); "
                    "use --resume latest or a folder under checkpoints/"
                )
        read_marker(path)  # refuse an unreadable or newer checkpoint before building anything
        return path

    @staticmethod
    def load(accelerator, path: Path) -> int:
        marker = read_marker(path)
        accelerator.load_state(str(path))
        return int(marker["step"])


class CheckpointFormatError(ValueError):
    """A checkpoint this version cannot read: a newer format or a damaged marker."""


def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((Path(path) / CHECKPOINT_MARKER).read_text())
        fmt, step = marker["format"], marker["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(f"{path}: unreadable {CHECKPOINT_MARKER} ({error})") from error
    if not isinstance(fmt, int) or not isinstance(step, int) or fmt < 1:
        raise CheckpointFormatError(f"{path}: {CHECKPOINT_MARKER} has an unknown format {fmt!r}")
    if fmt > CHECKPOINT_FORMAT:
        raise CheckpointFormatError(
            f"{path} has checkpoint format {fmt}, newer than this version's {CHECKPOINT_FORMAT}: "
            "upgrade provq to resume from it"
        )
    return marker


def _remove(path: Path) -> None:
    # Out of the step_* namespace in one rename, then deleted: a kill half-way through
    # the deletion can never leave a partial folder that still looks complete.
    doomed = path.with_name(f".tmp_step_deleting_{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_synced(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
