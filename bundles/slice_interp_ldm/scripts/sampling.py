"""The denoiser and DDIM sampling over whole volumes.

:class:`Denoiser` is MONAI's ``DiffusionModelUNet`` for latent conditioning by concatenation (in channels =
2 x latent channels) that records its arguments, so checkpoints can rebuild it; with ``residual`` its output
is added to the conditioning latents (clean-latent prediction as a change to the conditioning).
:class:`LatentDiffusionSampler` runs DDIM from noise to latents of any depth: at every step the denoiser is
applied in overlapping windows along depth (MONAI sliding-window inference, Gaussian blending), so memory is
that of one window whatever the volume's length.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn
from tqdm.auto import tqdm


from ctsynth.engine import unwrap
from ctsynth.transforms import pad_to_multiple

__all__ = ["Denoiser", "LatentDiffusionSampler", "check_prediction_type"]

logger = logging.getLogger(__name__)


class Denoiser(DiffusionModelUNet):
    """MONAI ``DiffusionModelUNet`` (3D) taking noisy latents concatenated with conditioning latents
    (in channels = 2 x ``latent_channels``), with ``config`` (its arguments, recorded in checkpoints so they can
    rebuild it) and ``multiple`` (spatial sizes must be divisible by it).

    Args:
        latent_channels: channels of the autoencoder's latents.
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention``, whose memory
            grows with the number of tokens rather than with its square (the same weights either way).
        residual: return the UNet's output plus the conditioning latents (the second half of the input
            channels). For clean-latent prediction (``prediction_type="sample"``) with conditioning on the thin
            latent grid: MONAI's UNet zero-initialises its output layer, so an untrained residual denoiser
            predicts the conditioning itself and training learns only what the thick series lacks.
        unet_args: ``DiffusionModelUNet`` arguments (``channels``, ``attention_levels``, ``num_res_blocks``,
            ``num_head_channels``, ``norm_num_groups``, ...).

    Shapes:
        forward(x (B, 2C, x, y, z), timesteps (B,)) -> (B, C, x, y, z).
    """

    def __init__(self, latent_channels: int = 4, use_flash_attention: bool = True, residual: bool = False,
                 **unet_args: Any) -> None:
        for k in ("spatial_dims", "in_channels", "out_channels"):
            if k in unet_args:
                raise ValueError(f"{k} is fixed by latent_channels ({latent_channels}); do not set it")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be true or false, got {residual!r}")
        super().__init__(spatial_dims=3, in_channels=2 * latent_channels, out_channels=latent_channels,
                         use_flash_attention=use_flash_attention, **unet_args)
        self.latent_channels, self.residual = int(latent_channels), residual
        self.config = {"latent_channels": latent_channels, "use_flash_attention": use_flash_attention,
                       "residual": residual, **unet_args}
        self.multiple = 2 ** (len(unet_args.get("channels", (32, 64, 64, 64))) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, timesteps, *args, **kwargs)
        return out + x[:, self.latent_channels:] if self.residual else out


def check_prediction_type(network: nn.Module, scheduler: Any) -> None:
    """Raises ValueError when a residual :class:`Denoiser` is paired with a scheduler that does not predict clean
    latents (a change to the conditioning is meaningless as noise or velocity)."""
    prediction = getattr(scheduler, "prediction_type", None)
    if getattr(unwrap(network), "residual", False) and prediction != "sample":
        raise ValueError(f"a residual denoiser predicts clean latents as a change to the conditioning: use "
                         f"prediction_type 'sample' (the scheduler's is '{prediction}') or residual false")


class LatentDiffusionSampler:
    """DDIM sampling of latents given conditioning latents of the same size.

    Args:
        network: the denoiser (input: noisy and conditioning latents concatenated on channels).
        scheduler: MONAI ``DDIMScheduler`` with the training schedule and prediction type.
        num_inference_steps: DDIM steps.
        window: latent depth of the denoiser's windows (None: the whole depth at once).
        overlap: fraction of a window shared with its neighbour.
        eta: DDIM stochasticity (0: deterministic given the initial noise).
        multiple: spatial sizes are padded (replicate) to multiples of it; default the network's ``multiple``.
        progress: show a progress bar over the steps.
    """

    def __init__(self, network: nn.Module, scheduler: Any, num_inference_steps: int = 50, window: int | None = 16,
                 overlap: float = 0.25, eta: float = 0.0, multiple: int | None = None, progress: bool = True) -> None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")
        self.network, self.scheduler = network, scheduler
        self.num_inference_steps, self.window, self.overlap, self.eta = int(num_inference_steps), window, overlap, eta
        self.multiple = int(multiple or getattr(unwrap(network), "multiple", 8))
        if window is not None and (window < 1 or window % self.multiple):
            raise ValueError(f"window ({window}) must be a positive multiple of {self.multiple} (the denoiser's "
                             "downsampling)")
        check_prediction_type(network, scheduler)
        self.progress = progress

    def _denoise(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        from ctsynth.inferers import gaussian_blend_weights

        inp = torch.cat([x, cond], dim=1)

        def predictor(w: torch.Tensor) -> torch.Tensor:
            return self.network(w, torch.full((w.shape[0],), int(t), device=w.device, dtype=torch.long))

        if self.window is None or inp.shape[-1] <= self.window:
            return predictor(inp)
        roi = (inp.shape[-3], inp.shape[-2], self.window)
        return sliding_window_inference(inp, roi_size=roi, sw_batch_size=1, predictor=predictor, overlap=self.overlap,
                                        mode="gaussian", padding_mode="replicate", progress=False,
                                        roi_weight_map=gaussian_blend_weights(roi))

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, x, y, z) conditioning latents (scaled) -> (B, C, x, y, z) sampled latents (scaled)."""
        if cond.ndim != 5:
            raise ValueError(f"expected (B, C, x, y, z) conditioning latents, got {tuple(cond.shape)}")
        size = cond.shape[-3:]
        c = pad_to_multiple(cond.float(), self.multiple)
        if noise is None:
            noise = torch.randn(c.shape, generator=generator, device="cpu" if generator is None else generator.device)
        x = pad_to_multiple(noise.to(c), self.multiple) if noise.shape != c.shape else noise.to(c)
        self.network.eval()
        self.scheduler.set_timesteps(self.num_inference_steps, device=c.device)
        steps = self.scheduler.timesteps
        for t in tqdm(steps, desc="DDIM", unit="step", disable=not self.progress, leave=False):
            out = self._denoise(x, c, t)
            x, _ = self.scheduler.step(out, t, x, eta=self.eta, generator=generator)
        return x[..., :size[0], :size[1], :size[2]]
