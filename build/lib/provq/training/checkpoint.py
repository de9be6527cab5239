"""Atomic training checkpoints: Accelerate's save_state in a temp folder, renamed into place."""

from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import torch

from provq.common.errors import FormatError, MissingFileError, StorageError
from provq.common.files import read_versioned, write_json_atomic, writing
from provq.common.folders import CHECKPOINT_MARKER, expect_kind
from provq.common.signals import max_over_processes

logger = logging.getLogger(__name__)

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
        """Write ``step_N`` atomically. A full disk or an unwritable folder is a ``StorageError`` on
        every process, the half-written folder removed and the previous checkpoint still the latest."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        what = f"the checkpoint of step {step}"
        try:
            together(accelerator, tmp, what, lambda: _fresh_folder(tmp))
            together(accelerator, tmp, what, lambda: accelerator.save_state(str(tmp)), everyone=True)
            together(accelerator, tmp, what, lambda: self._complete(tmp, final, step))
        except BaseException as error:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space; never marked complete
            if isinstance(error, StorageError):
                raise StorageError(f"{error}; it was removed, and {self.latest_hint()}") from error
            raise
        return final

    def latest_hint(self) -> str:
        """What a failed save leaves: the checkpoint a ``--resume latest`` takes."""
        found = self.complete()
        if not found:
            return "no checkpoint was written yet"
        return f"the latest checkpoint is {found[-1]}: free space, then resume with --resume latest"

    def _complete(self, tmp: Path, final: Path, step: int) -> None:
        _fsync_tree(tmp)  # the files are on disk before the marker says they are
        write_marker(tmp / CHECKPOINT_MARKER, {"step": step, "format": CHECKPOINT_FORMAT, "time": time.time()})
        if final.exists():  # only a marker-less leftover can be in the way
            _remove(final)
        os.replace(tmp, final)  # the checkpoint appears whole or not at all
        _fsync_dir(self.root)
        self._prune()

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
            expect_kind(path, ("checkpoint", "other", "empty", "missing"), "--resume")  # not a run, an export...
            if not (path / CHECKPOINT_MARKER).is_file():
                raise MissingFileError(
                    f"--resume {resume}: not a complete checkpoint (no {CHECKPOINT_MARKER}); "
                    "use --resume latest or a folder under checkpoints/"
                )
        read_marker(path)  # refuse an unreadable or newer checkpoint before building anything
        damaged = damaged_files(path)
        if damaged:
            others = [p.name for p in self.complete() if p != path and not damaged_files(p)]
            hint = (f"resume from an earlier one that loads: --resume {self.root / others[-1]} "
                    f"(loadable: {', '.join(others)})" if others else "no other checkpoint here loads")
            raise FormatError(f"checkpoint {path} is damaged ({', '.join(damaged)} cannot be read whole); {hint}")
        return path

    @staticmethod
    def load(accelerator, path: Path) -> int:
        marker = read_marker(path)
        accelerator.load_state(str(path))
        return int(marker["step"])


def together(accelerator, path: Path, what: str, write, everyone: bool = False) -> None:
    """``write()`` on the main process (``everyone``: on each), then every process learns whether it
    failed, so all of them raise or none waits forever in the next collective. A storage failure
    is a ``StorageError`` naming ``path`` and ``what``."""
    failure = None
    if everyone or accelerator.is_main_process:
        try:
            with writing(path, what):
                write()
        except Exception as error:
            failure = error
    if max_over_processes(int(failure is not None), accelerator.num_processes, accelerator.device):
        raise failure or StorageError(f"could not write {what} ({path}): another process failed (see its error)")


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def damaged_files(path: Path) -> list[str]:
    """The files of a checkpoint folder that cannot be read whole: safetensors by their header and
    size, Accelerate's torch.save files (zip archives) by their checksums. Nothing is unpickled."""
    from safetensors import safe_open

    damaged = []
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != CHECKPOINT_MARKER):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            else:
                with zipfile.ZipFile(file) as archive:
                    if archive.testzip() is not None:
                        raise zipfile.BadZipFile("checksum mismatch")
        except Exception:  # any reader's complaint means the same: this file is not whole
            damaged.append(file.name)
    return damaged


def read_marker(path: Path) -> dict:
    """A checkpoint's ``checkpoint.json``: refused (``FormatError``) when unreadable or newer."""
    marker, fmt = read_versioned(Path(path) / CHECKPOINT_MARKER, "format", CHECKPOINT_FORMAT)
    if not isinstance(marker.get("step"), int):
        raise FormatError(f"{path}: {CHECKPOINT_MARKER} has no integer 'step'")
    return {**marker, "format": fmt}


def write_marker(path: Path, marker: dict) -> None:
    """Written (and synced) last: a checkpoint folder with a marker is complete."""
    write_json_atomic(path, marker, sync=True)


class NonPersistentBuffers:
    """A module's non-persistent buffers (statistics kept out of its weights) as a checkpointable
    object: ``accelerator.register_for_checkpointing(NonPersistentBuffers(module))``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.names = [f"{prefix}.{name}" if prefix else name
                      for prefix, sub in module.named_modules()
                      for name in sorted(sub._non_persistent_buffers_set)]

    def _buffer(self, dotted: str) -> torch.Tensor:
        return self.module.get_buffer(dotted)  # looked up each time: .to() replaces buffers

    def state_dict(self) -> dict:
        return {name: self._buffer(name).detach().cpu().clone() for name in self.names}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in self.names:
                self._buffer(name).copy_(state[name])


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
