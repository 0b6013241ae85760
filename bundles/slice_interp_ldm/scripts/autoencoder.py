"""Training a MAISI-architecture autoencoder (``train_autoencoder.json``) for users without the released weights,
or fine-tuning the released one on their data.

Loss (MAISI's recipe): L1 (or MSE: ``pixel_loss``) reconstruction + perceptual (tri-planar VGG, ctsynth) +
KL divergence of the posterior + PatchGAN adversarial (``ctsynth.adversarial.AdversarialTerms``, after a
warm-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctsynth.adversarial import ReconstructionIteration
from ctsynth.engine import unwrap
from ctsynth.maisi import autoencoder_downsample, build_maisi_autoencoder, load_maisi_autoencoder

__all__ = ["kl_divergence", "trainable_autoencoder", "AutoencoderIteration"]


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


def trainable_autoencoder(autoencoder_args: dict[str, Any] | None = None, init_weights: str | Path | None = None,
                          device: str | torch.device = "cpu") -> nn.Module:
    """A MAISI-architecture autoencoder to train: from scratch, or from ``init_weights`` (fine-tuning)."""
    args = dict(autoencoder_args or {})
    net = load_maisi_autoencoder(init_weights, **args) if init_weights else build_maisi_autoencoder(**args)
    net.config = args
    return net.to(device).train().requires_grad_(True)


class AutoencoderIteration(ReconstructionIteration):
    """One training step (L1 or MSE + perceptual + KL + adversarial) or one validation reconstruction of a
    MAISI-architecture autoencoder (whose forward returns reconstruction, mu, sigma).

    Args:
        image_key: batch key of the (B, 1, X, Y, Z) volumes in [0, 1], sizes multiples of the network's
            compression per axis (:func:`ctsynth.maisi.autoencoder_downsample`).
        kl_weight: weight of the KL term (MAISI: 1e-7); ``perceptual_weight`` defaults to MAISI's 0.3.
        kwargs: see :class:`ctsynth.adversarial.ReconstructionIteration`.
    """

    def __init__(self, image_key: str = "image", kl_weight: float = 1e-7, perceptual_weight: float = 0.3,
                 **kwargs: Any) -> None:
        super().__init__(image_key=image_key, perceptual_weight=perceptual_weight, **kwargs)
        self.kl_weight = float(kl_weight)

    def _input(self, engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        x = super()._input(engine, batch)
        f = autoencoder_downsample(unwrap(engine.network))
        if any(s % f for s in x.shape[-3:]):
            raise ValueError(f"volume sizes {tuple(x.shape[-3:])} must be multiples of {f} (the autoencoder downsamples "
                             f"{f}x); set the crop size (patch_size) accordingly")
        return x

    def regularisation(self, extras: tuple) -> dict[str, torch.Tensor]:
        mu, sigma = extras
        return {"kl": self.kl_weight * kl_divergence(mu.float(), sigma.float())}
