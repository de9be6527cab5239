"""What the browser app shows, computed from a tokenizer (and a prior): every function here takes and
returns plain arrays and numbers, so the page, its API and the tests call the same code."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.metrics import ssim, uint8_psnr
from generator import ARPrior
from generator.sampling import SamplingConfig
from provq.app.inputs import Bounds
from provq.app.views import grid
from provq.common.errors import ConfigError, FormatError
from provq.data import DataConfig, load_split
from provq.data.images import open_rgb, resize_center_crop, to_uint8_chw
from provq.data.pixels import to_float, to_hwc, to_uint8
from tokenizer import ProVQTokenizer

MAX_CODEBOOK_IMAGES = 512  # test images whose codes make the usage histogram


@dataclass
class ShownImage:
    """The tokenizer's input and where it came from."""

    pixels: np.ndarray  # (R, R, 3) uint8
    source: str  # "test image 2", or the uploaded file's name
    note: str = ""  # what was done to fit it to the model's size ("" when nothing)


@dataclass
class Reconstruction:
    original: np.ndarray  # (H, W, 3) uint8
    reconstruction: np.ndarray
    codes: np.ndarray  # (h, w) int
    psnr: float
    ssim: float


@dataclass
class CodeGeometry:
    """Codes and encoder outputs in the codes' first two principal axes."""

    codes: np.ndarray  # (K, 2): the codes used on the test images, or all codes when usage is unknown
    latents: np.ndarray | None  # (h * w, 2): the shown image's z_e, or None
    usage_known: bool


@dataclass
class AppSession:
    tok: ProVQTokenizer
    prior: ARPrior | None = None
    images: object | None = None  # the dataset's test split (an ImageDataset), or None
    label_names: list[str] = field(default_factory=list)  # the dataset's
    counts: np.ndarray | None = None  # code counts over up to MAX_CODEBOOK_IMAGES test images

    @classmethod
    def load(cls, tokenizer: str, prior: str | None = None, dataset: str | None = None) -> AppSession:
        tok = ProVQTokenizer.from_pretrained(tokenizer)
        model = None
        if prior is not None:
            model = ARPrior.from_pretrained(prior)
            model.check_tokenizer(tok.fingerprint())  # a prior of another tokenizer: one clear line
        images, names = None, []
        if dataset is not None:
            images = load_split(DataConfig(dataset=dataset, resolution=tok.config.resolution), "test", train=False)
            names = list(images.label_names)
        session = cls(tok, model, images, names)
        session.counts = session._code_counts()
        return session

    # ---- inputs -----------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.tok.config.resolution

    @property
    def class_names(self) -> list[str]:
        """The prior's classes by name: as stored with the prior, else the dataset's when they fit, else
        numbered; [] for a prior trained without classes."""
        classes = self.prior.config.num_classes if self.prior is not None else 0
        if self.prior is not None and self.prior.config.label_names:
            return list(self.prior.config.label_names)
        if len(self.label_names) == classes:
            return list(self.label_names)
        return [str(i) for i in range(classes)]

    def test_image(self, index) -> ShownImage:
        if self.images is None:
            raise ConfigError("no --dataset given: upload an image instead")
        index = Bounds(0, len(self.images) - 1, whole=True).check("test image", index)
        return ShownImage(to_hwc(to_uint8(self.images[index]["image"][None]))[0], f"test image {index}")

    def uploaded_image(self, path: str, name: str | None = None) -> ShownImage:
        """An uploaded file as the tokenizer's input: resized and centre-cropped, as the datasets are, with
        a note saying so when the file was not already the model's size."""
        name = name or Path(path).name
        try:
            image = open_rgb(path)
        except Exception as error:  # PIL's many errors for a file that is no image
            raise FormatError(f"{name} is not an image this app can read ({type(error).__name__})") from None
        width, height = image.size
        side = self.resolution
        note = ""
        if (width, height) != (side, side):
            done = "resized" if width == height else "resized and centre-cropped"
            note = f"{name} is {width}x{height} px: {done} to {side}x{side}, the model's input size"
        return ShownImage(to_hwc(to_uint8_chw(resize_center_crop(image, side))[None])[0], name, note)

    # ---- the tokenizer tab --------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, image: np.ndarray) -> Reconstruction:
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
        codes = self.tok.encode(to_float(pixels))
        fake = to_uint8(self.tok.decode(codes))
        return Reconstruction(image, to_hwc(fake)[0], codes[0].numpy(), float(uint8_psnr(pixels, fake)[0]),
                              float(ssim(pixels.double() / 255, fake.double() / 255)[0]))

    @torch.no_grad()
    def at_hardness(self, image: np.ndarray, hardness: float) -> np.ndarray:
        """What the decoder sees at hardness h (ProVQ's mix of z_e and its code), decoded."""
        if not 0.0 <= hardness <= 1.0:
            raise ConfigError(f"hardness must be in [0, 1], got {hardness}")
        pixels = to_float(torch.from_numpy(image).permute(2, 0, 1)[None])
        out = self.tok(pixels, hardness=hardness, generator=torch.Generator().manual_seed(0))
        return to_hwc(to_uint8(out.reconstruction.clamp(-1, 1)))[0]

    # ---- the codebook tab ---------------------------------------------------------------------------
    @torch.no_grad()
    def _code_counts(self) -> np.ndarray | None:
        if self.images is None:
            return None
        n = min(len(self.images), MAX_CODEBOOK_IMAGES)
        batch = torch.stack([self.images[i]["image"] for i in range(n)])
        codes = self.tok.encode(batch)
        return np.bincount(codes.flatten().numpy(), minlength=self.tok.config.quantizer.codebook_size)

    @torch.no_grad()
    def code_geometry(self, image: np.ndarray | None) -> CodeGeometry:
        """The used codes (all codes when usage is unknown) and the shown image's encoder outputs in the
        codes' first two principal axes."""
        vectors = self.tok.quantizer.codebook_vectors().double()
        used = self.counts > 0 if self.counts is not None else np.ones(len(vectors), bool)
        points = vectors[torch.from_numpy(used)]
        mean = points.mean(0)
        _, _, axes = torch.linalg.svd(points - mean, full_matrices=False)
        project = axes[:2].T
        latents = None
        if image is not None:
            pixels = to_float(torch.from_numpy(image).permute(2, 0, 1)[None])
            z_e = self.tok(pixels, hardness=1.0).quantizer.z_e
            rows = z_e.movedim(1, -1).reshape(-1, z_e.shape[1]).double()
            latents = ((rows - mean) @ project).numpy()
        return CodeGeometry(((points - mean) @ project).numpy(), latents, self.counts is not None)

    # ---- the generate tab ---------------------------------------------------------------------------
    def generate(self, label: int | None, settings: SamplingConfig, seed: int, count: int) -> tuple[np.ndarray, float]:
        """(a grid of ``count`` samples, the seconds they took); label -1 is the null class, the only one
        of a prior trained without classes."""
        from provq.api import generate

        if self.prior is None:
            raise ConfigError("no --prior given: the app was started without one")
        classes = self.prior.config.num_classes
        if classes == 0 and settings.cfg_scale not in (None, 1.0):
            raise ConfigError(f"CFG scale {settings.cfg_scale:g} needs classes, but the prior was trained on "
                              "unlabelled data: use 1")
        if classes == 0:
            label = -1
        elif label is None or not 0 <= label < classes:
            raise ConfigError(f"label {label} outside the prior's classes [0, {classes})")
        started = time.perf_counter()
        images = generate(self.tok, self.prior, torch.full((count,), label), seed=seed, sampling=settings)
        return grid(to_hwc(to_uint8(images))), time.perf_counter() - started
