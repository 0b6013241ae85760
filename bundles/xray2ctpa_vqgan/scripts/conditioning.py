"""Stage 2 networks: the X-ray encoder and the X-ray-conditioned denoiser over VQ-GAN latents.

:class:`XrayEncoder` turns a chest radiograph (B, 1, H, W) into ``token_grid**2`` tokens of width ``token_dim``
(a 2D CNN, adaptive pooling to the token grid so any detector size works, learned positional embeddings).
:class:`XrayConditionedDenoiser` is MONAI's ``DiffusionModelUNet`` (3D, ``with_conditioning``) whose
cross-attention reads those tokens. For classifier-free guidance it learns a null context: items flagged in
``drop`` (training) or the unconditional half of a guided step (sampling) see the null tokens instead of
the X-ray's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

__all__ = ["XrayEncoder", "XrayConditionedDenoiser"]


def _gn(c: int) -> nn.GroupNorm:
    g = min(8, c)
    while c % g:
        g -= 1
    return nn.GroupNorm(g, c)


class XrayEncoder(nn.Module):
    """2D CNN radiograph encoder -> cross-attention tokens.

    Args:
        in_channels: radiograph channels (1).
        channels: widths of the stride-2 stages.
        token_dim: width of each token (the denoiser's ``cross_attention_dim``).
        token_grid: tokens per side (``token_grid**2`` tokens).

    Shapes:
        forward(x (B, C, H, W)) -> (B, token_grid**2, token_dim).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256), token_dim: int = 256,
                 token_grid: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), _gn(c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), _gn(c), nn.SiLU()]
            c_prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(token_grid)
        self.proj = nn.Conv2d(c_prev, token_dim, 1)
        self.position = nn.Parameter(torch.randn(1, token_grid * token_grid, token_dim) * 0.02)
        self.norm = nn.LayerNorm(token_dim)
        self.in_channels, self.token_grid = in_channels, token_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) radiographs, got {tuple(x.shape)}")
        tokens = self.proj(self.pool(self.features(x))).flatten(2).transpose(1, 2)
        return self.norm(tokens + self.position)


class XrayConditionedDenoiser(nn.Module):
    """Denoiser of VQ-GAN latents conditioned on a radiograph through cross-attention, with a learned null
    context for classifier-free guidance.

    Args:
        latent_channels: channels of the VQ-GAN latents (its ``embedding_dim``).
        xray_channels / token_dim / token_grid: the :class:`XrayEncoder`.
        lora: ``{"rank", "alpha", "targets"}`` of a LoRA fine-tuned model (see :mod:`scripts.lora`); None: plain.
        unet_args: ``DiffusionModelUNet`` arguments (``channels``, ``attention_levels`` (at least one True: the
            X-ray enters there), ``num_res_blocks``, ``num_head_channels``, ``norm_num_groups``, ...).

    Shapes:
        forward(x (B, C, x, y, z), timesteps (B,), xray (B, 1, H, W) or context (B, N, D), drop (B,) bool)
        -> (B, C, x, y, z).
    """

    def __init__(self, latent_channels: int = 64, xray_channels: Sequence[int] = (32, 64, 128, 256),
                 token_dim: int = 256, token_grid: int = 8, lora: dict[str, Any] | None = None, **unet_args: Any) -> None:
        super().__init__()
        for k in ("spatial_dims", "in_channels", "out_channels", "with_conditioning", "cross_attention_dim"):
            if k in unet_args:
                raise ValueError(f"{k} is fixed by this denoiser (latent_channels={latent_channels}, "
                                 f"token_dim={token_dim}); do not set it")
        levels = unet_args.get("attention_levels", (False, False, True, True))
        if not any(levels):
            raise ValueError(f"attention_levels {list(levels)} has no True level: the X-ray tokens enter through "
                             "cross-attention, so at least one level needs attention")
        self.xray_encoder = XrayEncoder(1, xray_channels, token_dim, token_grid)
        self.null_context = nn.Parameter(torch.zeros(1, token_grid * token_grid, token_dim))
        self.unet = DiffusionModelUNet(spatial_dims=3, in_channels=latent_channels, out_channels=latent_channels,
                                       with_conditioning=True, cross_attention_dim=token_dim, **unet_args)
        self.config = {"latent_channels": latent_channels, "xray_channels": [int(c) for c in xray_channels],
                       "token_dim": token_dim, "token_grid": token_grid, **unet_args}
        self.multiple = 2 ** (len(unet_args.get("channels", (32, 64, 64, 64))) - 1)
        self.latent_channels = latent_channels
        if lora:  # rebuilt from a LoRA fine-tuned checkpoint: the same adapted layers
            from .lora import add_lora

            add_lora(self, **lora)
            self.config["lora"] = dict(lora)

    def context(self, xray: torch.Tensor | None, batch: int | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of ``xray`` (B, 1, H, W); the null context where ``drop`` (B,) is True or for every item when
        ``xray`` is None (then ``batch`` items)."""
        if xray is None:
            if batch is None:
                raise ValueError("give the radiographs or the batch size of the unconditional context")
            return self.null_context.expand(batch, -1, -1)
        tokens = self.xray_encoder(xray)
        if drop is not None:
            tokens = torch.where(drop.view(-1, 1, 1).to(tokens.device), self.null_context.to(tokens.dtype), tokens)
        return tokens

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, xray: torch.Tensor | None = None,
                context: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, x, y, z) latents, got {tuple(x.shape)}")
        if any(s % self.multiple for s in x.shape[-3:]):
            raise ValueError(f"latent sizes {tuple(x.shape[-3:])} must be divisible by {self.multiple} (the "
                             "denoiser's downsampling); pad the latents")
        if context is None:
            context = self.context(xray, x.shape[0], drop)
        return self.unet(x, timesteps, context=context)
