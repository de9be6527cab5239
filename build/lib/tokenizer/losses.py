"""Tokenizer losses as pure functions: reconstruction, LPIPS, hinge GAN, VQGAN adaptive weight."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from provq.common.errors import MissingFileError
from provq.common.typed_config import check_ranges


@dataclass
class LossConfig:
    """Weights of the stage-1 terms; a weight of 0 switches a term off (the trainer sums them)."""

    reconstruction: str = "l1"  # l1 | l2
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0  # LPIPS; needs the torchvision trunk weights
    perceptual_net: str = "vgg"  # vgg | alex | squeeze
    gan_weight: float = 0.1
    adaptive_gan_weight: bool = True  # VQGAN: balance GAN and reconstruction gradients
    max_adaptive_weight: float = 1e4
    disc_start: int = 0  # generator-side GAN loss and discriminator updates start at this step
    disc_loss_weight: float = 1.0  # the discriminator's own loss is scaled by this (LlamaGen: 0.5)

    def __post_init__(self) -> None:
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        check_ranges(self, non_negative=("reconstruction_weight", "perceptual_weight", "gan_weight",
                                         "max_adaptive_weight", "disc_start", "disc_loss_weight"))


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    reconstruction, target = reconstruction.float(), target.float()
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    if kind == "l2":
        return F.mse_loss(reconstruction, target)
    raise ValueError(f"reconstruction kind must be 'l1' or 'l2', got {kind!r}")


class LPIPSLoss(nn.Module):
    """Frozen lpips.LPIPS; mean distance over the batch, inputs in [-1, 1].

    `random_trunk=True` builds the network with a random (untrained) trunk: only
    for tests on machines without the torchvision weights. Its numbers are not
    LPIPS and must never be reported as such.
    """

    def __init__(self, net: str = "vgg", random_trunk: bool = False) -> None:
        super().__init__()
        import lpips

        try:
            with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=`
                warnings.simplefilter("ignore", UserWarning)
                self.lpips = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False)
        except Exception as error:  # no network / no cached weights: say what to do
            raise MissingFileError(
                f"LPIPS could not load the pretrained torchvision '{net}' trunk weights ({error}). "
                "Put them in $TORCH_HOME/hub/checkpoints (fetched once when online), "
                "or set the perceptual weight to 0."
            ) from error
        self.lpips.eval().requires_grad_(False)
        self.random_trunk = random_trunk

    def train(self, mode: bool = True) -> LPIPSLoss:
        # Stays in eval mode whatever its owner does: its dropout must stay off.
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips(reconstruction.float(), target.float()).mean()


def make_perceptual_loss(weight: float, net: str = "vgg", random_trunk: bool = False) -> LPIPSLoss | None:
    """The LPIPS module when its weight is > 0, else None (so no weights are ever fetched)."""
    return LPIPSLoss(net, random_trunk) if weight > 0 else None


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def gan_active(step: int, disc_start: int) -> bool:
    """Whether the GAN terms count at the 0-based ``step``: from the ``disc_start``-th step on, as in
    LlamaGen, whose vq_train.py passes ``global_step = train_steps + 1`` to its loss."""
    return step + 1 >= disc_start


def adaptive_gan_weight(
    pixel_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
    max_weight: float = 1e4, eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN (Esser et al. 2021) weight ||grad pixel_loss|| / (||grad g_loss|| + eps) at the decoder's last layer.

    Detached and clamped to [0, max_weight]; both losses must still have their graphs.
    """
    pixel_grad = torch.autograd.grad(pixel_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = pixel_grad.float().norm() / (g_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
