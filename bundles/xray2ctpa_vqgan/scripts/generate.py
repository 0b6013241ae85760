"""X-ray -> CTPA with the trained stage-2 model (``inference.json``, ``ctsynth generate``).

:class:`CTPAGenerator` reads a chest radiograph (PNG/JPEG/TIFF, DICOM or the NIfTI line integrals of
``ctsynth prepare ctpa``), normalises it as in training (:func:`xray_transform`), samples K latent volumes
with guided DDIM, decodes them through the VQ-GAN and returns their mean in HU (and the per-voxel standard
deviation when K > 1) on a grid of the training voxel size centred on 0: the training grid (recorded in the
checkpoint), or any requested shape, e.g. 512 x 512 x N. Grids larger than the training grid are sampled in
overlapping latent windows of the training latent shape and decoded patch-wise (:mod:`scripts.diffusion`), so
working memory is set by the window; the X-ray's rays are placed by the requested grid's field of view.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Resize
from torch import nn

from ctsynth.atomic import atomic_write_json
from ctsynth.engine import load_network_weights, unwrap
from ctsynth.io import check_outputs, save_dicom_series, save_nifti
from ctsynth.metrics import seam_ratio, window_borders
from ctsynth.phantoms import grid_affine
from ctsynth.transforms import LoadRadiographs, NormalizeRadiograph, unscale_hu

from .diffusion import OBJECTIVES, GuidedSampler, decode_latents, latent_shape_of, latent_windows, load_vqgan

__all__ = ["STAGE2_META_KEYS", "xray_transform", "CTPAGenerator"]

logger = logging.getLogger(__name__)

#: what a stage-2 checkpoint must record to generate on its own
STAGE2_META_KEYS = ("scale_factor", "latent_shape", "volume_shape", "spacing_mm", "xray_size", "intensity_range")


def xray_transform(size: int) -> Compose:
    """File path -> (1, size, size) radiograph, normalised to its 0.5 / 99.5 % quantiles (the training pipeline's
    ``LoadRadiographsd`` + ``NormalizeRadiographd`` + ``Resized``)."""
    return Compose([LoadRadiographs(), NormalizeRadiograph(), Resize((int(size), int(size)), mode="area")])


class CTPAGenerator:
    """The trained stage-2 model, ready to turn radiographs into CTPA volumes.

    Args:
        network: :class:`scripts.conditioning.XrayConditionedDenoiser`, weights loaded from ``checkpoint``.
        checkpoint: stage-2 weights (``models/ldm.pt``) whose meta has :data:`STAGE2_META_KEYS`.
        vqgan_path: the stage-1 model the latents belong to (``models/vqgan.pt``).
        scheduler: MONAI ``DDIMScheduler`` with the training schedule.
        num_inference_steps / guidance: DDIM steps and classifier-free guidance scale.
        quantize: snap sampled latents to the codebook before decoding.
        device: where to run.
        window: latent window (x, y, z) of windowed sampling and patch-wise decoding; None: the checkpoint's
            ``latent_shape`` (what the denoiser was trained on).
        overlap: fraction of a window shared with each neighbour.
    """

    def __init__(self, network: nn.Module, checkpoint: str | Path, vqgan_path: str | Path, scheduler: Any,
                 num_inference_steps: int = 50, guidance: float = 1.0, quantize: bool = True,
                 device: str | torch.device = "cpu", window: Sequence[int] | None = None, overlap: float = 0.25) -> None:
        meta = load_network_weights(network, checkpoint, require_meta=STAGE2_META_KEYS, not_this_kind=(
            "not an xray2ctpa_vqgan stage-2 checkpoint; train one with bundles/xray2ctpa_vqgan/configs/train_diffusion.json"))
        for key in ("prediction_type", "num_train_timesteps"):
            if key in meta and getattr(scheduler, key, meta[key]) != meta[key]:
                raise ValueError(f"{checkpoint} was trained with {key}={meta[key]!r} but the sampler is set to "
                                 f"{getattr(scheduler, key)!r}; pass --{key} {meta[key]} (`ctsynth generate` reads it "
                                 "from the checkpoint)")
        self._setup(network, load_vqgan(vqgan_path, device), scheduler, meta, num_inference_steps, guidance, quantize,
                    device, window, overlap, names=(str(checkpoint), str(vqgan_path)))

    @classmethod
    def from_networks(cls, network: nn.Module, vqgan: nn.Module, scheduler: Any, meta: dict[str, Any],
                      num_inference_steps: int = 50, guidance: float = 1.0, quantize: bool = True,
                      device: str | torch.device = "cpu", window: Sequence[int] | None = None,
                      overlap: float = 0.25) -> CTPAGenerator:
        """A generator of networks already built (``meta``: the :data:`STAGE2_META_KEYS` a checkpoint records), e.g.
        for benchmarks; the other arguments as for the constructor."""
        missing = [k for k in STAGE2_META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"meta lacks {missing}: give every one of {list(STAGE2_META_KEYS)}")
        self = cls.__new__(cls)
        self._setup(network, vqgan, scheduler, dict(meta), num_inference_steps, guidance, quantize, device, window,
                    overlap, names=("network", "vqgan"))
        return self

    def _setup(self, network: nn.Module, vqgan: nn.Module, scheduler: Any, meta: dict[str, Any],
               num_inference_steps: int, guidance: float, quantize: bool, device: str | torch.device,
               window: Sequence[int] | None, overlap: float, names: tuple[str, str]) -> None:
        checkpoint, vqgan_path = names
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.vqgan = vqgan.to(self.device).eval()
        if self.vqgan.config["embedding_dim"] != getattr(network, "latent_channels", self.vqgan.config["embedding_dim"]):
            raise ValueError(f"{vqgan_path} has {self.vqgan.config['embedding_dim']}-channel codes but {checkpoint} was "
                             f"trained on {network.latent_channels}; use the VQ-GAN the diffusion model was trained with")
        objective = meta.get("objective", "diffusion")
        if objective not in OBJECTIVES:
            raise ValueError(f"{checkpoint}: meta key 'objective' is {str(objective)[:40]!r}, not one of {OBJECTIVES}; "
                             "use a checkpoint written by train_diffusion.json (or with regression.json)")
        self.objective = objective
        self.window = [int(s) for s in (meta["latent_shape"] if window is None else window)]
        self.overlap = float(overlap)
        self.sampler = GuidedSampler(self.network, scheduler, num_inference_steps, guidance, objective=objective,
                                     window=self.window, overlap=self.overlap)
        self.quantize, self.meta = quantize, meta
        self.transform = xray_transform(int(meta["xray_size"]))

    def output_shape(self, shape: Sequence[int] | None = None) -> list[int]:
        """The (X, Y, Z) generated: ``shape`` (checked), or the training grid's."""
        if shape is None:
            return [int(s) for s in self.meta["volume_shape"]]
        out = [int(s) for s in shape]
        if len(out) != 3 or min(out) < 1:
            raise ValueError(f"shape must be 3 positive sizes (X Y Z voxels), got {list(shape)}")
        return out

    def affine(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """RAS affine of the output grid (``shape``, default the training grid): the training voxel size (mm),
        centred on the origin."""
        return grid_affine(self.output_shape(shape), [float(s) for s in self.meta["spacing_mm"]])

    def latent_shape(self, shape: Sequence[int] | None = None) -> list[int]:
        """Latent grid of an output ``shape``: the checkpoint's for the training grid, else the VQ-GAN latents of
        ``shape`` padded to the denoiser's downsampling."""
        if shape is None or self.output_shape(shape) == [int(s) for s in self.meta["volume_shape"]]:
            return [int(s) for s in self.meta["latent_shape"]]
        return latent_shape_of(self.output_shape(shape), self.vqgan.downsample, unwrap(self.network).multiple)

    def windows(self, shape: Sequence[int] | None = None) -> list[tuple[slice, slice, slice]]:
        """The latent windows sampling and decoding use for an output ``shape``."""
        return latent_windows(self.latent_shape(shape), self.window, self.overlap, unwrap(self.network).multiple)

    def window_borders(self, shape: Sequence[int] | None = None) -> list[list[int]]:
        """Per axis, the output voxel indices where a latent window starts or ends inside the volume (for
        :func:`ctsynth.metrics.seam_ratio`)."""
        return window_borders(self.windows(shape), self.output_shape(shape), int(self.vqgan.downsample))

    @torch.no_grad()
    def __call__(self, xray: torch.Tensor, samples: int = 1, seed: int = 0,
                 shape: Sequence[int] | None = None) -> tuple[MetaTensor, MetaTensor | None]:
        """(1, H, W) normalised radiograph (from :attr:`transform`) -> (mean, std) CTPA (1, X, Y, Z) in HU of
        ``shape`` (default the training grid; std None when ``samples`` is 1)."""
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        x = torch.as_tensor(xray).float()
        x = x.as_tensor() if isinstance(x, MetaTensor) else x  # a plain tensor: the output gets our affine only
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"expected a (1, H, W) radiograph, got {tuple(x.shape)}")
        size, latent = self.output_shape(shape), self.latent_shape(shape)
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        # running mean and sum of squared deviations (Welford): float32 without cancellation
        mean = torch.zeros((1, *size), dtype=torch.float32)
        m2 = torch.zeros_like(mean) if int(samples) > 1 else None
        for k in range(int(samples)):
            z = self.sampler(x[None].to(self.device), latent, generator=g, volume_shape=size)
            img = decode_latents(self.vqgan, z, float(self.meta["scale_factor"]), size, self.quantize,
                                 window=self.window, overlap=self.overlap, stitch_device="cpu")[0]
            hu = unscale_hu(img.cpu(), self.meta["intensity_range"]).float()
            delta = hu - mean
            mean += delta / (k + 1)
            if m2 is not None:
                m2 += delta * (hu - mean)
            logger.info("sample %d/%d done", k + 1, samples)
        aff = self.affine(size)
        std = None if m2 is None else MetaTensor((m2 / samples).clamp_min(0).sqrt(), affine=aff)
        return MetaTensor(mean, affine=aff), std

    def generate_file(self, input: str | Path, samples: int = 1, seed: int = 0,
                      shape: Sequence[int] | None = None) -> tuple[MetaTensor, MetaTensor | None]:
        """Reads and normalises the radiograph ``input``, then :meth:`__call__`."""
        return self(self.transform(str(input)), samples, seed, shape)

    def run(self, input: str, output: str, steps: int | None = None, guidance: float | None = None, samples: int = 1,
            seed: int = 0, dicom_out: str | None = None, preview: str | None = None,
            shape: Sequence[int] | None = None) -> dict[str, Any]:
        """Reads ``input``, writes the CTPA NIfTI of ``shape`` (default the training grid; and the std map when
        ``samples`` > 1, a DICOM series, a tri-planar PNG); returns a report (also written beside ``output`` as
        JSON) with the windows used and the seam ratio across their borders."""
        t0 = time.perf_counter()
        std_path = str(output).replace(".nii", "_std.nii")
        report_path = Path(output).with_suffix("").with_suffix(".json")
        size = self.output_shape(shape)  # bad shapes fail before anything is written
        check_outputs([output, std_path if int(samples) > 1 else None], dicom_out, [preview, report_path])
        if steps is not None:
            self.sampler.num_inference_steps = int(steps)
        if guidance is not None:
            if float(guidance) < 0:
                raise ValueError(f"guidance must be >= 0, got {guidance}")
            self.sampler.guidance = float(guidance)
        mean, std = self.generate_file(input, samples, seed, size)
        report: dict[str, Any] = {
            "input": str(input), "written": str(save_nifti(mean, output)), "shape": list(mean.shape[1:]),
            "spacing_mm": [float(s) for s in self.meta["spacing_mm"]], "steps": self.sampler.num_inference_steps,
            "guidance": self.sampler.guidance, "samples": int(samples), "seed": int(seed),
            "latent_shape": self.latent_shape(size), "latent_window": self.window, "windows": len(self.windows(size)),
            "seam_ratio": seam_ratio(mean, self.window_borders(size))}
        if std is not None:
            report["uncertainty"] = str(save_nifti(std, std_path))
            report["mean_std_hu"] = float(std.mean())
        if dicom_out:
            report["dicom_files"] = len(save_dicom_series(mean, dicom_out, series_description="ctsynth X-ray to CTPA"))
        if preview:
            from ctsynth.plots import save_triplanar_png

            report["preview"] = str(save_triplanar_png({"generated CTPA": mean}, preview, title=Path(input).name))
        report["seconds"] = time.perf_counter() - t0
        atomic_write_json(report, report_path)
        logger.info("generated %s from %s in %.1f s", output, input, report["seconds"])
        return report
