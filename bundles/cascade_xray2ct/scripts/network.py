"""Progressive X-ray -> CT cascade: 64^3 -> 128^3 -> 256^3.

* :class:`XrayEncoder`: one 2D CNN shared by all views and stages; features at full, 1/2 and 1/4 of the
  radiograph's resolution (512^2, 256^2, 128^2 for 512^2 inputs).
* :func:`backproject_features`: every voxel of a stage's grid receives, from each view, the features at its
  projection through that view's acquisition geometry (bilinear sampling); views are fused by mean and max,
  so any number of views works. This is the tractable form of "each stage sees X-ray features at its own
  scale" (cross-attention from 256^3 voxels to 512^2 tokens is not).
* :class:`CascadeStage`: 3D conv stem over the back-projected features (and the upsampled previous stage),
  patch tokens, transformer blocks (self-attention + cross-attention to pooled X-ray tokens carrying a view
  angle embedding), a decoder back to the grid; later stages predict a residual on the upsampled previous
  output, stage 3 adds a high-frequency detail branch and gradient checkpointing.
* :class:`ProgressiveCascade`: the stages together, with freezing of earlier stages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from ctsynth.engine import load_network_weights
from ctsynth.geometry import ProjectionGeometry, backproject_features

__all__ = ["XrayEncoder", "backproject_features", "rescale_affine", "patch_embedding", "patch_unembedding",
           "CascadeStage", "ProgressiveCascade", "FixedGeometryCascade",
           "BackprojectionUNet", "prepare_stage"]


def _conv2d_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


def _conv3d_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, 1, 1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                         nn.Conv3d(cout, cout, 3, 1, 1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class XrayEncoder(nn.Module):
    """Shared multi-scale radiograph encoder.

    Args:
        channels: feature channels at full, 1/2 and 1/4 resolution.

    Shapes:
        input: (B, V, H, W) radiographs (normalised line integrals).
        output: three tensors (B, V, C_l, H / 2^l, W / 2^l), l = 0, 1, 2.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"XrayEncoder needs 3 channel counts (full, 1/2, 1/4), got {channels}")
        c0, c1, c2 = channels
        self.channels = tuple(channels)
        self.level0 = _conv2d_block(1, c0)
        self.level1 = _conv2d_block(c0, c1, stride=2)
        self.level2 = _conv2d_block(c1, c2, stride=2)

    def forward(self, xrays: torch.Tensor) -> list[torch.Tensor]:
        if xrays.ndim != 4:
            raise ValueError(f"radiographs must be (B, V, H, W), got {tuple(xrays.shape)}")
        b, v, h, w = xrays.shape
        x = xrays.reshape(b * v, 1, h, w)
        f0 = self.level0(x)
        f1 = self.level1(f0)
        f2 = self.level2(f1)
        return [f.reshape(b, v, *f.shape[1:]) for f in (f0, f1, f2)]


def _per_item(xrays: torch.Tensor, geometries, affine) -> tuple[list[ProjectionGeometry], torch.Tensor]:
    """One geometry and one (4, 4) float64 affine per batch item, from shared or per-item values."""
    if isinstance(geometries, ProjectionGeometry):
        geometries = [geometries] * xrays.shape[0]
    affine = torch.as_tensor(affine, dtype=torch.float64, device=xrays.device)
    if affine.ndim == 2:
        affine = affine.expand(xrays.shape[0], 4, 4)
    return list(geometries), affine


def rescale_affine(affine: torch.Tensor, from_shape: Sequence[int], to_shape: Sequence[int]) -> torch.Tensor:
    """Affine of a grid covering the same field of view as ``affine``/``from_shape`` with ``to_shape`` voxels."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    scale = torch.tensor([f / t for f, t in zip(from_shape, to_shape)], dtype=torch.float64, device=affine.device)
    out = affine.clone()
    out[..., :3, :3] = affine[..., :3, :3] * scale
    # the first voxel centre moves from half an old voxel to half a new voxel inside the field of view
    shift = (scale - 1.0) / 2.0
    out[..., :3, 3] = affine[..., :3, 3] + (affine[..., :3, :3] * shift).sum(-1)
    return out


#: patches up to this side use one strided convolution; larger ones a pyramid of stride-2 convolutions
DIRECT_PATCH_MAX = 8


def _pyramid_widths(cin: int, cout: int, steps: int) -> list[int]:
    return [cin] + [min(cout, cin * 2 ** (k + 1)) for k in range(steps - 1)] + [cout]


def patch_embedding(cin: int, hidden: int, patch: int) -> nn.Module:
    """Voxels -> one token per ``patch``^3 block.

    Small patches (and sizes that are not powers of two): one ``patch``-strided convolution. Larger powers of
    two: stride-2 convolutions doubling the width, so a 32^3 patch costs about 1 M parameters instead of
    67 M for a 32^3 kernel.
    """
    steps = int(round(math.log2(patch)))
    if patch <= DIRECT_PATCH_MAX or 2 ** steps != patch:
        return nn.Conv3d(cin, hidden, kernel_size=patch, stride=patch)
    w = _pyramid_widths(cin, hidden, steps)
    layers: list[nn.Module] = []
    for k in range(steps):
        layers.append(nn.Conv3d(w[k], w[k + 1], kernel_size=3, stride=2, padding=1))
        if k < steps - 1:
            layers += [nn.GroupNorm(min(8, w[k + 1]), w[k + 1]), nn.SiLU()]
    return nn.Sequential(*layers)


def patch_unembedding(hidden: int, cout: int, patch: int) -> nn.Module:
    """Tokens -> voxels, the mirror of :func:`patch_embedding` (transposed convolutions)."""
    steps = int(round(math.log2(patch)))
    if patch <= DIRECT_PATCH_MAX or 2 ** steps != patch:
        return nn.ConvTranspose3d(hidden, cout, kernel_size=patch, stride=patch)
    w = _pyramid_widths(cout, hidden, steps)[::-1]
    layers: list[nn.Module] = []
    for k in range(steps):
        layers.append(nn.ConvTranspose3d(w[k], w[k + 1], kernel_size=2, stride=2))
        if k < steps - 1:
            layers += [nn.GroupNorm(min(8, w[k + 1]), w[k + 1]), nn.SiLU()]
    return nn.Sequential(*layers)


class CascadeStage(nn.Module):
    """One resolution level of the cascade.

    Args:
        size: grid side (voxels) this stage predicts.
        xray_channels: channels of the X-ray features it samples.
        hidden: transformer width.
        depth: transformer blocks.
        heads: attention heads.
        patch: voxels per token side (``size / patch`` tokens per side).
        stem_channels: channels of the full-resolution conv stem.
        xray_token_grid: X-ray features are pooled to ``grid x grid`` tokens per view for cross-attention.
        refine: predict a residual on the upsampled previous stage (stages 2 and 3).
        detail_branch: add a high-frequency conv branch (stage 3).
        use_checkpoint: gradient checkpointing of the transformer and stem (memory for speed).
    """

    def __init__(self, size: int, xray_channels: int, hidden: int = 128, depth: int = 4, heads: int = 4,
                 patch: int = 8, stem_channels: int = 16, xray_token_grid: int = 8, refine: bool = False,
                 detail_branch: bool = False, use_checkpoint: bool = False) -> None:
        super().__init__()
        if size % patch:
            raise ValueError(f"stage size {size} must be a multiple of the patch size {patch}")
        if hidden % heads:
            raise ValueError(f"hidden width {hidden} must be divisible by heads {heads}")
        self.size, self.patch, self.refine, self.use_checkpoint = size, patch, refine, use_checkpoint
        self.xray_token_grid = xray_token_grid
        in_ch = 2 * xray_channels + (1 if refine else 0)
        self.stem = _conv3d_block(in_ch, stem_channels)
        self.embed = patch_embedding(stem_channels, hidden, patch)
        n_tok = (size // patch) ** 3
        self.pos = nn.Parameter(torch.zeros(1, n_tok, hidden))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.xray_proj = nn.Linear(xray_channels, hidden)
        self.view_embed = nn.Linear(2, hidden)  # (cos, sin) of the view angle
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden, 4 * hidden, heads, with_cross_attention=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden)
        self.unembed = patch_unembedding(hidden, stem_channels, patch)
        self.head = nn.Sequential(_conv3d_block(2 * stem_channels, stem_channels), nn.Conv3d(stem_channels, 1, 1))
        self.detail = (
            nn.Sequential(_conv3d_block(in_ch, stem_channels), nn.Conv3d(stem_channels, 1, 3, 1, 1))
            if detail_branch else None
        )
        if refine:  # a refining stage starts as the identity on the upsampled previous output
            for last in (self.head[-1], self.detail[-1] if self.detail is not None else None):
                if last is not None:
                    nn.init.zeros_(last.weight)
                    nn.init.zeros_(last.bias)

    def xray_tokens(self, feats: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
        """(B, V*g*g, hidden) tokens from (B, V, C, h, w) features and (B, V) angles."""
        b, v, c = feats.shape[:3]
        g = self.xray_token_grid
        pooled = F.adaptive_avg_pool2d(feats.flatten(0, 1), g).reshape(b, v, c, g * g).transpose(2, 3)  # B,V,g²,C
        rad = torch.deg2rad(angles_deg.to(feats.dtype))
        view = self.view_embed(torch.stack([torch.cos(rad), torch.sin(rad)], -1))  # B, V, hidden
        return (self.xray_proj(pooled) + view[:, :, None]).flatten(1, 2)

    def _run(self, fn, *args):
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _decode(self, grid: torch.Tensor, stem: torch.Tensor) -> torch.Tensor:
        """Token grid + stem features -> one channel; one checkpointed unit, so the full-resolution concatenation
        (2 x stem channels) is never kept for the backward pass."""
        return self.head(torch.cat([self.unembed(grid), stem], 1))

    def forward(self, backprojected: torch.Tensor, xray_feats: torch.Tensor, angles_deg: torch.Tensor,
                previous: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            backprojected: (B, 2C, S, S, S) from :func:`backproject_features`.
            xray_feats: (B, V, C, h, w) this stage's X-ray features.
            angles_deg: (B, V) view angles.
            previous: (B, 1, S/2, S/2, S/2) previous stage output (refining stages).

        Returns:
            (B, 1, S, S, S) normalised CT.
        """
        s = self.size
        if backprojected.shape[-3:] != (s, s, s):
            raise ValueError(f"stage of size {s} got a {tuple(backprojected.shape[-3:])} grid")
        up = None
        x = backprojected
        if self.refine:
            if previous is None:
                raise ValueError("a refining stage needs the previous stage's output")
            up = F.interpolate(previous, size=(s, s, s), mode="trilinear", align_corners=False)
            x = torch.cat([x, up], 1)
        stem = self._run(self.stem, x)
        tok = self.embed(stem).flatten(2).transpose(1, 2) + self.pos
        ctx = self.xray_tokens(xray_feats, angles_deg)
        for blk in self.blocks:
            tok = self._run(blk, tok, ctx)
        tok = self.norm(tok)
        n = s // self.patch
        grid = tok.transpose(1, 2).reshape(tok.shape[0], -1, n, n, n)
        out = self._run(self._decode, grid, stem)
        if self.detail is not None:
            out = out + self._run(self.detail, x)
        return out + up if up is not None else out


class ProgressiveCascade(nn.Module):
    """The full cascade: shared X-ray encoder and one :class:`CascadeStage` per resolution.

    Args:
        sizes: grid side of each stage, coarse to fine (e.g. 64, 128, 256).
        encoder_channels: X-ray encoder channels at full, 1/2, 1/4 resolution. Stage ``k`` of ``n`` uses the
            level ``n-1-k`` features (the coarsest stage the 1/4-resolution ones).
        hidden, depth, heads: per stage (sequences) or shared (ints); the seed uses 4L/4H, 6L/8H, 8L/8H.
        patch: per stage or shared.
        stem_channels, xray_token_grid: shared.
        checkpoint_stages: stage indices (0-based) using gradient checkpointing (default: the last).
    """

    def __init__(self, sizes: Sequence[int] = (64, 128, 256), encoder_channels: Sequence[int] = (16, 32, 64),
                 hidden: int | Sequence[int] = 128, depth: int | Sequence[int] = (4, 6, 8),
                 heads: int | Sequence[int] = (4, 8, 8), patch: int | Sequence[int] = (8, 16, 32),
                 stem_channels: int = 16, xray_token_grid: int = 8,
                 checkpoint_stages: Sequence[int] | None = None) -> None:
        super().__init__()
        n = len(sizes)
        if not 1 <= n <= 3:
            raise ValueError(f"the cascade has 1 to 3 stages, got sizes {sizes}")

        def per_stage(v, name):
            vals = list(v) if isinstance(v, Sequence) else [v] * n
            if len(vals) < n:
                raise ValueError(f"{name} needs one value per stage ({n}), got {vals}")
            return vals[:n]

        hidden_l, depth_l, heads_l, patch_l = (per_stage(v, k) for v, k in
                                               ((hidden, "hidden"), (depth, "depth"), (heads, "heads"), (patch, "patch")))
        ckpt = {n - 1} if checkpoint_stages is None else set(checkpoint_stages)
        #: constructor arguments, stored with checkpoints so inference can rebuild the same network
        self.config = {"sizes": [int(s) for s in sizes], "encoder_channels": list(encoder_channels), "hidden": hidden_l,
                       "depth": depth_l, "heads": heads_l, "patch": patch_l, "stem_channels": stem_channels,
                       "xray_token_grid": xray_token_grid}
        self.sizes = tuple(int(s) for s in sizes)
        self.encoder = XrayEncoder(encoder_channels)
        # encoder level per stage (0 = full resolution): the coarsest stage reads the 1/4-resolution features
        self.levels = [2 - k for k in range(n)]
        self.stages = nn.ModuleList(
            CascadeStage(s, encoder_channels[self.levels[k]], hidden_l[k], depth_l[k], heads_l[k], patch_l[k],
                         stem_channels, xray_token_grid, refine=k > 0, detail_branch=(k == 2),
                         use_checkpoint=k in ckpt)
            for k, s in enumerate(self.sizes)
        )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def freeze_stages(self, trainable_stage: int) -> None:
        """Only stage ``trainable_stage`` (0-based) trains; earlier stages are frozen (and kept in eval mode),
        later ones are not run and frozen too (so DDP sees no unused trainable parameters).

        The encoder trains with stage 0 and is frozen afterwards, as the earlier stages that depend on it.
        """
        if not 0 <= trainable_stage < self.num_stages:
            raise ValueError(f"trainable_stage must be in [0, {self.num_stages - 1}], got {trainable_stage}")
        for p in self.encoder.parameters():
            p.requires_grad_(trainable_stage == 0)
        for k, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(k == trainable_stage)
        self._frozen_before = trainable_stage

    def train(self, mode: bool = True) -> ProgressiveCascade:
        super().train(mode)
        frozen = getattr(self, "_frozen_before", 0)
        if frozen > 0:  # frozen parts stay in eval mode (normalisation statistics, dropout)
            self.encoder.eval()
            for stage in self.stages[:frozen]:
                stage.eval()
        return self

    def forward(self, xrays: torch.Tensor, geometries: Sequence[ProjectionGeometry], affine: torch.Tensor,
                up_to_stage: int | None = None) -> list[torch.Tensor]:
        """Runs the cascade.

        Args:
            xrays: (B, V, H, W) normalised radiographs.
            geometries: one :class:`ProjectionGeometry` per batch item.
            affine: (B, 4, 4) or (4, 4) voxel -> RAS mm of the **first** stage's grid; finer stages cover the
                same field of view.
            up_to_stage: last stage to run (0-based; default all).

        Returns:
            Stage outputs, coarse to fine: [(B, 1, S_k, S_k, S_k)].
        """
        last = self.num_stages - 1 if up_to_stage is None else up_to_stage
        if not 0 <= last < self.num_stages:
            raise ValueError(f"up_to_stage must be in [0, {self.num_stages - 1}], got {up_to_stage}")
        geometries, affine = _per_item(xrays, geometries, affine)
        feats = self.encoder(xrays)
        angles = torch.stack([g.angles_deg.to(xrays.device) for g in geometries])
        outputs: list[torch.Tensor] = []
        s0 = self.sizes[0]
        for k in range(last + 1):
            s = self.sizes[k]
            f = feats[self.levels[k]]
            aff = rescale_affine(affine, (s0,) * 3, (s,) * 3)
            bp = backproject_features(f, geometries, aff, (s, s, s))
            outputs.append(self.stages[k](bp, f, angles, outputs[-1] if k > 0 else None))
        return outputs


class FixedGeometryCascade(ProgressiveCascade):
    """:class:`ProgressiveCascade` with one acquisition geometry and reconstruction grid built in (one X-ray
    system's fixed set-up), so that ``forward`` takes the radiographs alone: what ``verify_net_in_out``,
    ``ckpt_export`` (TorchScript by tracing, valid for that geometry only) and tensor-in/tensor-out servers need.
    Same weights and state-dict keys as the cascade.

    Args:
        geometry: the system's ``geometry.json`` (as ``ctsynth drr`` / ``ctsynth prepare`` write it).
        fov_mm: side of the reconstructed cube; default as ``inference.json`` derives it from the geometry file.
        **cascade_args: :class:`ProgressiveCascade`'s arguments.

    Shapes:
        forward(xrays (B, V, rows, cols) normalised radiographs, in the geometry's view order) ->
        the last stage's (B, 1, S, S, S) in [0, 1] (the training intensity range).
    """

    def __init__(self, geometry: str, fov_mm: float | None = None, **cascade_args) -> None:
        super().__init__(**cascade_args)
        from ctsynth.geometry import cube_affine

        from .inference import reconstruction_grid

        fov, center, _ = reconstruction_grid(geometry, fov_mm)
        # kept in a list: as a submodule its buffers would enter the state dict and the cascade's weights not load
        self._geometry = [ProjectionGeometry.load_json(geometry)]
        self.register_buffer("grid_affine", cube_affine(self.sizes[0], fov, center), persistent=False)

    def forward(self, xrays: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        geom = self._geometry[0]
        if xrays.ndim != 4 or xrays.shape[1] != geom.num_views:
            raise ValueError(f"expected (B, {geom.num_views}, rows, cols) radiographs, got {tuple(xrays.shape)}")
        return super().forward(xrays, geom.to(xrays.device), self.grid_affine)[-1]


class BackprojectionUNet(nn.Module):
    """Baseline: the same X-ray encoder and back-projection, then a 3D U-Net with skip connections (MONAI
    ``BasicUNet``) predicting one grid. Drop-in for :class:`ProgressiveCascade` (one stage).

    Args:
        size: output grid side (multiple of 16).
        encoder_channels: X-ray encoder channels; the 1/4-resolution features are back-projected.
        features: the six BasicUNet widths.
    """

    def __init__(self, size: int = 64, encoder_channels: Sequence[int] = (16, 32, 64),
                 features: Sequence[int] = (16, 32, 64, 128, 256, 16)) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        if size % 16:
            raise ValueError(f"BackprojectionUNet needs a size divisible by 16 (four poolings), got {size}")
        self.sizes = (int(size),)
        self.config = {"size": int(size), "encoder_channels": list(encoder_channels), "features": list(features)}
        self.encoder = XrayEncoder(encoder_channels)
        self.unet = BasicUNet(spatial_dims=3, in_channels=2 * encoder_channels[2], out_channels=1,
                              features=tuple(features), norm=("group", {"num_groups": 4}))

    @property
    def num_stages(self) -> int:
        return 1

    def freeze_stages(self, trainable_stage: int) -> None:
        if trainable_stage != 0:
            raise ValueError("BackprojectionUNet has a single stage (stage 1)")

    def forward(self, xrays: torch.Tensor, geometries: Sequence[ProjectionGeometry], affine: torch.Tensor,
                up_to_stage: int | None = None) -> list[torch.Tensor]:
        """Same contract as :meth:`ProgressiveCascade.forward`; returns a one-element list."""
        geometries, affine = _per_item(xrays, geometries, affine)
        f = self.encoder(xrays)[2]
        s = self.sizes[0]
        return [self.unet(backproject_features(f, geometries, affine, (s, s, s)))]


def prepare_stage(network: nn.Module, stage: int, init_checkpoint: str | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
    """Readies ``network`` for training stage ``stage`` (1-based): loads ``init_checkpoint`` (the previous
    stage's best ``model.pt``) when given, freezes all but that stage and moves it to ``device``.

    Raises:
        ValueError: stage outside the network's stages, or a later stage without the previous stage's weights;
        FileNotFoundError: missing checkpoint.
    """
    n = getattr(network, "num_stages", 1)
    if not 1 <= int(stage) <= n:
        raise ValueError(f"stage must be in 1..{n} for this network, got {stage}")
    if init_checkpoint:
        meta = load_network_weights(network, init_checkpoint)
        done = meta.get("stage")
        if done is not None and int(done) != int(stage) - 1:
            logging.getLogger(__name__).warning("%s holds stage %s weights; training stage %s from them",
                                                init_checkpoint, done, stage)
    elif int(stage) > 1:
        raise ValueError(f"stage {stage} refines stage {int(stage) - 1}: set init_checkpoint to that stage's best "
                         f"weights (models/stage{int(stage) - 1}/model.pt)")
    network.freeze_stages(int(stage) - 1)
    return network.to(device)
