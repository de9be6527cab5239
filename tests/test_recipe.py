"""configs/imagenet256.yaml at its real shapes: the full VQ-16-sized tokenizer with the GAN and the
perceptual loss, codes, the GPT-B prior and one guided sample, on generated images laid out as
ImageNet. Two steps each: shapes, finite losses, and every field of the recipe read by the code."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image
from training_helpers import REPO, logged_steps, run_in_process

from generator import ARPrior, load_manifest
from provq.commands import extract_codes, sample, train_prior, train_tokenizer
from provq.common.presets import load_yaml
from tokenizer import ProVQTokenizer
from tokenizer import losses as tokenizer_losses

RECIPE = REPO / "configs" / "imagenet256.yaml"
CLASSES = ("n01440764", "n01443537")


def imagenet_layout(root):
    """train/<wnid>/*.JPEG (3 per class) and val/<wnid>/*.JPEG (1 per class), 300 x 260 px."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((260, 300, 3)) * 80 + 90 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def leaf_fields(mapping: dict, prefix: str = "") -> set[str]:
    fields = set()
    for key, value in mapping.items():
        fields |= leaf_fields(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return fields


class FieldReads:
    """Which fields of the config dataclasses the commands read. Whole-config copies (asdict,
    replace: saving the resolved config, the trackers' hyper-parameters, the export's config.json)
    are not reads: recording pauses inside them."""

    def __init__(self, monkeypatch):
        self.read: set[str] = set()
        self.paused = 0
        for name in ("asdict", "replace"):
            monkeypatch.setattr(dataclasses, name, self._pausing(getattr(dataclasses, name)))

    def _pausing(self, function):
        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.paused -= 1
        return paused

    def track(self, config, prefix: str = ""):
        """Record the reads of ``config`` and every dataclass inside it, named by dotted path."""
        for field in dataclasses.fields(config):
            value = object.__getattribute__(config, field.name)
            if dataclasses.is_dataclass(value):
                self.track(value, f"{prefix}{field.name}.")
        names, reads, cls = {f.name for f in dataclasses.fields(config)}, self, type(config)

        def __getattribute__(obj, name):
            if name in names and not reads.paused:
                reads.read.add(prefix + name)
            return cls.__getattribute__(obj, name)

        config.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
        return config

    def tracking(self, parse):
        def parse_and_track(*args, **kwargs):
            config, rest = parse(*args, **kwargs)
            return self.track(config), rest
        return parse_and_track


@pytest.mark.slow
def test_the_imagenet256_recipe_runs_at_its_real_shapes(tmp_path, monkeypatch):
    root = imagenet_layout(tmp_path / "imagenet")
    reads = FieldReads(monkeypatch)
    monkeypatch.setattr(train_tokenizer, "parse_config", reads.tracking(train_tokenizer.parse_config))
    monkeypatch.setattr(train_prior, "parse_config", reads.tracking(train_prior.parse_config))
    monkeypatch.setattr(extract_codes, "parse_config", reads.tracking(extract_codes.parse_config))
    monkeypatch.setattr(sample, "parse_config", reads.tracking(sample.parse_config))
    # LPIPS's VGG trunk cannot be downloaded here: a random trunk (its numbers are not LPIPS)
    monkeypatch.setattr(tokenizer_losses, "make_perceptual_loss",
                        lambda weight, net="vgg", random_trunk=False: tokenizer_losses.LPIPSLoss(net, True))
    shared = ["--config", str(RECIPE), "--data.dataset", str(root), "--data.num_workers", "0"]
    # bf16 (the recipe's) where this CPU computes it; fp32 where it would be emulated ~50x slower
    precision = {stage: [f"--{stage}.train.mixed_precision", "auto"] for stage in ("tokenizer", "prior")}

    tok_dir = run_in_process(train_tokenizer.main, [
        *shared, "--output_dir", str(tmp_path / "tok"), "--max_steps", "2",
        "--tokenizer.train.batch_size", "1", "--tokenizer.loss.disc_start", "0",
        "--tokenizer.train.eval_batches", "1", "--tokenizer.train.log_every", "1", *precision["tokenizer"]])
    tok = ProVQTokenizer.from_pretrained(tok_dir)
    assert tok.code_shape == (16, 16) and tok.config.quantizer.codebook_size == 16384
    assert sum(p.numel() for p in tok.parameters()) > 60e6  # VQ-16 sized, not a toy
    rows = [r for r in logged_steps(tmp_path / "tok" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("loss/reconstruction", "loss/perceptual", "loss/quantizer", "loss/gan_g", "loss/gan_d",
                 "gan/logits_real", "gan/logits_fake", "loss/total"):
        assert all(math.isfinite(r[name]) for r in rows), name
    assert all(r["loss/gan_weight"] == 1.0 for r in rows)  # LlamaGen: no adaptive weight

    run_in_process(extract_codes.main, [*shared, "--output_dir", str(tmp_path / "codes"),
                                        "--tokenizer", str(tok_dir), "--batch_size", "2"])
    manifest = load_manifest(tmp_path / "codes", "train")
    assert (manifest.num_items, manifest.code_shape, manifest.num_classes) == (6, (16, 16), 2)

    prior_dir = run_in_process(train_prior.main, [
        "--config", str(RECIPE), "--codes", str(tmp_path / "codes"), "--output_dir", str(tmp_path / "prior"),
        "--max_steps", "2", "--prior.train.batch_size", "2", "--prior.train.log_every", "1",
        "--prior.train.grid_per_class", "1", *precision["prior"]])
    prior = ARPrior.from_pretrained(prior_dir)
    assert (prior.config.num_layers, prior.config.hidden_size, prior.config.position_embedding) == (
        12, 768, "rope_2d")
    prior_rows = [r for r in logged_steps(tmp_path / "prior" / "metrics.jsonl") if "loss/ce" in r]
    assert [r["step"] for r in prior_rows] == [1, 2] and all(math.isfinite(r["loss/ce"]) for r in prior_rows)
    with Image.open(tmp_path / "prior" / "images" / "samples_00000002.png") as grid:  # guided, 2 classes
        assert grid.size == (2 + 256 + 2, 2 + 2 * (256 + 2))  # a row per class, one sample each
    # LlamaGen's head starts at zero: the first loss is exactly log(codebook size)
    assert prior_rows[0]["loss/ce"] == pytest.approx(math.log(16384), abs=1e-3)

    samples = run_in_process(sample.main, [
        "--config", str(RECIPE), "--tokenizer", str(tok_dir), "--prior", str(prior_dir),
        "--output_dir", str(tmp_path / "samples"), "--num_images", "1", "--labels", "1"])
    with np.load(samples) as data:
        assert data["arr_0"].shape == (1, 256, 256, 3) and data["labels"].tolist() == [1]

    unread = leaf_fields({k: v for k, v in load_yaml(RECIPE).items()}) - reads.read
    assert not unread, f"recipe fields no command reads: {sorted(unread)}"
