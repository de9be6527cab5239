"""Code shards: cached image codes on disk (safetensors shards + manifest.json) bound to the tokenizer's fingerprint, as LlamaGen caches its codes."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch.utils.data import Dataset

from provq.common.errors import ConfigError, FormatError, MissingFileError
from provq.common.files import read_versioned, write_atomic, write_json_atomic
from provq.common.folders import MANIFEST_NAME, expect_kind
from provq.common.typed_config import build_config

from .errors import CodeRangeError, check_fingerprint

FORMAT_VERSION = 1
VERSION_KEY = "format_version"
# common.folders.TOKENIZER_RECORD is written by extract_codes.py beside the splits: which tokenizer
# folder made the codes, so train_prior.py can draw sample grids while it trains.


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def code_dtype(codebook_size: int) -> np.dtype:
    # Half the disk and memory of int32 for every codebook a VQ tokenizer realistically has.
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


@dataclass
class CodesManifest:
    """What one split's code folder holds; `num_items` counts source images (flips not included)."""

    tokenizer_fingerprint: str
    code_shape: tuple[int, int]
    codebook_size: int
    num_classes: int
    split: str
    num_items: int
    flip_copies: bool = False
    label_names: list[str] = field(default_factory=list)
    shard_size: int = 10_000
    shards: list[str] = field(default_factory=list)
    dtype: str = "uint16"

    def __post_init__(self) -> None:
        self.code_shape = tuple(self.code_shape)
        if len(self.code_shape) != 2 or min(self.code_shape) < 1:
            raise ValueError(f"code_shape must be (h, w), got {self.code_shape}")
        if self.codebook_size < 1 or self.num_items < 0 or self.shard_size < 1:
            raise ValueError("codebook_size and shard_size must be >= 1 and num_items >= 0")
        if self.label_names and len(self.label_names) != self.num_classes:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_classes} classes")

    @property
    def num_copies(self) -> int:
        return 2 if self.flip_copies else 1

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shard_size)

    def check_tokenizer(self, fingerprint: str) -> None:
        """Raise FingerprintMismatchError naming both fingerprints if the codes are another tokenizer's."""
        check_fingerprint(self.tokenizer_fingerprint, fingerprint, f"the {self.split!r} codes",
                          expected_from="the expected tokenizer")

    def shard_items(self, index: int) -> range:
        """The dataset indices a shard holds (the same plan on every process and every run)."""
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range [0, {self.num_shards})")
        start = index * self.shard_size
        return range(start, min(start + self.shard_size, self.num_items))


def split_folder(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / split


def load_manifest(root: str | os.PathLike, split: str) -> CodesManifest:
    """Read <root>/<split>/manifest.json, refusing another kind of folder, newer versions or unknown
    fields by name."""
    expect_kind(root, "codes")
    path = split_folder(root, split) / MANIFEST_NAME
    if not path.is_file():
        raise MissingFileError(f"no code manifest at {path} (did extract_codes.py finish this split?)")
    data, _ = read_versioned(path, VERSION_KEY, FORMAT_VERSION)
    try:
        return build_config(CodesManifest, data)
    except ConfigError as error:
        raise FormatError(f"{path}: {error}") from error


class CodeShardWriter:
    """Writes one split's shards; finished shards are detected and kept, so extraction resumes.

    Usage (each process takes its own shards, skipping those already on disk):
        writer = CodeShardWriter(root, manifest)
        for index in writer.pending_shards(rank, world_size):
            items = writer.manifest.shard_items(index)
            writer.write_shard(index, codes, labels)   # codes (n, copies, h, w) or (n, h, w)
        writer.finalize()                              # once, after all processes are done
    Copy 0 is the image as it is, copy 1 (with flip_copies) its horizontal flip.
    """

    def __init__(self, root: str | os.PathLike, manifest: CodesManifest):
        self.manifest = dataclasses.replace(
            manifest, shards=[shard_name(i) for i in range(manifest.num_shards)],
            dtype=code_dtype(manifest.codebook_size).name)
        self.folder = split_folder(root, manifest.split)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / MANIFEST_NAME).is_file():
            load_manifest(root, manifest.split).check_tokenizer(manifest.tokenizer_fingerprint)

    def _metadata(self, index: int) -> dict[str, str]:
        m = self.manifest
        return {"tokenizer_fingerprint": m.tokenizer_fingerprint, "split": m.split,
                "first_item": str(m.shard_items(index).start),
                "num_items": str(len(m.shard_items(index))),
                "flip_copies": str(m.flip_copies), "format_version": str(FORMAT_VERSION)}

    def is_complete(self, index: int) -> bool:
        """True when the shard is on disk and was written by this same plan and tokenizer."""
        path = self.folder / shard_name(index)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="np") as f:
                return f.metadata() == self._metadata(index)
        except Exception:  # unreadable leftovers are simply rewritten
            return False

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This process's share (every world_size-th shard) minus the ones already finished."""
        return [i for i in range(rank, self.manifest.num_shards, world_size)
                if not self.is_complete(i)]

    def write_shard(self, index: int, codes, labels) -> bool:
        """Validate and write one shard atomically; returns False (writing nothing) if already done."""
        if self.is_complete(index):
            return False
        m = self.manifest
        codes = _as_numpy(codes).astype(np.int64)
        labels = _as_numpy(labels).astype(np.int64).reshape(-1)
        if codes.ndim == 3:
            codes = codes[:, None]
        expected = (len(m.shard_items(index)), m.num_copies, *m.code_shape)
        if codes.shape != expected or labels.shape != expected[:1]:
            raise ValueError(f"shard {index} wants codes {expected} and labels {expected[:1]}, "
                             f"got {codes.shape} and {labels.shape}")
        _check_range(codes, labels, m, f"shard {index}")
        tensors = {"codes": np.ascontiguousarray(codes.astype(m.dtype)), "labels": labels}
        write_atomic(self.folder / shard_name(index),
                     lambda tmp: save_file(tensors, str(tmp), metadata=self._metadata(index)), "a code shard")
        return True

    def finalize(self) -> CodesManifest:
        """Write manifest.json (atomically) once every shard is complete."""
        missing = [i for i in range(self.manifest.num_shards) if not self.is_complete(i)]
        if missing:
            raise RuntimeError(f"cannot finalize {self.folder}: shards {missing[:10]} are not written")
        record = {VERSION_KEY: FORMAT_VERSION, **dataclasses.asdict(self.manifest)}
        write_json_atomic(self.folder / MANIFEST_NAME, record, what="the codes' manifest")
        return self.manifest


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_range(codes: np.ndarray, labels: np.ndarray, m: CodesManifest, where: str) -> None:
    if codes.size and (codes.min() < 0 or codes.max() >= m.codebook_size):
        raise CodeRangeError(f"{where}: codes must be in [0, {m.codebook_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
    # -1 marks an unlabelled image (the data contract); the prior maps it to the null class.
    if labels.size and (labels.min() < -1 or labels.max() >= m.num_classes):
        raise CodeRangeError(f"{where}: labels must be in [-1, {m.num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")


class CodeDataset(Dataset):
    """All codes of a split in memory; item i -> {"codes": LongTensor (h, w), "label": int}.

    With flip copies every image appears twice (original, flipped) as consecutive items.
    """

    def __init__(self, root: str | os.PathLike, split: str, expected_fingerprint: str | None = None):
        self.manifest = m = load_manifest(root, split)
        if expected_fingerprint is not None:
            m.check_tokenizer(expected_fingerprint)
        folder = split_folder(root, split)
        codes, labels = [], []
        for index, name in enumerate(m.shards):
            shard = self._read_shard(folder / name, m)
            _check_range(shard["codes"], shard["labels"], m, str(folder / name))
            if shard["codes"].shape[0] != len(m.shard_items(index)):
                raise FormatError(f"{folder / name} holds {shard['codes'].shape[0]} items, "
                                       f"the manifest says {len(m.shard_items(index))}")
            codes.append(shard["codes"])
            labels.append(shard["labels"])
        empty = np.zeros((0, m.num_copies, *m.code_shape), dtype=m.dtype)
        self.codes = np.concatenate(codes) if codes else empty
        self.labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)

    @staticmethod
    def _read_shard(path: Path, m: CodesManifest) -> dict[str, np.ndarray]:
        rerun = ("rerun extract_codes.py with the same arguments: it rewrites missing and damaged "
                 "shards and keeps the others")
        if not path.is_file():
            raise MissingFileError(f"code shard {path} listed in the manifest is missing; {rerun}")
        try:
            with safe_open(str(path), framework="np") as f:
                fingerprint = (f.metadata() or {}).get("tokenizer_fingerprint")
            shard = load_file(str(path))
        except Exception as error:  # safetensors' own errors for a cut or foreign file
            raise FormatError(f"code shard {path} is damaged ({' '.join(str(error).split())}); {rerun}") from None
        check_fingerprint(fingerprint, m.tokenizer_fingerprint, f"shard {path}", expected_from="its manifest")
        if set(shard) != {"codes", "labels"}:
            raise FormatError(f"code shard {path} holds {sorted(shard)}, not codes and labels; {rerun}")
        return shard

    @property
    def code_shape(self) -> tuple[int, int]:
        return self.manifest.code_shape

    @property
    def codebook_size(self) -> int:
        return self.manifest.codebook_size

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def label_names(self) -> list[str]:
        return self.manifest.label_names

    def __len__(self) -> int:
        return self.codes.shape[0] * self.manifest.num_copies

    def __getitem__(self, index: int) -> dict:
        item, copy = divmod(index, self.manifest.num_copies)
        codes = torch.from_numpy(self.codes[item, copy].astype(np.int64))
        return {"codes": codes, "label": int(self.labels[item])}
