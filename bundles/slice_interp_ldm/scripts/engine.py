"""Training and validation iterations (``iteration_update`` of MONAI's engines) of the latent diffusion model.

Training (:class:`DiffusionIteration`): a batch holds ``thin_latent`` and ``cond_latent`` (B, C, x, y, z)
crops from :class:`scripts.latents.LatentPairCache`. Noise is added at random DDPM timesteps and the
denoiser, given the noisy latents concatenated with the conditioning, predicts the scheduler's target
(noise, velocity or the clean latents): MSE. Every ``image_loss_interval`` iterations the predicted clean
latents are also decoded by the frozen autoencoder and compared with the decoded thin latents through
``image_loss`` (tri-planar VGG on 20 % of the slices + MS-SSIM, weights 0.1 / 0.1 in the seed).

Validation (:class:`SamplingValidation`): whole validation volumes are sampled with DDIM from their
conditioning and decoded; the prediction and the thin volume (loaded and normalised once by the cached
validation dataset) go to the evaluator's metrics in [0, 1] (MAISI normalisation, [-1000, 1000] HU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.utils import CommonKeys as Keys
from torch import nn

from ctsynth.diffusion import diffusion_target, predicted_original
from ctsynth.engine import engine_amp, engine_autocast, optimisation_step, trainable_parameters, unwrap
from ctsynth.maisi import LatentCodec

from .sampling import LatentDiffusionSampler, check_prediction_type

__all__ = ["DiffusionIteration", "SamplingValidation"]


class DiffusionIteration:
    """One DDPM training step on latent crops.

    Args:
        scheduler: MONAI ``DDPMScheduler`` (its ``prediction_type`` decides the target).
        scale_factor: latents are multiplied by it (unit variance).
        autoencoder: the frozen autoencoder (needed by ``image_loss``).
        image_loss: loss on decoded (B, 1, X, Y, Z) volumes in [0, 1] (e.g. ``ctsynth.losses.CompositeLoss`` with
            ``vgg`` and ``ms_ssim`` weights); None: latent MSE only.
        image_loss_interval: apply ``image_loss`` every this many iterations.
        grad_clip: gradient-norm clip.
        amp: mixed precision on GPU (bf16 where supported).
        accumulate: gradient accumulation steps per optimiser step.
        max_nonfinite: consecutive NaN/Inf losses tolerated before stopping.
    """

    def __init__(self, scheduler: Any, scale_factor: float = 1.0, autoencoder: nn.Module | None = None,
                 image_loss: nn.Module | None = None, image_loss_interval: int = 10, grad_clip: float | None = 1.0,
                 amp: bool = False, accumulate: int = 1, max_nonfinite: int = 3) -> None:
        if image_loss is not None and autoencoder is None:
            raise ValueError("image_loss decodes the predicted latents: it needs the autoencoder")
        if int(image_loss_interval) < 1 or int(accumulate) < 1:
            raise ValueError(f"image_loss_interval ({image_loss_interval}) and accumulate ({accumulate}) must be >= 1")
        self.scheduler, self.scale_factor = scheduler, float(scale_factor)
        self.autoencoder, self.image_loss, self.image_loss_interval = autoencoder, image_loss, int(image_loss_interval)
        self.grad_clip, self.amp, self.accumulate, self.max_nonfinite = grad_clip, amp, int(accumulate), max_nonfinite

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        z0 = torch.as_tensor(batch["thin_latent"]).to(device).float() * self.scale_factor
        cond = torch.as_tensor(batch["cond_latent"]).to(device).float() * self.scale_factor
        if z0.shape != cond.shape:
            raise ValueError(f"thin latents {tuple(z0.shape)} and conditioning {tuple(cond.shape)} differ in shape")
        check_prediction_type(engine.network, self.scheduler)
        multiple = getattr(unwrap(engine.network), "multiple", 1)
        if any(s % multiple for s in z0.shape[-3:]):
            raise ValueError(f"latent crops {tuple(z0.shape[-3:])} are not divisible by {multiple} (the denoiser's "
                             "downsampling): set crop_depth to a multiple of it, and pad in-plane sizes")
        engine.network.train()
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), device=device).long()
        noisy = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
        with engine_autocast(engine, self.amp):
            out = engine.network(torch.cat([noisy, cond], dim=1), t).float()
        loss = F.mse_loss(out, diffusion_target(self.scheduler, z0, noise, t))
        terms = {"mse": float(loss.detach())}
        if self.image_loss is not None and engine.state.iteration % self.image_loss_interval == 0:
            x0 = predicted_original(self.scheduler, noisy, out, t)
            with engine_autocast(engine, self.amp):
                pred_img = self.autoencoder.decode(x0 / self.scale_factor).float()
            with torch.no_grad():
                true_img = self.autoencoder.decode(z0 / self.scale_factor).float()
            image = self.image_loss(pred_img.clamp(0, 1), true_img.clamp(0, 1))
            terms.update({f"image_{k}": v for k, v in getattr(self.image_loss, "last_terms", {}).items()})
            loss = loss + image
        scaler = engine_amp(engine, self.amp)[2]
        norm = optimisation_step(engine, loss, engine.optimizer, trainable_parameters(engine.network), self.grad_clip,
                                 scaler, self.max_nonfinite, terms, accumulate=self.accumulate)
        return {Keys.LOSS: float(loss.detach()), "terms": terms, "grad_norm": norm}


class SamplingValidation:
    """Samples whole validation volumes and returns them with the thin volume, both in [0, 1].

    Args:
        scheduler: MONAI ``DDIMScheduler`` matching the training schedule.
        codec: the frozen autoencoder's codec (unscaled, as the latent cache's).
        scale_factor: the training latent scale factor.
        num_inference_steps: DDIM steps (fewer than at inference keeps validation quick).
        window / overlap: denoiser windows along latent depth.
        seed: fixed noise, so validation metrics are comparable across epochs.
    """

    def __init__(self, scheduler: Any, codec: LatentCodec, scale_factor: float = 1.0, num_inference_steps: int = 10,
                 window: int | None = 16, overlap: float = 0.25, seed: int = 0) -> None:
        self.scheduler, self.codec, self.scale_factor = scheduler, codec, float(scale_factor)
        self.num_inference_steps, self.window, self.overlap, self.seed = num_inference_steps, window, overlap, seed

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        if isinstance(engine, Trainer):
            raise TypeError("SamplingValidation is for evaluators")
        device = engine.state.device
        cond = torch.as_tensor(batch["cond_latent"]).to(device).float() * self.scale_factor
        sampler = LatentDiffusionSampler(engine.network, self.scheduler, self.num_inference_steps, self.window,
                                         self.overlap, progress=False)
        thin = torch.as_tensor(batch["thin"]).to(device).float()  # (B, 1, X, Y, Z) in [0, 1], cached by the dataset
        g = torch.Generator(device=device).manual_seed(self.seed)
        preds = []
        for i in range(cond.shape[0]):
            z = sampler(cond[i:i + 1], generator=g)
            preds.append(self.codec.decode(z / self.scale_factor * self.codec.scale_factor, thin.shape[-3:]))
        return {Keys.PRED: torch.cat(preds), Keys.LABEL: thin}
