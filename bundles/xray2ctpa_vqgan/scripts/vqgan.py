"""3D VQ-GAN for CT pulmonary angiography: encoder, EMA codebook with dead-code restart, decoder, and the
patch-wise path that encodes and decodes full volumes in overlapping windows.

Encoder: an optional space-to-depth step (``stem_stride``), a 3x3x3 stem, then ``len(channels) - 1`` stages of
residual blocks (GroupNorm or BatchNorm, SiLU) each ending in a stride-2 convolution (three for the seed: 8x
compression per axis), residual blocks at the bottom, and a 1x1 projection to the code width. Decoder: the mirror image, with nearest-neighbour upsampling + convolution, ending in
depth-to-space when ``stem_stride`` > 1.
MONAI's ``VQVAE`` has no normalisation layers and no dead-code restart, hence this network; the quantiser is
:class:`ctsynth.vq.RestartingEMAQuantizer` (MONAI's ``EMAQuantizer`` underneath).

Normalisation and quantisation distances run in float32 under autocast, so bf16 training does not turn the
codebook distances or the normalisation statistics into NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ctsynth.inferers import gaussian_blend_weights
from ctsynth.metrics import seam_ratio, window_borders
from ctsynth.transforms import pad_to_multiple
from ctsynth.vq import RestartingEMAQuantizer, codebook_perplexity, codebook_usage

__all__ = ["VQGAN3D", "VQGAN3DReconstructor", "PatchwiseVQGAN", "SpaceToDepth3D", "DepthToSpace3D"]


class _Norm(nn.GroupNorm):
    """GroupNorm computed in float32 (bf16 statistics over large 3D volumes lose precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _groups(channels: int, groups: int) -> int:
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class _BatchNorm(nn.BatchNorm3d):
    """BatchNorm computed in float32. In eval mode it applies the running statistics, which do not depend on the
    input's extent: a window is normalised exactly as the same voxels inside the whole volume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return _BatchNorm(channels) if kind == "batch" else _Norm(_groups(channels, groups), channels)


def _voxel_shuffle(x: torch.Tensor, r: int, to_channels: bool) -> torch.Tensor:
    """r x r x r voxel blocks into channels (``to_channels``) or back; channel ``k * r^3 + (a * r + b) * r + c``
    holds offset (a, b, c) of input channel ``k``."""
    n, c, sx, sy, sz = x.shape
    if to_channels:
        x = x.reshape(n, c, sx // r, r, sy // r, r, sz // r, r).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(n, c * r ** 3, sx // r, sy // r, sz // r)
    x = x.reshape(n, c // r ** 3, r, r, r, sx, sy, sz).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(n, c // r ** 3, sx * r, sy * r, sz * r)


class SpaceToDepth3D(nn.Module):
    """Moves each ``r`` x ``r`` x ``r`` block of voxels into channels (3D pixel unshuffle): no parameters, no loss.

    Shapes:
        (B, C, X, Y, Z), sizes divisible by ``r`` -> (B, C * r^3, X / r, Y / r, Z / r).
    """

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = int(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _voxel_shuffle(x, self.r, True)


class DepthToSpace3D(SpaceToDepth3D):
    """The inverse of :class:`SpaceToDepth3D` (3D pixel shuffle).

    Shapes:
        (B, C * r^3, X, Y, Z) -> (B, C, X * r, Y * r, Z * r).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _voxel_shuffle(x, self.r, False)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, norm: str) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _norm(norm, c_in, groups), nn.SiLU(), nn.Conv3d(c_in, c_out, 3, padding=1),
            _norm(norm, c_out, groups), nn.SiLU(), nn.Conv3d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class VQGAN3D(nn.Module):
    """Vector-quantised 3D autoencoder (the generator of the VQ-GAN).

    Args:
        in_channels: image channels.
        channels: widths from full resolution down to the bottleneck; ``len(channels) - 1`` downsamplings.
        num_res_blocks: residual blocks per stage.
        num_embeddings / embedding_dim: codebook size and code width (the seed: 512 x 64).
        commitment_cost / decay / restart_threshold: quantiser settings (see :class:`RestartingEMAQuantizer`).
        norm_groups: GroupNorm groups (fewer when a width is not divisible).
        norm: ``group`` (GroupNorm: statistics over the whole input, so a window is normalised a little
            differently from the same voxels inside the whole volume) or ``batch`` (BatchNorm: at inference the
            running statistics, identical for windows and whole volumes, so the patch-wise path has no
            normalisation seams; measured lower quality in short training, see docs/README.md).
        stem_stride: 1 (the seed): the first stage runs at full resolution. ``r`` > 1: each r x r x r block of
            voxels is moved into channels first (:class:`SpaceToDepth3D`) and the decoder ends in the inverse,
            so no layer runs at full resolution; the total downsampling is ``r * 2 ** (len(channels) - 1)``. With
            ``r`` = 2 and widths 32/64 a float32 step of the demo's 4x VQ-GAN takes 0.6 s instead of 2.7 s with a
            full-resolution stage of widths 16/32/64, for 0.4 dB less after the same 400 steps (docs/README.md).

    Shapes:
        forward(x (B, C, X, Y, Z), each size divisible by :attr:`downsample`) ->
        (reconstruction like x, commitment loss (), code indices (B, X/f, Y/f, Z/f)).
    """

    NORMS = ("group", "batch")

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (64, 128, 192, 256), num_res_blocks: int = 2,
                 num_embeddings: int = 512, embedding_dim: int = 64, commitment_cost: float = 0.25,
                 decay: float = 0.99, restart_threshold: float = 1.0, norm_groups: int = 32,
                 norm: str = "group", stem_stride: int = 1) -> None:
        super().__init__()
        if int(stem_stride) != stem_stride or stem_stride < 1:
            raise ValueError(f"stem_stride must be a positive integer (1: full-resolution stem), got {stem_stride!r}")
        stem_stride = int(stem_stride)
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two widths (one downsampling), got {list(channels)}")
        ch = [int(c) for c in channels]
        self.config = {"in_channels": in_channels, "channels": ch, "num_res_blocks": num_res_blocks,
                       "num_embeddings": num_embeddings, "embedding_dim": embedding_dim,
                       "commitment_cost": commitment_cost, "decay": decay, "restart_threshold": restart_threshold,
                       "norm_groups": norm_groups, "norm": norm, "stem_stride": stem_stride}
        self.downsample = stem_stride * 2 ** (len(ch) - 1)
        cells = stem_stride ** 3  # voxels per stem cell
        enc: list[nn.Module] = [SpaceToDepth3D(stem_stride)] if stem_stride > 1 else []
        enc.append(nn.Conv3d(in_channels * cells, ch[0], 3, padding=1))
        for i in range(len(ch) - 1):
            enc += [_ResBlock(ch[i], ch[i], norm_groups, norm) for _ in range(num_res_blocks)]
            enc.append(nn.Conv3d(ch[i], ch[i + 1], 4, stride=2, padding=1))
        enc += [_ResBlock(ch[-1], ch[-1], norm_groups, norm) for _ in range(num_res_blocks)]
        enc += [_norm(norm, ch[-1], norm_groups), nn.SiLU(), nn.Conv3d(ch[-1], embedding_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = RestartingEMAQuantizer(3, num_embeddings, embedding_dim, commitment_cost, decay,
                                                restart_threshold=restart_threshold)
        dec: list[nn.Module] = [nn.Conv3d(embedding_dim, ch[-1], 3, padding=1)]
        dec += [_ResBlock(ch[-1], ch[-1], norm_groups, norm) for _ in range(num_res_blocks)]
        for i in range(len(ch) - 1, 0, -1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(ch[i], ch[i - 1], 3, padding=1)]
            dec += [_ResBlock(ch[i - 1], ch[i - 1], norm_groups, norm) for _ in range(num_res_blocks)]
        dec += [_norm(norm, ch[0], norm_groups), nn.SiLU(), nn.Conv3d(ch[0], in_channels * cells, 3, padding=1)]
        if stem_stride > 1:
            dec.append(DepthToSpace3D(stem_stride))
        self.decoder = nn.Sequential(*dec)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or any(s % self.downsample for s in x.shape[-3:]):
            raise ValueError(f"expected (B, C, X, Y, Z) with sizes divisible by {self.downsample}, got {tuple(x.shape)}; "
                             "pad or crop the volume (or use PatchwiseVQGAN)")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized codes (B, D, x, y, z), commitment loss, indices (B, x, y, z))."""
        self._check(x)
        return self.quantizer(self.encoder(x))

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, x, y, z) -> images."""
        return self.decode(self.quantizer.embed(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, loss, idx = self.encode(x)
        return self.decode(q), loss, idx

    def codebook_stats(self, indices: torch.Tensor) -> dict[str, float]:
        """Usage (%) and perplexity of ``indices``."""
        n = self.quantizer.num_embeddings
        return {"codebook_usage_pct": 100.0 * codebook_usage(indices, n), "perplexity": codebook_perplexity(indices, n)}


class VQGAN3DReconstructor(VQGAN3D):
    """:class:`VQGAN3D` whose ``forward`` returns the reconstruction only: the same weights and settings, one tensor
    in and one out, as ``verify_net_in_out``, ``ckpt_export`` (TorchScript by tracing) and servers expect.

    Shapes:
        forward(x (B, C, X, Y, Z), sizes divisible by :attr:`downsample`) -> reconstruction (B, C, X, Y, Z).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q, _, _ = self.encode(x)
        return self.decode(q)


class PatchwiseVQGAN:
    """Reconstructs full volumes (e.g. 512 x 512 x 600) through a :class:`VQGAN3D` in overlapping windows.

    MONAI's sliding-window inference runs each window through the model on ``device`` and blends the windows
    (``gaussian`` or ``constant`` = linear averaging) into an output kept on ``stitch_device`` (CPU by default,
    so a full volume never sits on the GPU). Sizes are padded to the window grid and cropped back.

    The Gaussian weights (sigma = 1/8 of the window per axis) are passed to MONAI without its floor of 1e-3
    (:func:`ctsynth.inferers.gaussian_blend_weights`), which let window-border artefacts through.

    Args:
        model: the VQ-GAN (or any (B, C, ...) -> (B, C, ...) image model returning a tensor or a tuple whose first
            item is the image).
        roi_size: window size (the seed: 256 x 256 x 128).
        overlap: fraction shared by neighbouring windows (the seed: 0.25).
        mode: ``gaussian`` or ``constant``.
        device / stitch_device: where windows run / where the volume is assembled.
        sw_batch_size: windows per forward pass.
        norm_stats: what the GroupNorm layers normalise by: ``window`` (each window's own statistics: cheapest; what
            a model trained on patches saw) or ``volume`` (the whole volume's, measured beforehand over the same
            windows by :class:`ctsynth.groupnorm.GroupNormCalibration`: the windows then compute what a
            whole-volume pass computes, up to the missing context at window borders; about ``L / 2`` extra windowed
            passes for ``L`` GroupNorm layers; what a model trained on whole volumes saw). One window: the same.
    """

    MODES = ("gaussian", "constant")
    NORM_STATS = ("window", "volume")

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], Any], roi_size: Sequence[int] = (256, 256, 128),
                 overlap: float = 0.25, mode: str = "gaussian", device: str | torch.device | None = None,
                 stitch_device: str | torch.device = "cpu", sw_batch_size: int = 1, norm_stats: str = "window") -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if norm_stats not in self.NORM_STATS:
            raise ValueError(f"norm_stats must be one of {self.NORM_STATS}, got {norm_stats!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")
        self.model, self.roi_size, self.overlap, self.mode = model, tuple(int(r) for r in roi_size), float(overlap), mode
        self.device, self.stitch_device, self.sw_batch_size = device, torch.device(stitch_device), int(sw_batch_size)
        self.norm_stats = norm_stats

    def _predict(self, window: torch.Tensor) -> torch.Tensor:
        out = self.model(window)
        return out[0] if isinstance(out, (tuple, list)) else out

    @classmethod
    def fitted(cls, model: nn.Module, shape: Sequence[int], roi_size: Sequence[int] = (256, 256, 128),
               **kwargs: Any) -> PatchwiseVQGAN:
        """Windows of at most ``roi_size`` for a volume of ``shape`` (X, Y, Z): rounded down to multiples of the
        model's downsampling and no larger than the volume padded to that multiple."""
        m = int(getattr(model, "downsample", 1))
        padded = [-(-int(s) // m) * m for s in shape]
        return cls(model, [max(min(int(r) // m * m, p), m) for r, p in zip(roi_size, padded)], **kwargs)

    def blend_weights(self, roi: Sequence[int]) -> torch.Tensor | None:
        """(1, 1, *roi) blending weights for ``gaussian`` (:func:`ctsynth.inferers.gaussian_blend_weights`: no
        floor); ``None`` for ``constant``."""
        return gaussian_blend_weights(roi) if self.mode == "gaussian" else None

    @property
    def multiple(self) -> int:
        """Spatial sizes the model needs (its downsampling; 1 for a plain function)."""
        return int(getattr(self.model, "downsample", 1))

    def _roi(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(min(r, int(s)) for r, s in zip(self.roi_size, shape))

    def windows(self, shape: Sequence[int]) -> list[tuple[slice, ...]]:
        """The windows MONAI's sliding-window inference cuts from a volume of ``shape`` (X, Y, Z) (interval
        ``int(roi * (1 - overlap))``, the last window flush with the end)."""
        from monai.data.utils import dense_patch_slices

        roi = self._roi(shape)
        interval = [r if r == s else max(int(r * (1 - self.overlap)), 1) for r, s in zip(roi, shape)]
        return dense_patch_slices(tuple(int(s) for s in shape), roi, interval)

    def window_borders(self, shape: Sequence[int]) -> list[list[int]]:
        """Per spatial axis, the indices where a window starts or ends inside a volume of ``shape`` (X, Y, Z), for
        the windows :meth:`reconstruct` cuts (from the volume padded to :attr:`multiple`)."""
        padded = [-(-int(s) // self.multiple) * self.multiple for s in shape]
        return window_borders(self.windows(padded), shape)

    def seam_ratio(self, volume: torch.Tensor) -> float:
        """Mean squared intensity step across window borders divided by that across every other voxel face
        (1: seams are invisible; above 1: steps concentrate where windows meet). ``volume``: (..., X, Y, Z)."""
        v = torch.as_tensor(volume)
        return seam_ratio(v, self.window_borders(v.shape[-3:]))

    def reconstruct(self, volume: torch.Tensor) -> torch.Tensor:
        """Any (B, C, X, Y, Z) volume: padded (edge values) to :attr:`multiple`, windowed, cropped back."""
        size = volume.shape[-3:]
        return self(pad_to_multiple(volume, self.multiple))[..., :size[0], :size[1], :size[2]]

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> the reconstructed volume, same shape, on ``stitch_device``."""
        from monai.inferers import sliding_window_inference

        if volume.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) volume, got {tuple(volume.shape)}")
        if isinstance(self.model, nn.Module):
            self.model.eval()
        roi = self._roi(volume.shape[-3:])
        if any(r % self.multiple for r in roi):
            raise ValueError(f"windows {roi} must be divisible by the model's downsampling {self.multiple}; pad the "
                             "volume (reconstruct() does) or change roi_size")

        weights = self.blend_weights(roi)

        def run(v: torch.Tensor) -> torch.Tensor:
            return sliding_window_inference(v, roi_size=roi, sw_batch_size=self.sw_batch_size, predictor=self._predict,
                                            overlap=self.overlap, mode=self.mode, padding_mode="replicate",
                                            sw_device=self.device or v.device, device=self.stitch_device,
                                            progress=False, roi_weight_map=weights)

        windows = self.windows(volume.shape[-3:])
        if self.norm_stats == "window" or len(windows) == 1 or not isinstance(self.model, nn.Module) or not any(
                isinstance(m, nn.GroupNorm) for m in self.model.modules()):
            return run(volume)
        from ctsynth.groupnorm import GroupNormCalibration

        outs = []
        for item in volume.split(1):  # statistics per volume
            cal = GroupNormCalibration(self.model).calibrate(item, windows, self._predict, multiple=self.multiple,
                                                             device=self.device)
            with cal.applied():
                outs.append(run(item))
        return torch.cat(outs)
