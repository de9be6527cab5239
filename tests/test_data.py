"""Tests of data/: the real emoji build, image folders with bad files, transforms, the CLI."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import provq.data.emoji as emoji
from provq.data import (
    DataConfig,
    DatasetNotFoundError,
    SkipTracker,
    collate,
    load_split,
    open_rgb,
)
from provq.data.describe import main as describe_main
from provq.data.images import TEST_FRACTION, flip_bit, resize_center_crop, split_bucket

REPO = Path(__file__).resolve().parents[1]
needs_emoji = pytest.mark.skipif(
    not (emoji.FONT_PATH.is_file() and emoji.EMOJI_TEST_PATH.is_file()),
    reason=f"needs the font and unicode-data: {emoji.APT_FIX}")


# ---------------------------------------------------------------- helpers

def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(size: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def half_black_half_white(size: int = 32) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, size // 2:] = 255
    return Image.fromarray(pixels)


def write_bad_files(folder: Path) -> list[str]:
    """A corrupt, a truncated and a zero-byte image; returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    (folder / "truncated.png").write_bytes(noise_png()[:2000])
    (folder / "empty.jpg").write_bytes(b"")
    return ["corrupt.png", "truncated.png", "empty.jpg"]


@pytest.fixture(scope="session")
def emoji_config(tmp_path_factory) -> DataConfig:
    """The real emoji build, once per session, in a private cache folder."""
    if not emoji.FONT_PATH.is_file():
        pytest.skip(emoji.APT_FIX)
    return DataConfig(cache_dir=str(tmp_path_factory.mktemp("provq_cache")), in_memory=False)


@pytest.fixture()
def class_folder(tmp_path) -> Path:
    """cat/ and dog/ (24 good images each) plus three unreadable files in cat/."""
    root = tmp_path / "pets"
    for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
        for i in range(24):
            save(Image.new("RGB", (40 + i, 36), colour), root / label / f"{i:02d}.png")
    write_bad_files(root / "cat")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- emoji

@needs_emoji
def test_emoji_build_counts_labels_and_split(emoji_config, monkeypatch):
    train = load_split(emoji_config, "train", train=True)
    test = load_split(emoji_config, "test", train=False)
    assert len(train) + len(test) >= 3900
    assert train.num_classes >= 8 and train.label_names == test.label_names
    assert {"Smileys & Emotion", "People & Body", "Flags"} <= set(train.label_names)
    assert 0.07 < len(test) / (len(train) + len(test)) < 0.13
    assert not set(train.names) & set(test.names)
    # The split is a pure function of the code points (sha1), so every machine agrees.
    assert all(split_bucket(name) < TEST_FRACTION for name in test.names)
    assert all(split_bucket(name) >= TEST_FRACTION for name in train.names)
    # A second load reuses the cache (no rebuild) and gives the same keys in order.
    monkeypatch.setattr(emoji, "build_emoji", lambda target: pytest.fail("rebuilt the cache"))
    assert load_split(emoji_config, "train", train=True).names == train.names
    everything = dict(zip(train.names + test.names, train.labels + test.labels, strict=True))
    group = {name: train.label_names[label] for name, label in everything.items()}
    assert group["1F600"] == "Smileys & Emotion"  # grinning face
    assert group["1F1EF 1F1F5"] == "Flags"  # Japan (a regional indicator pair)
    assert group["1F44D 1F3FB"] == "People & Body"  # thumbs up, light skin tone
    assert group["0023 20E3"] == "Symbols"  # keycap #, matched with FE0F removed


@needs_emoji
def test_emoji_in_memory_tensors(emoji_config):
    config = DataConfig(cache_dir=emoji_config.cache_dir, in_memory="auto")
    train = load_split(config, "train", train=True)
    assert train.pixels is not None and train.pixels.shape[1:] == (3, 32, 32)
    batch = collate([train[i] for i in range(64)])
    assert batch["image"].shape == (64, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["skipped"] == [] and batch["label"].min() >= 0
    # Composited and padded on white: the corners are white.
    corners = batch["image"][:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 1).float().mean() > 0.9


def test_emoji_missing_font_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji, "FONT_PATH", tmp_path / "NoSuchFont.ttf")
    with pytest.raises(FileNotFoundError, match="sudo apt-get install fonts-noto-color-emoji "
                                                "unicode-data"):
        load_split(DataConfig(cache_dir=str(tmp_path)), "train", train=True)


@needs_emoji
def test_emoji_failed_build_leaves_no_cache(monkeypatch, tmp_path):
    records = [{"image": Image.new("RGB", (4, 4)), "label": 0, "codepoints": "1F600",
                "glyph": "g"}]
    monkeypatch.setattr(emoji, "emoji_records", lambda: (records, ["Smileys & Emotion"]))

    def killed(self, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "half-written").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr("datasets.DatasetDict.save_to_disk", killed)
    with pytest.raises(KeyboardInterrupt):
        emoji.load_emoji(str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor a scratch folder


# ---------------------------------------------------------------- decoding odd files

def test_open_rgb_converts_every_mode():
    grey = Image.new("L", (2, 2), 100)
    assert open_rgb(png_bytes(grey)).getpixel((0, 0)) == (100, 100, 100)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 (red) is transparent
    rgb = open_rgb(png_bytes(palette))
    assert (rgb.getpixel((0, 0)), rgb.getpixel((1, 0))) == ((255, 255, 255), (0, 255, 0))
    sixteen = Image.fromarray(np.array([[65535, 257 * 50]], np.uint16))
    assert sixteen.mode == "I;16"
    rgb = open_rgb(png_bytes(sixteen))
    assert (rgb.getpixel((0, 0)), rgb.getpixel((1, 0))) == ((255,) * 3, (50,) * 3)
    tiff = io.BytesIO()
    Image.new("I", (1, 1), 70).save(tiff, "TIFF")  # 32-bit integer grey, 8-bit range
    assert open_rgb(tiff.getvalue()).getpixel((0, 0)) == (70, 70, 70)
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    rgb = open_rgb(png_bytes(rgba))
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)
    assert all(120 <= value <= 135 for value in rgb.getpixel((2, 0)))  # half black on white
    assert open_rgb(png_bytes(Image.new("LA", (1, 1), (0, 0)))).getpixel((0, 0)) == (255,) * 3
    cmyk = io.BytesIO()
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(cmyk, "JPEG", quality=100)
    red, green, blue = open_rgb(cmyk.getvalue()).getpixel((0, 0))
    assert red > 240 and green < 15 and blue < 15
    assert open_rgb(png_bytes(Image.new("1", (1, 1), 1))).getpixel((0, 0)) == (255,) * 3


def test_open_rgb_refuses_bad_files(tmp_path, monkeypatch):
    names = write_bad_files(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries do
    for name in names:
        with pytest.raises(Exception):  # noqa: B017 - PIL raises several types
            open_rgb(tmp_path / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- image folders

def test_folder_classes_split_and_skipped_files(class_folder, caplog):
    config = DataConfig(dataset=str(class_folder), in_memory=False)
    train = load_split(config, "train", train=True)
    test = load_split(config, "test", train=False)
    assert train.label_names == ["cat", "dog"] == test.label_names
    assert len(train) + len(test) == 51 and 1 <= len(test) <= 12
    assert not set(train.names) & set(test.names)
    assert load_split(config, "train", train=True).names == train.names
    tracker, seen = SkipTracker(), 0
    for dataset in (train, test):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)
        for batch in loader:
            tracker.update(batch)
            seen += len(batch["image"])
            assert batch["image"].shape[1:] == (3, 32, 32)
            for name, label in zip(batch["index"], batch["label"], strict=True):
                assert dataset.names[name].startswith(dataset.label_names[label] + "/")
    assert seen == 48 and tracker.count == 3
    assert sorted(tracker.names) == ["cat/corrupt.png", "cat/empty.jpg", "cat/truncated.png"]
    with caplog.at_level(logging.WARNING):
        tracker.report()
        tracker.report()  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "skipped 3" in lines[0] and "cat/corrupt.png" in lines[0]


def test_folder_in_memory_matches_lazy(class_folder):
    lazy = load_split(DataConfig(dataset=str(class_folder), in_memory=False), "train", True)
    eager = load_split(DataConfig(dataset=str(class_folder), in_memory=True), "train", True)
    assert eager.pixels is not None and len(eager.unreadable) >= 1
    for index in range(len(lazy)):
        a, b = lazy[index], eager[index]
        assert a.keys() == b.keys()
        if "image" in a:
            assert torch.equal(a["image"], b["image"])


def test_unlabelled_folder(tmp_path):
    for i in range(12):
        save(Image.new("RGB", (8, 8), (i * 20, 0, 0)), tmp_path / "flat" / f"{i}.png")
    config = DataConfig(dataset=str(tmp_path / "flat"))
    items = [load_split(config, split, train=False) for split in ("train", "test")]
    assert sum(len(d) for d in items) == 12 and all(d.num_classes == 0 for d in items)
    assert all(d[i]["label"] == -1 for d in items for i in range(len(d)))


def make_imagenet_layout(root: Path) -> None:
    for split, count in (("train", 6), ("val", 2)):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            for i in range(count):
                save(Image.new("RGB", (50, 40), (i, 0, 0)), root / split / wnid / f"{i}.JPEG")


def test_split_folders_and_class_subset(tmp_path):
    make_imagenet_layout(tmp_path / "imagenet")
    config = DataConfig(dataset=str(tmp_path / "imagenet"), test_split="val")
    train, val = load_split(config, "train", True), load_split(config, "test", False)
    assert (len(train), len(val), train.num_classes) == (18, 6, 3)
    assert all(name.startswith(("val/n01440764/", "val/n01443537/", "val/n01484850/"))
               for name in val.names)
    # The default test_split "test" falls back to val/ when there is no test/ folder.
    default = load_split(DataConfig(dataset=str(tmp_path / "imagenet")), "test", False)
    assert default.names == val.names
    subset = tmp_path / "subset.txt"
    subset.write_text("n01484850\n\nn01440764\n")
    config.class_subset = str(subset)
    train = load_split(config, "train", True)
    assert train.label_names == ["n01484850", "n01440764"] and len(train) == 12
    assert all(train.names[i].startswith(f"train/{train.label_names[train.labels[i]]}/")
               for i in range(len(train)))
    subset.write_text("n01484850\nn99999999\n")
    with pytest.raises(ValueError, match="n99999999"):
        load_split(config, "train", True)


def test_unknown_and_empty_datasets(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Offline, so the hub lookup fails at once instead of retrying for ~20 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("no-such-owner/no-such-dataset", "./no/such/folder"):
        with pytest.raises(DatasetNotFoundError, match="emoji.*folder.*hub"):
            load_split(DataConfig(dataset=name), "train", train=True)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_split(DataConfig(dataset=str(tmp_path / "empty")), "train", train=True)


def test_hub_dataset_columns(monkeypatch):
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "y": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (48, 48), (0, 255, 0))] * 4, "y": [0, 1, 1, 0]}, features)
    table = table.cast_column("img", datasets.Image())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: table)
    config = DataConfig(dataset="someone/tiny", image_column="img", label_column="y")
    hub = load_split(config, "train", train=False)
    assert hub.label_names == ["a", "b"] and hub.labels == [0, 1, 1, 0]
    item = hub[1]
    assert item["label"] == 1 and item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"][1], torch.ones(32, 32))  # green channel saturated
    config.label_column = None
    assert load_split(config, "train", train=False)[0]["label"] == -1
    config.image_column = "picture"
    with pytest.raises(ValueError, match="picture"):
        load_split(config, "train", train=False)


# ---------------------------------------------------------------- transforms

def test_transforms_resize_crop_and_range(tmp_path):
    wide = np.zeros((32, 128, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:96] = (0, 255, 0)
    wide[:, 96:] = (0, 0, 255)
    for resolution in (16, 32):
        # The crop is centered: only the green middle of the 4:1 image is left.
        crop = np.asarray(resize_center_crop(Image.fromarray(wide), resolution))
        assert crop.shape == (resolution, resolution, 3)
        assert (crop[..., 1] == 255).all() and (crop[..., [0, 2]] == 0).all()
    for i, size in enumerate([(300, 200), (20, 90), (32, 32), (7, 5)]):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), np.uint8)
        save(Image.fromarray(pixels), tmp_path / "sizes" / "train" / f"{i}.png")
    save(Image.new("RGB", (8, 8)), tmp_path / "sizes" / "test" / "black.png")
    config = DataConfig(dataset=str(tmp_path / "sizes"), resolution=32)
    items = [load_split(config, "train", train=True)[i]["image"] for i in range(4)]
    black = load_split(config, "test", train=False)[0]["image"]
    assert black.shape == (3, 32, 32) and (black == -1).all()
    for image in items:
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1 and image.min() < 0 < image.max()


def test_flip_only_in_train_and_deterministic(tmp_path):
    for i in range(20):
        save(half_black_half_white(), tmp_path / "halves" / f"{i:02d}.png")
    config = DataConfig(dataset=str(tmp_path / "halves"))
    evaluation = load_split(config, "train", train=False)
    assert all(evaluation[i]["image"][:, :, 0].max() == -1 for i in range(len(evaluation)))
    first, again = (load_split(config, "train", train=True, seed=3) for _ in range(2))
    flips = {}
    for epoch in (0, 1):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        for i in range(len(first)):
            image = first[i]["image"]
            assert torch.equal(image, again[i]["image"])  # same (seed, epoch, index)
            flipped = bool(image[0, 0, 0] == 1)
            assert flipped == flip_bit(3, epoch, i)
            assert torch.equal(image, evaluation[i]["image"].flip(-1) if flipped
                               else evaluation[i]["image"])
            flips[epoch, i] = flipped
    assert 0 < sum(flips.values()) < len(flips)  # both outcomes occur
    assert any(flips[0, i] != flips[1, i] for i in range(len(first)))  # epochs differ


# ---------------------------------------------------------------- describe CLI

@needs_emoji
def test_describe_emoji_json(emoji_config, capsys):
    assert describe_main(["describe", "--dataset", "emoji",
                          "--cache_dir", emoji_config.cache_dir]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] >= 3900 and summary["num_classes"] >= 8
    assert summary["resolution_on_disk"] == "136x136" and summary["skipped"] == 0
    train = summary["splits"]["train"]
    assert sum(train["label_counts"].values()) == train["images"]


def test_describe_cli_folder(class_folder):
    result = subprocess.run(
        [sys.executable, "-m", "provq.data", "describe", "--dataset", str(class_folder)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["images"] == 51 and summary["skipped"] == 3
    assert summary["label_names"] == ["cat", "dog"]
    assert summary["resolution_on_disk"]["width"] == [40, 63]
    splits = summary["splits"]
    assert splits["train"]["label_counts"]["dog"] + splits["test"]["label_counts"]["dog"] == 24


def test_random_crop_is_adms_and_a_function_of_seed_epoch_and_index(tmp_path):
    folder = tmp_path / "images"
    ramp = np.tile(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (60, 1, 3))  # brightness = column
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        Image.fromarray(ramp).save(folder / split / "a.png")
    config = DataConfig(dataset=str(folder), resolution=32, train_crop="random", in_memory=True,
                        test_split="val")
    train = load_split(config, "train", train=True, seed=0)
    assert train.pixels is None  # crops change per epoch: nothing is cached
    crops = []
    for epoch in range(12):
        train.set_epoch(epoch)
        crops.append(train[0]["image"])
        assert torch.equal(train[0]["image"], crops[-1])  # the same item in the same epoch
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert len({c.sum().item() for c in crops}) > 6  # windows and scales differ between epochs
    # the shorter side (60) is scaled to [32, 40]: a window covers 32/40 to 32/32 of the height,
    # so its width in source columns spans 32*60/40 = 48 to 60 of the 80 columns (+/- edge blur)
    spans = [abs(c[0, 16, -1] - c[0, 16, 0]).item() * 127.5 / 3 for c in crops]  # flipped: negative
    assert all(40 < span < 62 for span in spans), spans
    evaluation = load_split(config, "test", train=False)  # evaluation: always the centre crop
    centre = load_split(DataConfig(dataset=str(folder), resolution=32, test_split="val"), "test", False)
    assert torch.equal(evaluation[0]["image"], centre[0]["image"])
    with pytest.raises(ValueError, match="train_crop"):
        DataConfig(train_crop="square")
