"""What kind of folder a path is, from the files that define each kind; every loader asks first.

A tokenizer or prior export (``config.json``'s ``model_type``), a codes folder (``tokenizer.json``,
``<split>/manifest.json`` or shards), one split of it, a samples folder (``samples.npz``), a
training run (``checkpoints/``, ``config.yaml``) or one of its checkpoints (``checkpoint.json``).
``expect_kind`` refuses another kind before anything is loaded, naming the kind found (and why)
and the kind wanted, e.g. "--tokenizer runs/demo/prior/prior is a prior folder (config.json
model_type 'provq-ar-prior'); expected a tokenizer folder".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from provq.common.errors import MissingFileError, WrongFolderError

# The model classes' kind -> the model_type their config.json records (common.pretrained).
MODEL_TYPES = {"tokenizer": "provq-tokenizer", "prior": "provq-ar-prior"}
MODEL_KINDS = {model_type: kind for kind, model_type in MODEL_TYPES.items()}
CONFIG_NAME = "config.json"
CHECKPOINT_MARKER = "checkpoint.json"
MANIFEST_NAME = "manifest.json"
TOKENIZER_RECORD = "tokenizer.json"  # beside a codes folder's splits: the tokenizer that made them
TOKENIZER_RECORD_FORMAT = 1  # its "format"; records written before it carried one are format 1


def write_tokenizer_record(codes: str | Path, tokenizer: str, fingerprint: str) -> Path:
    """``<codes>/tokenizer.json``: which tokenizer (folder or hub id) made the codes, and its fingerprint."""
    from provq.common.files import write_json_atomic

    record = {"format": TOKENIZER_RECORD_FORMAT, "tokenizer": str(tokenizer), "fingerprint": fingerprint}
    return write_json_atomic(Path(codes) / TOKENIZER_RECORD, record, what="the codes' tokenizer record")


def read_tokenizer_record(codes: str | Path) -> dict | None:
    """The record (``tokenizer``, ``fingerprint``) of a codes folder; None when it has none."""
    from provq.common.files import read_versioned

    path = Path(codes) / TOKENIZER_RECORD
    return read_versioned(path, "format", TOKENIZER_RECORD_FORMAT, missing=1)[0] if path.is_file() else None
SAMPLES_NAME = "samples.npz"
SHARD_PATTERN = "shard-*.safetensors"

DESCRIPTIONS = {
    "tokenizer": "a tokenizer folder", "prior": "a prior folder",
    "codes": "a codes folder (extract_codes.py's output)", "codes split": "one split of a codes folder",
    "samples": "a samples folder (sample.py's output)", "checkpoint": "a training checkpoint",
    "tokenizer run": "a tokenizer training run (train_tokenizer.py's output_dir)",
    "prior run": "a prior training run (train_prior.py's output_dir)", "run": "a training run",
    "missing": "a path that does not exist", "file": "a file", "empty": "an empty folder",
    "other": "a folder of none of the kinds provq writes",
    "images": "a samples .npz, a statistics .npz or a folder of images",  # what eval reads
}
# Where the thing wanted usually is, from a folder of another kind (wanted, found) -> hint.
HINTS = {("tokenizer", "tokenizer run"): "its export is {path}/tokenizer",
         ("prior", "prior run"): "its export is {path}/prior",
         ("codes", "codes split"): "pass its parent {parent}",
         ("images", "samples"): "pass {path}/samples.npz",
         ("checkpoint", "tokenizer run"): "use --resume latest, or one of {path}/checkpoints/step_*",
         ("checkpoint", "prior run"): "use --resume latest, or one of {path}/checkpoints/step_*",
         ("checkpoint", "run"): "use --resume latest, or one of {path}/checkpoints/step_*"}


@dataclass(frozen=True)
class FolderKind:
    name: str  # a key of DESCRIPTIONS, or "'<model_type>' model" for a config.json of another model type
    evidence: str  # the file that says so

    def describe(self) -> str:
        return DESCRIPTIONS.get(self.name, f"a {self.name} folder")


def _model_kind(config: Path) -> FolderKind | None:
    try:
        record = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # damaged: the loader names it
    if not isinstance(record, dict):
        return None
    model_type = record.get("model_type")
    if model_type is None:  # the tokenizers of provq 0.1.0 wrote none
        return FolderKind("tokenizer", f"{CONFIG_NAME} without model_type, as provq 0.1.0 wrote tokenizers")
    return FolderKind(MODEL_KINDS.get(model_type, f"{model_type!r} model"), f"{CONFIG_NAME} model_type {model_type!r}")


def _run_kind(path: Path) -> FolderKind:
    try:
        sections = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        sections = None
    for stage in ("prior", "tokenizer"):  # a prior run's config has no tokenizer section, and vice versa
        if isinstance(sections, dict) and stage in sections:
            return FolderKind(f"{stage} run", f"config.yaml has a {stage}: section")
    return FolderKind("run", "checkpoints/")


def folder_kind(path: str | os.PathLike) -> FolderKind | None:
    """The kind of ``path``; None when its defining file is there but unreadable (its loader says why)."""
    path = Path(path)
    if not path.exists():
        return FolderKind("missing", "no such path")
    if not path.is_dir():
        return FolderKind("file", "not a folder")
    if (path / CONFIG_NAME).is_file():
        return _model_kind(path / CONFIG_NAME)
    if (path / CHECKPOINT_MARKER).is_file():
        return FolderKind("checkpoint", CHECKPOINT_MARKER)
    if (path / TOKENIZER_RECORD).is_file() or any(path.glob(f"*/{MANIFEST_NAME}")) or any(path.glob(f"*/{SHARD_PATTERN}")):
        return FolderKind("codes", f"{TOKENIZER_RECORD} or <split>/{MANIFEST_NAME}")
    if (path / MANIFEST_NAME).is_file() or any(path.glob(SHARD_PATTERN)):
        return FolderKind("codes split", MANIFEST_NAME)
    if (path / SAMPLES_NAME).is_file() or any(path.glob("images/codes_*.npy")):
        return FolderKind("samples", SAMPLES_NAME)
    if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return _run_kind(path)
    if not any(path.iterdir()):
        return FolderKind("empty", "nothing in it")
    return FolderKind("other", f"no {CONFIG_NAME}, {MANIFEST_NAME}, {SAMPLES_NAME} or checkpoints/")


def expect_kind(path: str | os.PathLike, wanted: str | tuple[str, ...], flag: str | None = None,
                expected: str | None = None, hub: bool = False) -> FolderKind | None:
    """The kind of ``path`` when it is one of ``wanted``; else ``WrongFolderError`` naming what it is
    and what was expected (``expected``, by default the first wanted kind's description). With
    ``hub``, a path that does not exist passes: it is a Hub repo id for the loader to fetch."""
    wanted = (wanted,) if isinstance(wanted, str) else wanted
    found = folder_kind(path)
    if found is None or found.name in wanted or (hub and found.name == "missing"):
        return found
    named = f"{flag} {path}" if flag else str(path)
    if found.name == "missing":
        raise MissingFileError(f"{named} does not exist; expected {expected or DESCRIPTIONS.get(wanted[0], wanted[0])}")
    hint = HINTS.get((wanted[0], found.name), "").format(path=path, parent=Path(path).parent)
    raise WrongFolderError(f"{named} is {found.describe()} ({found.evidence}); expected "
                           f"{expected or DESCRIPTIONS.get(wanted[0], wanted[0])}" + (f": {hint}" if hint else ""))


def expect_output(path: str | os.PathLike, own: str, flag: str = "--output_dir") -> FolderKind | None:
    """A folder a command writing folders of kind ``own`` may write into: one of its own (to resume
    or complete it; a run whose stage its files do not tell, e.g. copied checkpoints, may be one), a new
    or empty folder, or a folder of no kind provq writes."""
    unknown_run = ("run",) if own.endswith(" run") else ()
    return expect_kind(path, (own, *unknown_run, "missing", "empty", "other"), flag,
                       expected=f"{DESCRIPTIONS[own]} or a new folder")
