"""X-ray -> CTPA with the trained stage-2 model (``inference.json``, ``ctsynth generate``).

:class:`CTPAGenerator` reads a chest radiograph (PNG/JPEG/TIFF, DICOM or the NIfTI line integrals of
``ctsynth prepare ctpa``), normalises it as in training (:func:`xray_transform`), samples K latent volumes
with guided DDIM, decodes them through the VQ-GAN and returns their mean in HU (and the per-voxel standard
deviation when K > 1) on the training grid (shape and voxel size recorded in the checkpoint, centred on 0).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Resize
from torch import nn

from ctsynth.atomic import atomic_write_json
from ctsynth.engine import load_network_weights
from ctsynth.io import check_outputs, save_dicom_series, save_nifti
from ctsynth.transforms import LoadRadiographs, NormalizeRadiograph, unscale_hu

from .diffusion import OBJECTIVES, GuidedSampler, decode_latents, load_vqgan

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
    """

    def __init__(self, network: nn.Module, checkpoint: str | Path, vqgan_path: str | Path, scheduler: Any,
                 num_inference_steps: int = 50, guidance: float = 1.0, quantize: bool = True,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        meta = load_network_weights(network, checkpoint, require_meta=STAGE2_META_KEYS, not_this_kind=(
            "not an xray2ctpa_vqgan stage-2 checkpoint; train one with bundles/xray2ctpa_vqgan/configs/train_diffusion.json"))
        for key in ("prediction_type", "num_train_timesteps"):
            if key in meta and getattr(scheduler, key, meta[key]) != meta[key]:
                raise ValueError(f"{checkpoint} was trained with {key}={meta[key]!r} but the sampler is set to "
                                 f"{getattr(scheduler, key)!r}; pass --{key} {meta[key]} (`ctsynth generate` reads it "
                                 "from the checkpoint)")
        self.network = network.to(self.device).eval()
        self.vqgan = load_vqgan(vqgan_path, self.device)
        if self.vqgan.config["embedding_dim"] != getattr(network, "latent_channels", self.vqgan.config["embedding_dim"]):
            raise ValueError(f"{vqgan_path} has {self.vqgan.config['embedding_dim']}-channel codes but {checkpoint} was "
                             f"trained on {network.latent_channels}; use the VQ-GAN the diffusion model was trained with")
        objective = meta.get("objective", "diffusion")
        if objective not in OBJECTIVES:
            raise ValueError(f"{checkpoint}: meta key 'objective' is {str(objective)[:40]!r}, not one of {OBJECTIVES}; "
                             "use a checkpoint written by train_diffusion.json (or with regression.json)")
        self.objective = objective
        self.sampler = GuidedSampler(self.network, scheduler, num_inference_steps, guidance, objective=objective)
        self.quantize, self.meta = quantize, meta
        self.transform = xray_transform(int(meta["xray_size"]))

    def affine(self) -> torch.Tensor:
        """RAS affine of the output grid: the training voxel size (mm), centred on the origin."""
        sp = torch.tensor([float(s) for s in self.meta["spacing_mm"]], dtype=torch.float64)
        shape = torch.tensor([int(s) for s in self.meta["volume_shape"]], dtype=torch.float64)
        aff = torch.eye(4, dtype=torch.float64)
        aff[:3, :3] = torch.diag(sp)
        aff[:3, 3] = -sp * (shape - 1) / 2
        return aff

    @torch.no_grad()
    def __call__(self, xray: torch.Tensor, samples: int = 1, seed: int = 0) -> tuple[MetaTensor, MetaTensor | None]:
        """(1, H, W) normalised radiograph (from :attr:`transform`) -> (mean, std) CTPA (1, X, Y, Z) in HU
        (std None when ``samples`` is 1)."""
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        x = torch.as_tensor(xray).float()
        x = x.as_tensor() if isinstance(x, MetaTensor) else x  # a plain tensor: the output gets our affine only
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(f"expected a (1, H, W) radiograph, got {tuple(x.shape)}")
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        shape = self.meta["volume_shape"]
        total = torch.zeros((1, *shape), dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for k in range(int(samples)):
            z = self.sampler(x[None].to(self.device), self.meta["latent_shape"], generator=g)
            img = decode_latents(self.vqgan, z, float(self.meta["scale_factor"]), shape, self.quantize)[0].cpu()
            hu = unscale_hu(img, self.meta["intensity_range"]).double()
            total += hu
            total_sq += hu * hu
            logger.info("sample %d/%d done", k + 1, samples)
        mean = total / samples
        std = (total_sq / samples - mean * mean).clamp_min(0).sqrt() if samples > 1 else None
        aff = self.affine()
        return MetaTensor(mean.float(), affine=aff), (MetaTensor(std.float(), affine=aff) if std is not None else None)

    def generate_file(self, input: str | Path, samples: int = 1, seed: int = 0) -> tuple[MetaTensor, MetaTensor | None]:
        """Reads and normalises the radiograph ``input``, then :meth:`__call__`."""
        return self(self.transform(str(input)), samples, seed)

    def run(self, input: str, output: str, steps: int | None = None, guidance: float | None = None, samples: int = 1,
            seed: int = 0, dicom_out: str | None = None, preview: str | None = None) -> dict[str, Any]:
        """Reads ``input``, writes the CTPA NIfTI (and the std map when ``samples`` > 1, a DICOM series, a tri-planar
        PNG); returns a report (also written beside ``output`` as JSON)."""
        t0 = time.perf_counter()
        std_path = str(output).replace(".nii", "_std.nii")
        report_path = Path(output).with_suffix("").with_suffix(".json")
        check_outputs([output, std_path if int(samples) > 1 else None], dicom_out, [preview, report_path])
        if steps is not None:
            self.sampler.num_inference_steps = int(steps)
        if guidance is not None:
            if float(guidance) < 0:
                raise ValueError(f"guidance must be >= 0, got {guidance}")
            self.sampler.guidance = float(guidance)
        mean, std = self.generate_file(input, samples, seed)
        report: dict[str, Any] = {
            "input": str(input), "written": str(save_nifti(mean, output)), "shape": list(mean.shape[1:]),
            "spacing_mm": [float(s) for s in self.meta["spacing_mm"]], "steps": self.sampler.num_inference_steps,
            "guidance": self.sampler.guidance, "samples": int(samples), "seed": int(seed)}
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
