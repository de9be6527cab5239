"""Versioned files, read one way: JSON records with a format version, strict safetensors, folder or Hub.

One policy for every file the project writes and reads back (tokenizer and prior exports,
code manifests, checkpoint markers): a record without an integer version, or with a
version newer than the reader's, is refused with a ``FormatError`` that names the file;
weights load only from safetensors (nothing is ever unpickled) and only when every tensor
is present with the expected shape.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from provq.common.errors import FormatError, MissingFileError, StorageError, UserError

# What numpy and zipfile raise for a file that is cut short, empty or of another kind.
DAMAGED_ARCHIVE = (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError)
# Why a write fails that the user can fix, by errno.
STORAGE_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "the file system is read-only"}
FULL_BELOW = 1 << 20  # free bytes under which a device counts as full when a writer does not say why


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``; ``FormatError`` for anything else (including a cut file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise FormatError(f"{path} is not a JSON file ({error})") from error
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """A folder a command may write into: absent, or an existing folder (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FormatError(f"{flag} {path} is an existing file, not a folder: pick another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FormatError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path


@contextlib.contextmanager
def read_npz(path: str | os.PathLike, what: str = "an .npz file") -> Iterator[np.lib.npyio.NpzFile]:
    """``np.load`` of an .npz (never unpickling) whose missing, empty, truncated or foreign file is a
    ``FormatError`` / ``MissingFileError`` naming it, also when a member turns out cut short."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist (expected {what})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            yield npz
    except UserError:
        raise
    except DAMAGED_ARCHIVE as error:
        raise damaged_archive(path, what, error) from None


def damaged_archive(path: Path, what: str, error: BaseException) -> FormatError:
    detail = " ".join(str(error).split()) or type(error).__name__
    return FormatError(f"{path} is not a complete .npz file ({detail}): it may be truncated or another "
                       f"kind of file (expected {what})")


def read_versioned(path: str | os.PathLike, key: str, current: int, missing: int | None = None) -> tuple[dict, int]:
    """(record without its version, version); refuses a non-integer or newer version, and a missing one
    unless ``missing`` names the version of files written before they carried one."""
    data = read_json(path)
    version = data.pop(key, missing)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{path} has no valid integer '{key}' (got {version!r})")
    if version > current:
        raise FormatError(f"{path} has {key} {version}, newer than this version's {current}: "
                          "upgrade provq to read it")
    return data, version


def storage_cause(error: BaseException, folder: str | os.PathLike | None = None) -> str | None:
    """Why a write failed when the user can fix it (a full disk, a quota, no permission, a read-only
    file system), else None: anything else is a bug and keeps its traceback.

    The errno comes from the OSError or from a library's own words (safetensors: "os error 28");
    torch.save says only "unexpected pos", so for an error without one ``folder`` is examined."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
        code = int(found.group(1) or found.group(2)) if found else None
    if code is not None or folder is None:
        return STORAGE_CAUSES.get(code)
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        device = os.statvfs(folder)
    except OSError:
        return None
    if device.f_flag & os.ST_RDONLY:
        return STORAGE_CAUSES[errno.EROFS]
    if device.f_bavail * device.f_frsize < FULL_BELOW:
        return STORAGE_CAUSES[errno.ENOSPC]
    return None if os.access(folder, os.W_OK) else STORAGE_CAUSES[errno.EACCES]


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Around the writes of ``what`` to ``path`` (a file or a folder): a failure the user can fix
    becomes a ``StorageError`` naming both, e.g. "could not write the metrics log (runs/x/metrics.jsonl):
    no space left on the device"."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        cause = storage_cause(error, path if getattr(error, "errno", None) is None else None)
        if cause is None:
            raise
        said = "" if isinstance(error, OSError) else f" ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        raise StorageError(f"could not write {what} ({path}): {cause}{said}") from error


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], what: str = "a file") -> Path:
    """``write(tmp)`` beside ``path``, then rename: a reader (or a resumed run) sees the old file
    or the whole new one, never a torn write. A full disk or an unwritable folder is a
    ``StorageError`` naming the path and ``what``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path, what):
            write(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a read-only folder: nothing to remove, and the error said so
            tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, data: dict, sync: bool = False, what: str = "a file") -> Path:
    """JSON (sorted keys, indented) written atomically; ``sync`` also fsyncs it before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())

    return write_atomic(path, write, what)


def save_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Every tensor of ``module.state_dict()`` as safetensors (CPU, contiguous)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(module: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load safetensors into ``module``, naming the first missing, unexpected or mismatched tensor.

    Only the safetensors format is read, so nothing in the file is ever executed: a truncated
    file, or a pickle / torch.save file under this name, is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise FormatError(
            f"{path} is not a complete safetensors file ({error}); it may be truncated, or a "
            "pickle/.bin checkpoint renamed (those are never loaded: convert with safetensors)"
        ) from error
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise FormatError(f"{path} lacks tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise FormatError(f"{path} has unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all)")
    for name, want in expected.items():
        if tensors[name].shape != want.shape:
            raise FormatError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                              f"the config expects {tuple(want.shape)}")
    module.load_state_dict(tensors, strict=True)


def resolve_files(name_or_path: str | os.PathLike, names: tuple[str, ...], what: str,
                  revision: str | None = None) -> list[Path]:
    """The files ``names`` of a local folder or, when no such folder exists, of a Hub repo id."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = [folder / name for name in names]
        for file in files:
            if not file.is_file():
                raise MissingFileError(f"{folder} has no {file.name}: not a {what} folder")
        return files
    text = str(name_or_path)
    if folder.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise MissingFileError(f"{name_or_path} is neither a {what} folder nor a Hub repo id")
    from huggingface_hub import hf_hub_download

    try:
        return [Path(hf_hub_download(text, name, revision=revision)) for name in names]
    except Exception as error:  # offline, unknown repo, missing file: one clear message
        raise MissingFileError(f"no {what} folder at {name_or_path}, and it could not be fetched "
                               f"from the Hugging Face Hub ({type(error).__name__}: {error})") from error
