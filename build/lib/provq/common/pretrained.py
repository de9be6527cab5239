"""save_pretrained / from_pretrained for a module built from one dataclass config.

A folder holds ``config.json`` (``model_type``, ``config_version`` and the config's fields),
``model.safetensors`` and a model card ``README.md`` (common.cards: metadata, metrics with their
protocols, how to load it); ``push_to_hub`` uploads such a folder through huggingface_hub. huggingface_hub's ModelHubMixin would rebuild nested dataclass configs
as plain dicts and has no format version, so the tokenizer and the prior share this instead.
Fields added to a config after version 1 default to the behaviour files without them had,
so older folders load as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from provq.common.cards import CARD_NAME, CardContent, CardMetric, merged, read_card, render
from provq.common.errors import ConfigError, FormatError
from provq.common.files import (
    load_weights,
    read_versioned,
    resolve_files,
    save_weights,
    write_json_atomic,
)
from provq.common.folders import CONFIG_NAME, MODEL_TYPES, expect_kind
from provq.common.typed_config import build_config, config_to_dict

WEIGHTS_NAME = "model.safetensors"
VERSION_KEY = "config_version"


class PretrainedMixin:
    """For ``nn.Module`` subclasses built as ``cls(config)`` that keep it as ``self.config``."""

    config_class: type
    config_version: int = 1
    kind: str  # "tokenizer" or "prior": common.folders.MODEL_TYPES names its model_type
    model_type: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            cls.model_type = MODEL_TYPES[cls.kind]

    @classmethod
    def card_content(cls, config) -> CardContent:
        """What the model card says about a model of this config (each model class says it)."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike, metrics: list[CardMetric] | None = None,
                        datasets: list[str] | None = None) -> Path:
        """Write ``model.safetensors`` (no pickle), the model card and ``config.json``; returns the
        folder. The card lists ``metrics`` (by default those of the card the model was loaded with)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"model_type": self.model_type, VERSION_KEY: self.config_version,
                  **config_to_dict(self.config)}
        save_weights(self, directory / WEIGHTS_NAME)
        card_metrics, card_datasets = getattr(self, "card", ([], []))
        render(self.card_content(self.config), card_metrics if metrics is None else metrics,
               card_datasets if datasets is None else datasets).save(directory / CARD_NAME)
        write_json_atomic(directory / CONFIG_NAME, record)  # last: the folder is complete once it is there
        return directory

    @classmethod
    def update_card(cls, folder: str | os.PathLike, metrics: list[CardMetric]) -> Path:
        """Add (or replace, per metric, dataset and split) measured numbers on a folder's card."""
        config = cls.read_config(Path(folder) / CONFIG_NAME)
        old, datasets = read_card(folder)
        path = Path(folder) / CARD_NAME
        render(cls.card_content(config), merged(old, metrics), datasets).save(path)
        return path

    def push_to_hub(self, repo_id: str, metrics: list[CardMetric] | None = None, datasets: list[str] | None = None,
                    private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload with provq") -> str:
        """``save_pretrained`` into a temporary folder, then huggingface_hub's ``create_repo`` and
        ``upload_folder``; returns the commit URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, metrics, datasets)
            return push_folder_to_hub(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def read_config(cls, path: str | os.PathLike):
        """The config of a saved folder; refuses a folder of another kind (first: a prior's newer
        config_version is no reason to upgrade a tokenizer), a newer version, unknown fields."""
        expect_kind(Path(path).parent, cls.kind)
        data, version = read_versioned(path, VERSION_KEY, cls.config_version)
        data.pop("model_type", None)  # files of 0.1.0 tokenizers had none
        try:
            return build_config(cls.config_class, cls.upgrade_config(data, version))
        except ConfigError as error:
            raise FormatError(f"{path}: {error}") from error

    @classmethod
    def upgrade_config(cls, data: dict, version: int) -> dict:
        """The fields of a config written at an older ``version``, as this version names them."""
        return data

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None):
        """Load a folder written by ``save_pretrained``, or a Hub repo id (when online), in eval mode."""
        if Path(name_or_path).is_dir():
            expect_kind(name_or_path, cls.kind)
        config_file, weights_file = resolve_files(name_or_path, (CONFIG_NAME, WEIGHTS_NAME),
                                                  cls.model_type, revision)
        model = cls(cls.read_config(config_file))
        load_weights(model, weights_file)
        model.card = read_card(Path(config_file).parent)  # kept when the model is saved again unchanged
        return model.to(device).eval()


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None,
                       token: str | None = None, commit_message: str = "Upload with provq") -> str:
    """Upload an exported model folder (config.json, model.safetensors, README.md) as a Hub repo."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, token=token, exist_ok=True)
    info = upload_folder(repo_id=repo_id, folder_path=str(folder), token=token, commit_message=commit_message,
                         allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    return str(getattr(info, "commit_url", info))
