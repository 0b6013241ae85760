"""PatchGAN adversarial training shared by the bundles: generator terms (adversarial + feature matching)
and the discriminator step, around MONAI's ``PatchDiscriminator`` and ``PatchAdversarialLoss``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GAN_CRITERIA", "AdversarialTerms"]

GAN_CRITERIA = ("least_squares", "hinge", "bce")


class AdversarialTerms:
    """Adversarial training with a (multi-output) PatchGAN discriminator.

    The discriminator returns its intermediate activations followed by the logits map (MONAI
    ``PatchDiscriminator``). Generator terms: ``adversarial_weight`` x the GAN loss of the fake as real, plus
    ``feature_matching_weight`` x the mean L1 distance of intermediate activations of fake and real.
    Neither term is added before iteration ``start`` (warm-up on the reconstruction losses alone).

    Args:
        discriminator: e.g. ``monai.networks.nets.PatchDiscriminator``.
        optimizer: its optimiser.
        criterion: one of :data:`GAN_CRITERIA`.
        adversarial_weight / feature_matching_weight: generator loss weights.
        start: first trainer iteration (1-based) with adversarial terms and discriminator steps.
        grad_clip: discriminator gradient-norm clip.
    """

    def __init__(self, discriminator: nn.Module, optimizer: torch.optim.Optimizer, criterion: str = "least_squares",
                 adversarial_weight: float = 0.1, feature_matching_weight: float = 0.0, start: int = 0,
                 grad_clip: float | None = 1.0) -> None:
        from monai.losses import PatchAdversarialLoss

        if criterion not in GAN_CRITERIA:
            raise ValueError(f"criterion must be one of {GAN_CRITERIA}, got {criterion!r}")
        self.discriminator, self.optimizer = discriminator, optimizer
        self.adversarial_weight, self.feature_matching_weight = float(adversarial_weight), float(feature_matching_weight)
        self.start, self.grad_clip = int(start), grad_clip
        self.loss = PatchAdversarialLoss(criterion=criterion)

    def active(self, engine: Any) -> bool:
        """Whether the adversarial terms are on at the engine's current iteration."""
        return engine.state.iteration >= self.start

    def generator_terms(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted generator loss (to add to the reconstruction loss) and its terms for logging."""
        d = self.discriminator
        d.requires_grad_(False)
        try:
            fake_out = d(fake)
            with torch.no_grad():
                real_out = d(torch.as_tensor(real))
        finally:
            d.requires_grad_(True)
        adv = self.loss(fake_out[-1], target_is_real=True, for_discriminator=False)
        pairs = list(zip(fake_out[:-1], real_out[:-1]))
        fm = sum(F.l1_loss(f, r) for f, r in pairs) / max(len(pairs), 1) if pairs else adv.new_zeros(())
        total = self.adversarial_weight * adv + self.feature_matching_weight * fm
        return total, {"adv": float(adv.detach()), "feature_matching": float(fm.detach())}

    def discriminator_step(self, engine: Any, fake: torch.Tensor, real: torch.Tensor) -> float:
        """One discriminator update on detached ``fake`` and ``real``; returns its loss."""
        from ctsynth.engine import optimisation_step

        d = self.discriminator
        d.train()
        real_l = self.loss(d(torch.as_tensor(real))[-1], target_is_real=True, for_discriminator=True)
        fake_l = self.loss(d(fake.detach())[-1], target_is_real=False, for_discriminator=True)
        d_loss = 0.5 * (real_l + fake_l)
        optimisation_step(engine, d_loss, self.optimizer, list(d.parameters()), self.grad_clip, None)
        return float(d_loss.detach())
