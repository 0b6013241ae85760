"""One training / validation iteration of the cascade (``iteration_update`` of MONAI's engines).

A batch (from the bundle's preprocessing) holds ``xrays`` (B, V, H, W) normalised radiographs,
``geometry`` (B JSON strings) and the stage's target ``image_<size>`` (B, 1, S, S, S) normalised CT with
its affine. The stage's prediction is compared with the target by the engine's ``loss_function``
(:class:`ctsynth.losses.CompositeLoss`), which also gets the affine and geometry for the DRR term.

Optional adversarial training (seed 002): a PatchGAN discriminator (MONAI ``PatchDiscriminator``) with
least-squares GAN loss and feature matching on its intermediate activations.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.utils import CommonKeys as Keys
from torch import nn

from ctsynth.engine import amp_settings, optimisation_step, trainable_parameters, unwrap
from ctsynth.transforms import geometries_from_batch

from .network import rescale_affine

__all__ = ["CascadeIteration"]


class CascadeIteration:
    """Train or validate stage ``stage`` (1-based) of a cascade network.

    Args:
        stage: the stage whose output is trained / validated.
        image_key: batch key of that stage's target volume (e.g. ``image_64``).
        xray_key / geometry_key: batch keys of the radiographs and geometries.
        grad_clip: global gradient-norm clip (training).
        amp: mixed precision on GPU (bf16 where supported); ignored on CPU.
        max_nonfinite: consecutive NaN/Inf losses tolerated (steps skipped) before stopping with an error.
        discriminator: PatchGAN discriminator for adversarial training (None: off).
        d_optimizer: its optimiser.
        adversarial_weight / feature_matching_weight: generator loss weights of the two GAN terms.
    """

    def __init__(self, stage: int = 1, image_key: str = "image_64", xray_key: str = "xrays",
                 geometry_key: str = "geometry", grad_clip: float | None = 1.0, amp: bool = False,
                 max_nonfinite: int = 3, discriminator: nn.Module | None = None,
                 d_optimizer: torch.optim.Optimizer | None = None, adversarial_weight: float = 0.0,
                 feature_matching_weight: float = 0.0) -> None:
        if int(stage) < 1:
            raise ValueError(f"stage is 1-based, got {stage}")
        if discriminator is not None and d_optimizer is None:
            raise ValueError("adversarial training needs d_optimizer for the discriminator")
        self.stage, self.image_key, self.xray_key, self.geometry_key = int(stage), image_key, xray_key, geometry_key
        self.grad_clip, self.amp, self.max_nonfinite = grad_clip, amp, max_nonfinite
        self.discriminator, self.d_optimizer = discriminator, d_optimizer
        self.adversarial_weight, self.feature_matching_weight = float(adversarial_weight), float(feature_matching_weight)
        self._adv_loss = None
        if discriminator is not None:
            from monai.losses import PatchAdversarialLoss

            self._adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def _inputs(self, engine: Any, batch: dict[str, Any]):
        device = engine.state.device
        if self.image_key not in batch:
            raise KeyError(f"batch has no {self.image_key!r} (keys: {sorted(batch)}); the stage's image_key must "
                           "match a size the dataset was prepared with (ctsynth prepare xray2ct --sizes ...)")
        xrays = torch.as_tensor(batch[self.xray_key]).to(device, non_blocking=engine.non_blocking).float()
        target = batch[self.image_key].to(device, non_blocking=engine.non_blocking)
        geoms = geometries_from_batch(batch[self.geometry_key], device)
        affine = torch.as_tensor(target.affine, dtype=torch.float64).to(device)
        if affine.ndim == 2:
            affine = affine.expand(target.shape[0], 4, 4)
        net = unwrap(engine.network)
        s_target, s0 = target.shape[-1], net.sizes[0]
        expected = net.sizes[self.stage - 1] if self.stage <= len(net.sizes) else None
        if s_target != expected:
            raise ValueError(f"{self.image_key} is {s_target}^3 but stage {self.stage} of the network predicts "
                             f"{expected}^3; set image_key/sizes consistently")
        aff0 = rescale_affine(affine, (s_target,) * 3, (s0,) * 3)
        return xrays, target, geoms, affine, aff0

    def _amp(self, engine: Any):
        """(enabled, dtype, scaler), decided once per engine (the scaler keeps state across steps)."""
        if getattr(engine, "ctsynth_amp", None) is None:
            engine.ctsynth_amp = amp_settings(engine.state.device, self.amp)
        return engine.ctsynth_amp

    def _autocast(self, engine: Any):
        enabled, dtype, _ = self._amp(engine)
        return torch.autocast(device_type="cuda", dtype=dtype) if enabled else contextlib.nullcontext()

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        xrays, target, geoms, affine, aff0 = self._inputs(engine, batch)
        if not isinstance(engine, Trainer):
            engine.network.eval()
            with torch.no_grad(), self._autocast(engine):
                outs = engine.network(xrays, geoms, aff0, up_to_stage=self.stage - 1)
            return {Keys.IMAGE: xrays, Keys.LABEL: target, Keys.PRED: outs[-1].float()}

        engine.network.train()
        scaler = self._amp(engine)[2]
        with self._autocast(engine):
            outs = engine.network(xrays, geoms, aff0, up_to_stage=self.stage - 1)
        pred = outs[-1].float()
        loss = engine.loss_function(pred, target.as_tensor() if hasattr(target, "as_tensor") else target,
                                    affine=affine, geometry=geoms)
        terms = dict(getattr(engine.loss_function, "last_terms", {}))
        if self.discriminator is not None:
            loss, gan_terms = self._generator_gan_terms(pred, target, loss)
            terms.update(gan_terms)
        norm = optimisation_step(engine, loss, engine.optimizer, trainable_parameters(engine.network),
                                 self.grad_clip, scaler, self.max_nonfinite, terms)
        if self.discriminator is not None and norm is not None:
            terms["d_loss"] = self._discriminator_step(engine, pred.detach(), target)
        return {Keys.IMAGE: xrays, Keys.LABEL: target, Keys.PRED: pred.detach(), Keys.LOSS: float(loss.detach()),
                "terms": terms, "grad_norm": norm}

    def _generator_gan_terms(self, pred: torch.Tensor, target: torch.Tensor, loss: torch.Tensor):
        d = self.discriminator
        for p in d.parameters():
            p.requires_grad_(False)
        fake_out = d(pred)
        with torch.no_grad():
            real_out = d(torch.as_tensor(target))
        adv = self._adv_loss(fake_out[-1], target_is_real=True, for_discriminator=False)
        fm = sum(F.l1_loss(f, r) for f, r in zip(fake_out[:-1], real_out[:-1])) / max(len(fake_out) - 1, 1)
        for p in d.parameters():
            p.requires_grad_(True)
        total = loss + self.adversarial_weight * adv + self.feature_matching_weight * fm
        return total, {"adv": float(adv.detach()), "feature_matching": float(fm.detach())}

    def _discriminator_step(self, engine: Any, fake: torch.Tensor, target: torch.Tensor) -> float:
        d = self.discriminator
        d.train()
        real = self._adv_loss(d(torch.as_tensor(target))[-1], target_is_real=True, for_discriminator=True)
        fake_l = self._adv_loss(d(fake)[-1], target_is_real=False, for_discriminator=True)
        d_loss = 0.5 * (real + fake_l)
        optimisation_step(engine, d_loss, self.d_optimizer, list(d.parameters()), self.grad_clip, None,
                          self.max_nonfinite)
        return float(d_loss.detach())
