"""Evaluation: FID with the standard Inception (rFID, gFID), IS, PSNR, SSIM, LPIPS, codebook usage."""

from eval.fid import (
    FeatureStats,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    load_stats,
    save_stats,
)
from eval.inception import PROTOCOL, FIDInception, load_inception, protocol

__all__ = [
    "FeatureStats", "feature_stats", "fid_from_stats", "frechet_distance", "load_stats", "save_stats",
    "PROTOCOL", "FIDInception", "load_inception", "protocol",
]
