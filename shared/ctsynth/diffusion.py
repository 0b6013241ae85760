"""What every latent diffusion model of ctsynth shares: the training target of each prediction type and the
clean latents a denoiser's output implies (MONAI's DDPM/DDIM schedulers underneath).

A diffusion training uses :func:`diffusion_target` and decodes :func:`predicted_original` for image-space losses;
its checkpoint records the schedule so that the sampler can be rebuilt (the ``config_keys`` of the bundle's
``configs/checkpoints.json``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PREDICTION_TYPES", "diffusion_target", "predicted_original"]

#: what the denoiser predicts: the noise, the velocity (v = sqrt(a) eps - sqrt(1-a) x0) or the clean sample
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(scheduler: Any) -> str:
    kind = scheduler.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")
    return kind


def diffusion_target(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target of ``scheduler.prediction_type`` for latents ``clean`` noised with ``noise`` at
    ``timesteps`` (B,)."""
    kind = _check(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return clean


def predicted_original(scheduler: Any, noisy: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latents the denoiser's ``output`` implies for ``noisy`` at ``timesteps`` (B,)."""
    kind = _check(scheduler)
    a = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, *([1] * (noisy.ndim - 1)))
    if kind == "epsilon":
        return (noisy - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * output
    return output
