"""Training a MAISI-architecture autoencoder (``train_autoencoder.json``) for users without the released weights,
or fine-tuning the released one on their data.

Loss (MAISI's recipe): L1 reconstruction + perceptual (tri-planar VGG, ctsynth) + KL divergence of the
posterior + PatchGAN adversarial (``ctsynth.adversarial.AdversarialTerms``, after a warm-up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.utils import CommonKeys as Keys
from torch import nn

from ctsynth.adversarial import AdversarialTerms
from ctsynth.engine import engine_amp, engine_autocast, optimisation_step, trainable_parameters
from ctsynth.maisi import build_maisi_autoencoder, load_maisi_autoencoder

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


class AutoencoderIteration:
    """One training step (L1 + perceptual + KL + adversarial) or one validation reconstruction.

    Args:
        image_key: batch key of the (B, 1, X, Y, Z) volumes in [0, 1].
        kl_weight / perceptual_weight: loss weights (MAISI: 1e-7 / 0.3).
        perceptual: e.g. ``ctsynth.losses.TriPlanarVGGLoss`` (None: off).
        adversarial: adversarial terms (None: off).
        grad_clip / amp / max_nonfinite: as in the other iterations.
    """

    def __init__(self, image_key: str = "image", kl_weight: float = 1e-7, perceptual: nn.Module | None = None,
                 perceptual_weight: float = 0.3, adversarial: AdversarialTerms | None = None,
                 grad_clip: float | None = 1.0, amp: bool = False, max_nonfinite: int = 3) -> None:
        self.image_key, self.kl_weight = image_key, float(kl_weight)
        self.perceptual, self.perceptual_weight, self.adversarial = perceptual, float(perceptual_weight), adversarial
        self.grad_clip, self.amp, self.max_nonfinite = grad_clip, amp, max_nonfinite

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        x = torch.as_tensor(batch[self.image_key]).to(engine.state.device).float()
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, X, Y, Z) volumes under {self.image_key!r}, got {tuple(x.shape)}")
        if any(s % 4 for s in x.shape[-3:]):
            raise ValueError(f"volume sizes {tuple(x.shape[-3:])} must be multiples of 4 (the autoencoder downsamples "
                             "4x); set the crop size (patch_size) accordingly")
        if not isinstance(engine, Trainer):
            engine.network.eval()
            with torch.no_grad(), engine_autocast(engine, self.amp):
                recon = engine.network(x)[0].float()
            return {Keys.PRED: recon.clamp(0, 1), Keys.LABEL: x}
        engine.network.train()
        with engine_autocast(engine, self.amp):
            recon, mu, sigma = engine.network(x)
        recon = recon.float()
        l1 = F.l1_loss(recon, x)
        kl = kl_divergence(mu.float(), sigma.float())
        loss = l1 + self.kl_weight * kl
        terms = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        if self.perceptual is not None and self.perceptual_weight:
            p = self.perceptual(recon.clamp(0, 1), x)
            loss = loss + self.perceptual_weight * p
            terms["perceptual"] = float(p.detach())
        gan = self.adversarial is not None and self.adversarial.active(engine)
        if gan:
            g, gan_terms = self.adversarial.generator_terms(recon, x)
            loss = loss + g
            terms.update(gan_terms)
        norm = optimisation_step(engine, loss, engine.optimizer, trainable_parameters(engine.network), self.grad_clip,
                                 engine_amp(engine, self.amp)[2], self.max_nonfinite, terms)
        if gan and norm is not None:
            terms["d_loss"] = self.adversarial.discriminator_step(engine, recon.detach(), x)
        return {Keys.PRED: recon.detach(), Keys.LABEL: x, Keys.LOSS: float(loss.detach()), "terms": terms,
                "grad_norm": norm}
