"""Autoencoder training shared by the bundles: PatchGAN generator terms (adversarial + feature matching) and
the discriminator step around MONAI's ``PatchDiscriminator`` and ``PatchAdversarialLoss``
(:class:`AdversarialTerms`), and the reconstruction training step that uses them
(:class:`ReconstructionIteration`: L1 + perceptual + the model's own regulariser + adversarial)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GAN_CRITERIA", "AdversarialTerms", "ReconstructionIteration"]

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


class ReconstructionIteration:
    """One training step of an image autoencoder (``iteration_update`` of MONAI's ``SupervisedTrainer``), or one
    validation reconstruction.

    Loss: L1 or MSE (``pixel_loss``) of reconstruction and input + the model's own regularisation
    (:meth:`regularisation`: KL for a VAE, commitment for a VQ model) + ``perceptual_weight`` x ``perceptual`` +
    the adversarial terms once active. The network returns ``(reconstruction, *extras)``; subclasses turn the
    extras into loss terms and outputs.

    Args:
        image_key: batch key of the (B, 1, X, Y, Z) volumes in [0, 1].
        pixel_loss: ``l1`` (the seeds) or ``mse`` (squared error: what PSNR scores; measured 2.4 dB higher PSNR
            than L1 after 600 steps of the xray2ctpa demo's VQ-GAN, bundles/xray2ctpa_vqgan/docs/README.md).
        perceptual / perceptual_weight: perceptual loss on the reconstruction (None or weight 0: off).
        adversarial: adversarial terms (None: off).
        grad_clip / amp / max_nonfinite: see :func:`ctsynth.engine.optimisation_step` and
            :func:`ctsynth.engine.engine_autocast`.
    """

    def __init__(self, image_key: str = "image", perceptual: nn.Module | None = None, perceptual_weight: float = 1.0,
                 adversarial: AdversarialTerms | None = None, grad_clip: float | None = 1.0, amp: bool = False,
                 max_nonfinite: int = 3, pixel_loss: str = "l1") -> None:
        if pixel_loss not in self.PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {tuple(self.PIXEL_LOSSES)}, got {pixel_loss!r}")
        self.pixel_loss = pixel_loss
        self.image_key, self.perceptual, self.perceptual_weight = image_key, perceptual, float(perceptual_weight)
        self.adversarial, self.grad_clip, self.amp, self.max_nonfinite = adversarial, grad_clip, amp, max_nonfinite

    #: ``pixel_loss`` name -> loss of (reconstruction, input); the name is also the loss term's name
    PIXEL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
    #: whether ``amp`` may run bfloat16 on CPU too (a subclass whose network is safe for it says so; see
    #: :func:`ctsynth.engine.amp_settings`)
    cpu_bf16: bool = False

    def regularisation(self, extras: tuple) -> dict[str, torch.Tensor]:
        """Weighted regularisation terms from the network's extra outputs (name -> scalar tensor)."""
        return {}

    def extra_outputs(self, extras: tuple) -> dict[str, Any]:
        """What else goes into the engine output (e.g. code indices)."""
        return {}

    def _input(self, engine: Any, batch: dict[str, Any]) -> torch.Tensor:
        x = torch.as_tensor(batch[self.image_key]).to(engine.state.device).float()
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, X, Y, Z) volumes under {self.image_key!r}, got {tuple(x.shape)}")
        return x

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        from monai.engines import Trainer
        from monai.utils import CommonKeys as Keys

        from ctsynth.engine import engine_amp, engine_autocast, optimisation_step, trainable_parameters

        x = self._input(engine, batch)
        if not isinstance(engine, Trainer):
            engine.network.eval()
            with torch.no_grad(), engine_autocast(engine, self.amp, self.cpu_bf16):
                recon, *extras = engine.network(x)
            return {Keys.PRED: recon.float().clamp(0, 1), Keys.LABEL: x, **self.extra_outputs(tuple(extras))}
        engine.network.train()
        with engine_autocast(engine, self.amp, self.cpu_bf16):
            recon, *extras = engine.network(x)
        recon = recon.float()
        pixel = self.PIXEL_LOSSES[self.pixel_loss](recon, x)
        loss = pixel
        terms = {self.pixel_loss: float(pixel.detach())}
        for name, value in self.regularisation(tuple(extras)).items():
            loss = loss + value
            terms[name] = float(value.detach())
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
                                 engine_amp(engine, self.amp, self.cpu_bf16)[2], self.max_nonfinite, terms)
        if gan and norm is not None:
            terms["d_loss"] = self.adversarial.discriminator_step(engine, recon.detach(), x)
        return {Keys.PRED: recon.detach(), Keys.LABEL: x, Keys.LOSS: float(loss.detach()), "terms": terms,
                "grad_norm": norm, **self.extra_outputs(tuple(e.detach() for e in extras))}
