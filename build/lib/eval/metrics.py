"""Per-image reconstruction metrics: PSNR, SSIM (Wang et al. 2004), LPIPS, and codebook usage."""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn.functional as F

from provq.common.errors import ConfigError
from tokenizer.codebook_stats import perplexity, usage

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PSNR_MAX_DB = 100.0  # identical images would give +inf; a cap keeps means finite


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, C, H, W) images in [0, 1]."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_MAX_DB / 10)))).float()


def uint8_psnr(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of uint8 (N, 3, H, W) images: the protocol of published tables, on the pixels an
    image file holds. Training's evaluation and ``python -m eval rfid`` both report this one."""
    return psnr(real.double() / 255, fake.double() / 255)


def _gaussian_window(channels: int, device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) images in [0, 1]: 11x11 gaussian window (sigma 1.5),

    K1 = 0.01, K2 = 0.03, 'valid' filtering, mean over channels and positions: the reference
    MATLAB code's settings, which skimage (gaussian_weights=True) and pytorch-msssim also use.
    """
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ConfigError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    C = x.shape[1]
    window = _gaussian_window(C, x.device)

    def blur(t):
        return F.conv2d(t, window, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(1).float()


SSIM_PROTOCOLS = {
    "standard": "11x11 gaussian window (sigma 1.5), K1 0.01, K2 0.03, valid, on [0, 1] pixels (Wang et al.)",
    "llamagen": "LlamaGen's: skimage's default 7x7 uniform window with sample covariance, data_range 2.0 "
                "on [0, 1] pixels (tokenizer/validation/val_ddp.py)",
}


def ssim_llamagen(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM as LlamaGen reports it: skimage.metrics.structural_similarity(multichannel,
    data_range=2.0) of (N, C, H, W) images in [0, 1]: a 7x7 box window (its borders cropped, so a
    'valid' average), the covariance normalized by 49/48, channels averaged."""
    if min(x.shape[-2:]) < 7:
        raise ConfigError(f"SSIM needs images of at least 7 px, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()

    def box(t):
        return F.avg_pool2d(t, 7, stride=1)

    norm = 49 / 48
    mu_x, mu_y = box(x), box(y)
    var_x, var_y = norm * (box(x * x) - mu_x**2), norm * (box(y * y) - mu_y**2)
    cov_xy = norm * (box(x * y) - mu_x * mu_y)
    c1, c2 = (SSIM_K1 * 2.0) ** 2, (SSIM_K2 * 2.0) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).float()


def load_lpips(net: str = "alex", device="cpu"):
    """(model, None), or (None, why) when its trunk weights cannot be had (e.g. offline)."""
    try:
        import lpips

        # lpips prints its own banner; results go to stdout as JSON, so keep it quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            model = lpips.LPIPS(net=net, verbose=False)
    except Exception as error:  # ImportError, or the torchvision trunk download failing offline
        return None, f"lpips ({net}) could not load its weights: {type(error).__name__}: {error}"
    return model.eval().requires_grad_(False).to(device), None


def codebook_usage(counts: torch.Tensor) -> dict:
    """Fraction of codes used and perplexity exp(H(p)) of the code frequencies over a split."""
    counts = counts.double()
    return {
        "codebook_usage": float(usage(counts)),
        # over the used codes only: the same sum, term for term, whatever the codebook size
        "codebook_perplexity": float(perplexity(counts[counts > 0])) if counts.sum() > 0 else 0.0,
        "codes_used": int((counts > 0).sum()),
    }


def code_grid_diversity(sampled: torch.Tensor, training: torch.Tensor) -> dict:
    """How varied a prior's samples are, in code space: the fraction of distinct code grids among
    the samples, the fraction that copy a training grid exactly, and the share of the training
    codes' vocabulary the samples use. ``sampled`` (N, h, w) and ``training`` (M, h, w) integer grids."""
    rows = {tuple(g) for g in training.reshape(len(training), -1).tolist()}
    grids = [tuple(g) for g in sampled.reshape(len(sampled), -1).tolist()]
    train_vocabulary = set(training.unique().tolist())
    return {
        "distinct_grids": len(set(grids)) / max(len(grids), 1),
        "copied_grids": sum(g in rows for g in grids) / max(len(grids), 1),
        "vocabulary_used": len(set(sampled.unique().tolist()) & train_vocabulary) / max(len(train_vocabulary), 1),
    }
