"""Thick -> thin slices with the trained latent diffusion model (``inference.json``, ``ctsynth interpolate
--method ldm``).

:class:`SliceInterpolator` reads a thick series (NIfTI, DICOM folder or zip), builds the thin grid (from the
first thick slice, at the target spacing, over the series' span; or an explicit grid), conditions on the thick
latents, samples K latents with DDIM over the whole depth, decodes them and returns their mean in HU and, when
K > 1, the per-voxel standard deviation (an uncertainty map, HU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

from ctsynth.atomic import atomic_write_json
from ctsynth.engine import load_network_weights, read_checkpoint_meta
from ctsynth.io import check_outputs, load_volume, save_dicom_series, save_nifti
from ctsynth.maisi import LatentCodec, load_maisi_autoencoder, unit_to_ct
from ctsynth.prepare import slice_spacing_mm
from ctsynth.slices import slab_extent_grid, slice_positions, thick_consistency

from .latents import ThickConditioner
from .sampling import LatentDiffusionSampler

__all__ = ["SliceInterpolator"]

logger = logging.getLogger(__name__)


class SliceInterpolator:
    """The trained model, ready to interpolate thick series.

    Args:
        network: the denoiser (``scripts.sampling.Denoiser``), weights loaded from ``checkpoint``.
        checkpoint: diffusion weights (``model.pt``); its meta gives the latent scale factor and conditioning mode.
        autoencoder_path: the MAISI-architecture autoencoder the model was trained with.
        scheduler: MONAI ``DDIMScheduler`` with the training schedule.
        num_inference_steps: DDIM steps.
        window / overlap: denoiser windows along latent depth.
        chunk / tile: autoencoder windows (slices, in-plane voxels).
        device: where to run.
        autoencoder_args: constructor overrides when the autoencoder file does not record its own.
        consistency: give each sample the band the thick series measured (``ctsynth.slices.thick_consistency``):
            the decoded volume keeps only what is finer than a thick slice, the rest comes from the thick series.
    """

    def __init__(self, network: nn.Module, checkpoint: str | Path, autoencoder_path: str | Path, scheduler: Any,
                 num_inference_steps: int = 50, window: int | None = 16, overlap: float = 0.25, chunk: int = 64,
                 tile: int | None = None, device: str | torch.device = "cpu",
                 autoencoder_args: dict[str, Any] | None = None, consistency: bool = False) -> None:
        self.device = torch.device(device)
        self.consistency = bool(consistency)
        meta = read_checkpoint_meta(checkpoint)
        if "scale_factor" not in meta or "conditioning" not in meta:
            raise ValueError(f"{checkpoint}: not a slice_interp_ldm diffusion checkpoint (its meta has no scale_factor/"
                             "conditioning); train one with bundles/slice_interp_ldm/configs/train.json")
        load_network_weights(network, checkpoint)
        self.network = network.to(self.device).eval()
        for key in ("prediction_type", "num_train_timesteps"):
            if key in meta and getattr(scheduler, key, meta[key]) != meta[key]:
                raise ValueError(f"{checkpoint} was trained with {key}={meta[key]!r} but the sampler is set to "
                                 f"{getattr(scheduler, key)!r}; pass --{key} {meta[key]} (or use `ctsynth interpolate "
                                 "--method ldm`, which reads it from the checkpoint)")
        ae = load_maisi_autoencoder(autoencoder_path, device=self.device, **(autoencoder_args or {}))
        self.codec = LatentCodec(ae, chunk=chunk, tile=tile, scale_factor=float(meta["scale_factor"]))
        self.conditioner = ThickConditioner(self.codec, meta["conditioning"])
        self.sampler = LatentDiffusionSampler(self.network, scheduler, num_inference_steps, window, overlap)
        self.meta = meta

    @torch.no_grad()
    def __call__(self, thick: MetaTensor, spacing_mm: float = 1.0, samples: int = 1, count: int | None = None,
                 offset_mm: float = 0.0, seed: int = 0,
                 consistency: bool | None = None) -> tuple[MetaTensor, MetaTensor | None]:
        """(1, X, Y, Z) thick volume in HU -> (mean, std) thin volumes (1, X, Y, Z') in HU on the thin grid
        (std None when ``samples`` is 1; ``consistency``: default the interpolator's). The grid has ``count``
        slices from ``offset_mm``; without ``count`` it covers the thick slabs edge to edge
        (:func:`ctsynth.slices.slab_extent_grid`)."""
        consistency = self.consistency if consistency is None else bool(consistency)
        if thick.ndim != 4 or thick.shape[0] != 1:
            raise ValueError(f"expected a (1, X, Y, Z) volume, got {tuple(thick.shape)}")
        if int(samples) < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        st = slice_spacing_mm(thick)
        if spacing_mm >= st:
            raise ValueError(f"target spacing {spacing_mm} mm is not finer than the input's {st:.3f} mm slice spacing; "
                             "choose a smaller --spacing")
        if count is None:
            count, offset_mm = slab_extent_grid(thick, spacing_mm)
        positions, affine = slice_positions(thick, spacing_mm=spacing_mm, count=count, offset_mm=offset_mm)
        n = int(positions.numel())
        cond = self.conditioner(thick.to(self.device), spacing_mm, n, offset_mm)
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        total = torch.zeros((1, *thick.shape[1:3], n), dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        measured = thick.cpu() if consistency else None
        for k in range(int(samples)):
            z = self.sampler(cond, generator=g)
            hu = MetaTensor(unit_to_ct(self.codec.decode(z, (*thick.shape[1:3], n)))[0].float().cpu(), affine=affine)
            if consistency:
                hu = thick_consistency(hu, measured)
            hu = hu.as_tensor().double()
            total += hu
            total_sq += hu * hu
            logger.info("sample %d/%d done", k + 1, samples)
        mean = total / samples
        std = (total_sq / samples - mean * mean).clamp_min(0).sqrt() if samples > 1 else None
        out = MetaTensor(mean.float(), affine=affine)
        return out, (MetaTensor(std.float(), affine=affine) if std is not None else None)

    def run(self, input: str, output: str, spacing: float = 1.0, samples: int = 1, uncertainty: str | None = None,
            dicom_out: str | None = None, preview: str | None = None, seed: int = 0,
            series_uid: str | None = None) -> dict[str, Any]:
        """Reads ``input``, writes the thin NIfTI (and the std map, a DICOM series, a preview); returns a report."""
        t0 = time.perf_counter()
        std_path = uncertainty or str(Path(output).with_name(Path(output).name.replace(".nii", "_std.nii")))
        report_path = Path(output).with_suffix("").with_suffix(".json")
        check_outputs([output, std_path if int(samples) > 1 else None], dicom_out, [preview, report_path])
        thick = load_volume(input, series_uid=series_uid)
        mean, std = self(thick, float(spacing), int(samples), seed=seed)
        report: dict[str, Any] = {"input": str(input), "input_slices": int(thick.shape[3]),
                                  "input_spacing_mm": slice_spacing_mm(thick), "written": str(save_nifti(mean, output)),
                                  "slices": int(mean.shape[3]), "spacing_mm": float(spacing), "samples": int(samples),
                                  "conditioning": self.meta["conditioning"], "consistency": self.consistency}
        if std is not None:
            report["uncertainty"] = str(save_nifti(std, std_path))
            report["mean_std_hu"] = float(std.mean())
        if dicom_out:
            ref = input if Path(input).is_dir() else None
            report["dicom_files"] = len(save_dicom_series(mean, dicom_out, reference=ref,
                                                          series_description=f"ctsynth ldm {float(spacing):g} mm"))
        if preview:
            from ctsynth.plots import save_triplanar_png

            report["preview"] = str(save_triplanar_png({"thin (ldm)": mean}, preview, title=Path(input).name))
        report["seconds"] = time.perf_counter() - t0
        atomic_write_json(report, report_path)
        return report
