"""What the browser app shows, computed from a tokenizer (and a prior): every function here takes and
returns plain arrays and numbers, so the page and the tests call the same code."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from eval.metrics import ssim, uint8_psnr
from generator import ARPrior
from generator.sampling import SamplingConfig
from provq.common.errors import ConfigError, FormatError
from provq.data import DataConfig, load_split
from provq.data.images import open_rgb, resize_center_crop, to_uint8_chw
from provq.data.pixels import to_float, to_hwc, to_uint8
from tokenizer import ProVQTokenizer

MAX_CODEBOOK_IMAGES = 512  # test images whose codes make the usage histogram


@dataclass
class Reconstruction:
    original: np.ndarray  # (H, W, 3) uint8
    reconstruction: np.ndarray
    code_map: np.ndarray  # the indices as a colour grid, upscaled
    codes: np.ndarray  # (h, w) int
    psnr: float
    ssim: float


@dataclass
class AppSession:
    tok: ProVQTokenizer
    prior: ARPrior | None = None
    images: object | None = None  # the dataset's test split (an ImageDataset), or None
    label_names: list[str] = field(default_factory=list)
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

    def test_image(self, index: int) -> np.ndarray:
        if self.images is None:
            raise ConfigError("no --dataset given: upload an image instead")
        if not 0 <= index < len(self.images):
            raise ConfigError(f"image {index} is outside the test split [0, {len(self.images)})")
        return to_hwc(to_uint8(self.images[index]["image"][None]))[0]

    def uploaded_image(self, path: str) -> np.ndarray:
        """An uploaded file as the tokenizer's input: resized and centre-cropped, as the datasets are."""
        try:
            image = open_rgb(path)
        except Exception as error:  # PIL's many errors for a file that is no image
            name = str(path).rsplit("/", 1)[-1]
            raise FormatError(f"{name} is not an image this app can read ({type(error).__name__})") from None
        return to_hwc(to_uint8_chw(resize_center_crop(image, self.resolution))[None])[0]

    # ---- the tokenizer tab --------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, image: np.ndarray) -> Reconstruction:
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
        codes = self.tok.encode(to_float(pixels))
        fake = to_uint8(self.tok.decode(codes))
        return Reconstruction(image, to_hwc(fake)[0], code_map(codes[0].numpy(), self.tok.config.quantizer.codebook_size),
                              codes[0].numpy(), float(uint8_psnr(pixels, fake)[0]),
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
    def code_geometry(self, image: np.ndarray | None) -> dict:
        """The used codes and the shown image's encoder outputs in the codes' first two principal axes."""
        vectors = self.tok.quantizer.codebook_vectors().double()
        used = self.counts > 0 if self.counts is not None else np.ones(len(vectors), bool)
        points = vectors[torch.from_numpy(used)]
        mean = points.mean(0)
        _, _, axes = torch.linalg.svd(points - mean, full_matrices=False)
        project = axes[:2].T
        found = {"codes": ((points - mean) @ project).numpy(), "latents": None}
        if image is not None:
            pixels = to_float(torch.from_numpy(image).permute(2, 0, 1)[None])
            z_e = self.tok(pixels, hardness=1.0).quantizer.z_e
            rows = z_e.movedim(1, -1).reshape(-1, z_e.shape[1]).double()
            found["latents"] = ((rows - mean) @ project).numpy()
        return found

    # ---- the generate tab ---------------------------------------------------------------------------
    def generate(self, label: int | None, settings: SamplingConfig, seed: int, count: int) -> tuple[np.ndarray, float]:
        """(a grid of ``count`` samples, the seconds they took)."""
        from provq.commands.sample import generate

        if self.prior is None:
            raise ConfigError("no --prior given: the app was started without one")
        classes = self.prior.config.num_classes
        if classes == 0:
            label, settings = -1, dataclasses.replace(settings, cfg_scale=1.0)  # the null class, unguided
        elif label is None or not 0 <= label < classes:
            raise ConfigError(f"label {label} outside the prior's classes [0, {classes})")
        started = time.perf_counter()
        images = generate(self.tok, self.prior, torch.full((count,), label), seed=seed, **dataclasses.asdict(settings))
        return grid(to_hwc(to_uint8(images))), time.perf_counter() - started


def code_map(codes: np.ndarray, codebook_size: int, scale: int = 16) -> np.ndarray:
    """Each code index as a colour (hue by index, a golden-ratio walk so neighbours differ), upscaled."""
    import colorsys

    hue = (codes.astype(np.float64) * 0.618033988749895) % 1.0
    value = 0.55 + 0.45 * (codes % 3) / 2
    rgb = np.array([[colorsys.hsv_to_rgb(h, 0.75, v) for h, v in zip(hr, vr, strict=True)]
                    for hr, vr in zip(hue, value, strict=True)])
    return np.kron((rgb * 255).round().astype(np.uint8), np.ones((scale, scale, 1), np.uint8))


def grid(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one picture with `columns` per row (white padding)."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 2), columns * (w + 2), 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = image
    return canvas
