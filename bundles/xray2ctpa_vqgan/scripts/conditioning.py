"""Stage 2 networks: the X-ray encoder and the X-ray-conditioned denoiser over VQ-GAN latents.

:class:`XrayEncoder` turns a chest radiograph (B, 1, H, W) into a feature map and ``token_grid**2`` tokens of
width ``token_dim`` (a 2D CNN, adaptive pooling to the token grid so any detector size works, learned
positional embeddings). :class:`XrayConditionedDenoiser` is MONAI's ``DiffusionModelUNet`` (3D) conditioned on
the radiograph in one of :data:`CONDITIONING_MODES`:

* ``aligned``: :class:`RayFeatures` gives every latent voxel the radiograph's features where its own ray
  meets the detector (the acquisition is that of :func:`ctsynth.geometry.radiograph_geometry` on the
  generation grid: an AP view whose detector covers the field of view, as ``ctsynth prepare ctpa`` renders
  its DRRs); these feature volumes are concatenated to the noisy latents;
* ``tokens``: cross-attention reads the tokens (no spatial correspondence is given; the network must learn it);
* ``aligned+tokens``: both.

For classifier-free guidance the denoiser learns a null condition (null tokens, a null feature per channel):
items flagged in ``drop`` (training) or the unconditional half of a guided step (sampling) see it instead of
the X-ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from ctsynth.geometry import detector_sampling_grid, radiograph_geometry, volume_extent_mm
from ctsynth.phantoms import grid_affine

__all__ = ["CONDITIONING_MODES", "xray_ray_grid", "RayFeatures", "XrayEncoder", "XrayConditionedDenoiser"]

#: how the radiograph reaches the denoiser
CONDITIONING_MODES = ("aligned", "tokens", "aligned+tokens")


def _gn(c: int) -> nn.GroupNorm:
    g = min(8, c)
    while c % g:
        g -= 1
    return nn.GroupNorm(g, c)


def _stride2_stages(in_channels: int, channels: Sequence[int]) -> list[nn.Module]:
    """(stride-2 conv, GroupNorm, SiLU, conv, GroupNorm, SiLU) per width: the radiograph CNNs' layers."""
    layers: list[nn.Module] = []
    c_prev = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_prev, c, 3, stride=2, padding=1), _gn(c), nn.SiLU(),
                   nn.Conv2d(c, c, 3, padding=1), _gn(c), nn.SiLU()]
        c_prev = c
    return layers


def xray_ray_grid(grid: dict[str, Any], downsample: int, xray_size: int) -> dict[str, Any]:
    """The :class:`RayFeatures` settings of a generation grid (``scripts.diffusion.training_grid``'s
    ``volume_shape`` / ``spacing_mm``), the VQ-GAN's ``downsample`` and the radiographs' ``xray_size``: plain
    values, recorded with the denoiser's arguments in its checkpoints."""
    return {"volume_shape": [int(s) for s in grid["volume_shape"]], "spacing_mm": [float(s) for s in grid["spacing_mm"]],
            "downsample": int(downsample), "xray_size": int(xray_size)}


class RayFeatures(nn.Module):
    """Samples a radiograph's feature map where each latent voxel's ray meets the detector.

    The generation grid (``volume_shape`` voxels of ``spacing_mm``, centred on the origin) is seen by one AP view
    whose square detector of ``xray_size`` pixels covers ``margin`` times the larger of its left-right and
    superior-inferior extents (:func:`ctsynth.geometry.radiograph_geometry`). Latent voxel ``j`` along an axis
    covers volume voxels ``j*downsample ... (j+1)*downsample - 1``, so its centre is volume voxel
    ``j*downsample + (downsample - 1) / 2``; it takes the feature map's bilinear sample at that centre's
    projection (zero off the detector). A larger (or smaller) grid of the same voxels, e.g. full-resolution
    generation in windows, gives ``volume_shape`` to :meth:`forward`: its own field of view then places the
    detector. The sampling coordinates depend only on the grid and latent shapes and are computed once per shapes
    and device.

    Args:
        volume_shape: (X, Y, Z) voxels of the generation grid.
        spacing_mm: (3,) voxel size.
        downsample: volume voxels per latent voxel along each axis.
        xray_size: detector pixels per side (the radiographs are resized to it).
        margin: detector side / larger in-plane extent.

    Shapes:
        forward(features (B, C, h, w) covering the detector, latent_shape (x, y, z), volume_shape (X, Y, Z) or None)
        -> (B, C, x, y, z).
    """

    def __init__(self, volume_shape: Sequence[int], spacing_mm: Sequence[float], downsample: int, xray_size: int,
                 margin: float = 1.3) -> None:
        super().__init__()
        if len(volume_shape) != 3 or len(spacing_mm) != 3 or int(downsample) < 1:
            raise ValueError(f"need 3 sizes, 3 spacings and a downsample >= 1; got {list(volume_shape)}, "
                             f"{list(spacing_mm)}, {downsample}")
        self.volume_shape = [int(s) for s in volume_shape]
        self.spacing_mm = [float(s) for s in spacing_mm]
        self.downsample = int(downsample)
        self.xray_size, self.margin = int(xray_size), float(margin)
        self.config = {"volume_shape": self.volume_shape, "spacing_mm": self.spacing_mm, "downsample": self.downsample,
                       "xray_size": self.xray_size, "margin": self.margin}
        self.geometry, self.latent_affine = self.placement(self.volume_shape)
        self._grids: dict[tuple, torch.Tensor] = {}

    def placement(self, volume_shape: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """(radiograph geometry, latent voxel -> RAS mm affine) of a grid of ``volume_shape`` voxels of
        :attr:`spacing_mm` centred on the origin."""
        shape = [int(s) for s in volume_shape]
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"volume_shape must be 3 positive sizes, got {list(volume_shape)}")
        volume_affine = grid_affine(shape, self.spacing_mm)
        geometry = radiograph_geometry(volume_extent_mm(volume_affine, shape), self.xray_size, margin=self.margin)
        # latent voxel j's centre is volume voxel j * f + (f - 1) / 2
        f = float(self.downsample)
        latent_affine = volume_affine.clone()
        latent_affine[:3, :3] = volume_affine[:3, :3] * f
        latent_affine[:3, 3] = volume_affine[:3, 3] + volume_affine[:3, :3] @ torch.full((3,), (f - 1) / 2,
                                                                                        dtype=torch.float64)
        return geometry, latent_affine

    def sampling_grid(self, latent_shape: Sequence[int], device: torch.device | str = "cpu",
                      volume_shape: Sequence[int] | None = None) -> torch.Tensor:
        """(1, x*y, z, 2) ``grid_sample`` coordinates of the latent voxels' projections for a grid of
        ``volume_shape`` (default: the configured one); cached."""
        shape = tuple(int(s) for s in latent_shape)
        volume = tuple(self.volume_shape if volume_shape is None else (int(s) for s in volume_shape))
        key = (shape, volume, str(device))
        if key not in self._grids:
            geometry, latent_affine = ((self.geometry, self.latent_affine) if list(volume) == self.volume_shape
                                       else self.placement(volume))
            grid = detector_sampling_grid(geometry, latent_affine, shape)[0]  # x, y, z, 2
            self._grids[key] = grid.reshape(1, shape[0] * shape[1], shape[2], 2).to(device)
        return self._grids[key]

    def forward(self, features: torch.Tensor, latent_shape: Sequence[int],
                volume_shape: Sequence[int] | None = None) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(f"expected (B, C, h, w) feature maps, got {tuple(features.shape)}")
        b, c = features.shape[:2]
        x, y, z = (int(s) for s in latent_shape)
        grid = self.sampling_grid((x, y, z), features.device, volume_shape).to(features.dtype).expand(b, -1, -1, -1)
        out = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.reshape(b, c, x, y, z)


class XrayEncoder(nn.Module):
    """2D CNN radiograph encoder -> cross-attention tokens.

    Args:
        in_channels: radiograph channels (1).
        channels: widths of the stride-2 stages.
        token_dim: width of each token (the denoiser's ``cross_attention_dim``).
        token_grid: tokens per side (``token_grid**2`` tokens).

    Shapes:
        forward(x (B, C, H, W)) -> (B, token_grid**2, token_dim); feature_map(x) -> (B, channels[-1],
        H / 2**len(channels), W / 2**len(channels)).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256), token_dim: int = 256,
                 token_grid: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(*_stride2_stages(in_channels, channels))
        self.pool = nn.AdaptiveAvgPool2d(token_grid)
        self.proj = nn.Conv2d(channels[-1] if channels else in_channels, token_dim, 1)
        self.position = nn.Parameter(torch.randn(1, token_grid * token_grid, token_dim) * 0.02)
        self.norm = nn.LayerNorm(token_dim)
        self.in_channels, self.token_grid = in_channels, token_grid

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The CNN's last feature map of radiographs (B, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) radiographs, got {tuple(x.shape)}")
        return self.features(x)

    def tokens(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Tokens of a :meth:`feature_map`."""
        tokens = self.proj(self.pool(feature_map)).flatten(2).transpose(1, 2)
        return self.norm(tokens + self.position)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.feature_map(x))


class XrayConditionedDenoiser(nn.Module):
    """Denoiser of VQ-GAN latents conditioned on a radiograph (:data:`CONDITIONING_MODES`), with a learned
    null condition for classifier-free guidance.

    Args:
        latent_channels: channels of the VQ-GAN latents (its ``embedding_dim``).
        xray_channels / token_dim / token_grid: the :class:`XrayEncoder` of the ``tokens`` modes.
        conditioning: one of :data:`CONDITIONING_MODES`.
        ray_grid: the :class:`RayFeatures` arguments (:func:`xray_ray_grid`); needed by the ``aligned`` modes.
        ray_channels: widths of the stride-2 stages of the radiograph CNN whose map the ``aligned`` modes sample
            (its pixels should be about a latent voxel's projection).
        aligned_channels: feature channels each latent voxel receives in the ``aligned`` modes.
        lora: ``{"rank", "alpha", "targets"}`` of a LoRA fine-tuned model (see :mod:`scripts.lora`); None: plain.
        unet_args: ``DiffusionModelUNet`` arguments (``channels``, ``attention_levels`` (with tokens, at least one
            True: they enter there), ``num_res_blocks``, ``num_head_channels``, ``norm_num_groups``, ...).

    Shapes:
        forward(x (B, C, x, y, z), timesteps (B,), xray (B, 1, H, W) or condition (from :meth:`condition`),
        drop (B,) bool) -> (B, C, x, y, z).

    Example::

        net = XrayConditionedDenoiser(8, conditioning="aligned", ray_grid=xray_ray_grid(grid, 4, 64), ...)
        eps = net(noisy_latents, t, xray=radiographs)
    """

    def __init__(self, latent_channels: int = 64, xray_channels: Sequence[int] = (32, 64, 128, 256),
                 token_dim: int = 256, token_grid: int = 8, conditioning: str = "tokens",
                 ray_grid: dict[str, Any] | None = None, ray_channels: Sequence[int] = (32, 32),
                 aligned_channels: int = 16, lora: dict[str, Any] | None = None, **unet_args: Any) -> None:
        super().__init__()
        for k in ("spatial_dims", "in_channels", "out_channels", "with_conditioning", "cross_attention_dim"):
            if k in unet_args:
                raise ValueError(f"{k} is fixed by this denoiser (latent_channels={latent_channels}, "
                                 f"token_dim={token_dim}, conditioning={conditioning!r}); do not set it")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        self.uses_tokens, self.uses_rays = "tokens" in conditioning, "aligned" in conditioning
        levels = unet_args.get("attention_levels", (False, False, True, True))
        if self.uses_tokens and not any(levels):
            raise ValueError(f"attention_levels {list(levels)} has no True level: the X-ray tokens enter through "
                             "cross-attention, so at least one level needs attention (or use conditioning='aligned')")
        if self.uses_rays and not ray_grid:
            raise ValueError(f"conditioning={conditioning!r} samples the radiograph along each latent voxel's ray: give "
                             "ray_grid (scripts.conditioning.xray_ray_grid of the generation grid)")
        extra = 0
        if self.uses_tokens:
            self.xray_encoder = XrayEncoder(1, xray_channels, token_dim, token_grid)
            self.null_context = nn.Parameter(torch.zeros(1, token_grid * token_grid, token_dim))
        if self.uses_rays:
            self.rays = RayFeatures(**dict(ray_grid))
            self.ray_encoder = nn.Sequential(*_stride2_stages(1, ray_channels),
                                             nn.Conv2d(ray_channels[-1] if ray_channels else 1, int(aligned_channels), 1))
            self.null_features = nn.Parameter(torch.zeros(1, int(aligned_channels), 1, 1, 1))
            extra = int(aligned_channels)
        self.unet = DiffusionModelUNet(spatial_dims=3, in_channels=latent_channels + extra, out_channels=latent_channels,
                                       with_conditioning=self.uses_tokens,
                                       cross_attention_dim=token_dim if self.uses_tokens else None, **unet_args)
        self.config = {"latent_channels": latent_channels, "xray_channels": [int(c) for c in xray_channels],
                       "token_dim": token_dim, "token_grid": token_grid, "conditioning": conditioning,
                       **({"ray_grid": dict(self.rays.config),
                           "ray_channels": [int(c) for c in ray_channels], "aligned_channels": int(aligned_channels)}
                          if self.uses_rays else {}), **unet_args}
        self.multiple = 2 ** (len(unet_args.get("channels", (32, 64, 64, 64))) - 1)
        self.latent_channels, self.conditioning = latent_channels, conditioning
        if lora:  # rebuilt from a LoRA fine-tuned checkpoint: the same adapted layers
            from .lora import add_lora

            add_lora(self, **lora)
            self.config["lora"] = dict(lora)

    def condition(self, xray: torch.Tensor | None, latent_shape: Sequence[int], batch: int | None = None,
                  drop: torch.Tensor | None = None, volume_shape: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """What the U-Net is given of ``xray`` (B, 1, H, W) for latents of ``latent_shape`` (x, y, z):
        ``tokens`` (B, N, D) and/or ``features`` (B, A, x, y, z); the null condition where ``drop`` (B,) is True,
        or for every item when ``xray`` is None (then ``batch`` items). ``volume_shape``: the grid the latents
        belong to when it is not the training grid (the rays are placed by its field of view). Conditions
        concatenate along the batch (:meth:`cat_conditions`) and crop to windows (:meth:`window_condition`)."""
        if xray is None and batch is None:
            raise ValueError("give the radiographs or the batch size of the unconditional condition")
        out: dict[str, torch.Tensor] = {}
        mask = None if drop is None else drop.view(-1, 1, 1)
        if self.uses_tokens:
            if xray is None:
                out["tokens"] = self.null_context.expand(batch, -1, -1)
            else:
                tokens = self.xray_encoder(xray)
                out["tokens"] = tokens if mask is None else torch.where(
                    mask.to(tokens.device), self.null_context.to(tokens.dtype), tokens)
        if self.uses_rays:
            shape = [int(s) for s in latent_shape]
            if xray is None:
                out["features"] = self.null_features.expand(batch, -1, *shape)
            else:
                if xray.ndim != 4 or xray.shape[1] != 1:
                    raise ValueError(f"expected (B, 1, H, W) radiographs, got {tuple(xray.shape)}")
                feats = self.rays(self.ray_encoder(xray), shape, volume_shape)
                out["features"] = feats if mask is None else torch.where(
                    mask.view(-1, 1, 1, 1, 1).to(feats.device), self.null_features.to(feats.dtype), feats)
        return out

    @staticmethod
    def cat_conditions(*conditions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Conditions of several batches as one (concatenated along the batch)."""
        return {k: torch.cat([c[k] for c in conditions]) for k in conditions[0]}

    @staticmethod
    def window_condition(condition: dict[str, torch.Tensor], window: Sequence[slice]) -> dict[str, torch.Tensor]:
        """The condition of the latent ``window`` (3 slices) of a grid: its voxels' ray features (each keeps the
        features of its own ray) and the unchanged tokens."""
        out = dict(condition)
        if "features" in out:
            out["features"] = out["features"][(Ellipsis, *window)]
        return out

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, xray: torch.Tensor | None = None,
                condition: dict[str, torch.Tensor] | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, x, y, z) latents, got {tuple(x.shape)}")
        if any(s % self.multiple for s in x.shape[-3:]):
            raise ValueError(f"latent sizes {tuple(x.shape[-3:])} must be divisible by {self.multiple} (the "
                             "denoiser's downsampling); pad the latents")
        if condition is None:
            condition = self.condition(xray, x.shape[-3:], x.shape[0], drop)
        if "features" in condition:
            x = torch.cat([x, condition["features"].to(x.dtype)], dim=1)
        return self.unet(x, timesteps, context=condition.get("tokens"))
