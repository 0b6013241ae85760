"""One training / validation iteration of the cascade (``iteration_update`` of MONAI's engines).

A batch (from the bundle's preprocessing) holds ``xrays`` (B, V, H, W) normalised radiographs,
``geometry`` (B JSON strings) and the stage's target ``image_<size>`` (B, 1, S, S, S) normalised CT with
its affine. The stage's prediction is compared with the target by the engine's ``loss_function``
(:class:`ctsynth.losses.CompositeLoss`), which also gets the affine and geometry for the DRR term.

Optional adversarial training (seed 002): :class:`ctsynth.adversarial.AdversarialTerms` around a PatchGAN
discriminator (MONAI ``PatchDiscriminator``), least-squares GAN loss and feature matching.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import Trainer
from monai.utils import CommonKeys as Keys
from ctsynth.adversarial import AdversarialTerms
from ctsynth.engine import engine_amp, engine_autocast, optimisation_step, trainable_parameters, unwrap
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
        adversarial: adversarial training terms (None: off).
    """

    def __init__(self, stage: int = 1, image_key: str = "image_64", xray_key: str = "xrays",
                 geometry_key: str = "geometry", grad_clip: float | None = 1.0, amp: bool = False,
                 max_nonfinite: int = 3, adversarial: AdversarialTerms | None = None) -> None:
        if int(stage) < 1:
            raise ValueError(f"stage is 1-based, got {stage}")
        self.stage, self.image_key, self.xray_key, self.geometry_key = int(stage), image_key, xray_key, geometry_key
        self.grad_clip, self.amp, self.max_nonfinite = grad_clip, amp, max_nonfinite
        self.adversarial = adversarial

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

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        xrays, target, geoms, affine, aff0 = self._inputs(engine, batch)
        if not isinstance(engine, Trainer):
            engine.network.eval()
            with torch.no_grad(), engine_autocast(engine, self.amp):
                outs = engine.network(xrays, geoms, aff0, up_to_stage=self.stage - 1)
            return {Keys.IMAGE: xrays, Keys.LABEL: target, Keys.PRED: outs[-1].float()}

        engine.network.train()
        scaler = engine_amp(engine, self.amp)[2]
        with engine_autocast(engine, self.amp):
            outs = engine.network(xrays, geoms, aff0, up_to_stage=self.stage - 1)
        pred = outs[-1].float()
        loss = engine.loss_function(pred, target.as_tensor() if hasattr(target, "as_tensor") else target,
                                    affine=affine, geometry=geoms)
        terms = dict(getattr(engine.loss_function, "last_terms", {}))
        gan = self.adversarial is not None and self.adversarial.active(engine)
        if gan:
            g_loss, gan_terms = self.adversarial.generator_terms(pred, target)
            loss = loss + g_loss
            terms.update(gan_terms)
        norm = optimisation_step(engine, loss, engine.optimizer, trainable_parameters(engine.network),
                                 self.grad_clip, scaler, self.max_nonfinite, terms)
        if gan and norm is not None:
            terms["d_loss"] = self.adversarial.discriminator_step(engine, pred.detach(), target)
        return {Keys.IMAGE: xrays, Keys.LABEL: target, Keys.PRED: pred.detach(), Keys.LOSS: float(loss.detach()),
                "terms": terms, "grad_norm": norm}
