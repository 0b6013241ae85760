"""Reconstruction of one study: radiographs + geometry -> CT NIfTI, previews and a consistency report.

The output grid is the cube the model was trained on: centred on ``reconstruction.center_mm`` of the
geometry file (written by ``ctsynth prepare``; else the isocentre) with side ``reconstruction.fov_mm``
(else ``--fov_mm``, else the detector's field of view at the isocentre divided by the 1.15 margin that
``ctsynth prepare`` leaves).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctsynth.atomic import atomic_write_json
from ctsynth.drr import DRRProjector
from ctsynth.engine import load_network_weights
from ctsynth.geometry import ProjectionGeometry, check_finite, cube_affine
from ctsynth.io import check_outputs, load_volume, save_nifti
from ctsynth.metrics import compute_image_metrics, psnr
from ctsynth.plots import save_triplanar_png
from ctsynth.prepare import resample_to_cube
from ctsynth.transforms import load_radiographs, normalize_radiograph, unscale_hu

from .network import rescale_affine

__all__ = ["CascadeReconstructor", "check_views", "reconstruction_grid"]

logger = logging.getLogger(__name__)

#: the margin ``ctsynth prepare`` leaves around the field of view on the detector
DETECTOR_MARGIN = 1.15
#: the largest field of view (mm) a reconstruction cube may span
MAX_FOV_MM = 2000.0


def reconstruction_grid(geometry_path: str | Path, fov_mm: float | None = None) -> tuple[float, torch.Tensor, str]:
    """(fov_mm, center_mm, how) of the output cube for a geometry file (see the module docstring)."""
    data = json.loads(Path(geometry_path).read_text())
    rec = data.get("reconstruction") or {}
    geom = ProjectionGeometry.from_dict(data, source=str(geometry_path))
    center = torch.as_tensor(rec.get("center_mm", data["isocenter_mm"]), dtype=torch.float64)
    check_finite("reconstruction.center_mm", center, str(geometry_path))
    if fov_mm is not None:
        check_finite("--fov_mm", fov_mm, "the command line", lo=1.0, hi=MAX_FOV_MM)
        return float(fov_mm), center, "given"
    if "fov_mm" in rec:
        check_finite("reconstruction.fov_mm", rec["fov_mm"], str(geometry_path), lo=1.0, hi=MAX_FOV_MM)
        return float(rec["fov_mm"]), center, "geometry file"
    rows, cols = geom.detector_shape
    side = min(rows * float(geom.pixel_spacing_mm[0]), cols * float(geom.pixel_spacing_mm[1]))
    fov = side / geom.magnification / DETECTOR_MARGIN
    logger.warning("%s has no reconstruction.fov_mm; using %.1f mm from the detector size (pass --fov_mm to set it)",
                   geometry_path, fov)
    return fov, center, "detector"



def check_views(xrays: Sequence[str | Path], geometry: str | Path) -> ProjectionGeometry:
    """The geometry of ``geometry`` after checking it describes one view per radiograph of ``xrays``.

    Raises:
        ValueError: the counts differ (names the geometry file, both counts and the fix).
    """
    geom = ProjectionGeometry.load_json(geometry)
    if len(xrays) != geom.num_views:
        raise ValueError(f"{geometry} describes {geom.num_views} views ({[float(a) for a in geom.angles_deg]} deg) "
                         f"but {len(xrays)} radiographs were given; pass one file per view, in that order")
    return geom

class CascadeReconstructor:
    """Loads a trained cascade once and reconstructs studies with :meth:`reconstruct`.

    Args:
        network: the network definition (same settings as training).
        checkpoint: weights file (``models/model.pt``).
        device: torch device.
        intensity_range: HU mapped to [0, 1] in training.
        num_stages: stages to run (default: as trained, from the checkpoint's ``meta.stage``).
    """

    def __init__(self, network: nn.Module, checkpoint: str, device: str | torch.device = "cpu",
                 intensity_range: Sequence[float] = (-1000, 1000), num_stages: int | None = None) -> None:
        meta = load_network_weights(network, checkpoint)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.num_stages = int(num_stages or meta.get("stage") or network.num_stages)
        self.intensity_range = tuple(float(v) for v in intensity_range)
        self.checkpoint = str(checkpoint)

    def reconstruct(self, xrays: Sequence[str], geometry: str, output: str, ground_truth: str | None = None,
                    save_stages: bool = False, preview: bool = True, fov_mm: float | None = None) -> dict[str, Any]:
        """Reconstructs one study.

        Args:
            xrays: one file per view, in the order of the geometry's angles (NIfTI line integrals as written by
                ``ctsynth prepare``, 8/16-bit PNG/TIFF or DICOM radiographs).
            geometry: the study's ``geometry.json``.
            output: CT NIfTI to write (HU, RAS affine).
            ground_truth: optional CT (any format ``ctsynth`` reads) to compare with.
            save_stages: also write each stage's output as ``<output>_stage<k>.nii.gz``.
            preview: write ``<output>.png`` (radiographs, prediction, ground truth and error).
            fov_mm: side of the output cube when the geometry file does not say.

        Returns:
            The report also written to ``<output>.json``.
        """
        xrays = [xrays] if isinstance(xrays, (str, Path)) else list(xrays)
        out_path = Path(output)
        stem = str(out_path)[: -len("".join(out_path.suffixes))] if out_path.suffixes else str(out_path)
        sizes = self.network.sizes[: self.num_stages]
        stage_paths = [f"{stem}_stage{k + 1}.nii.gz" for k in range(len(sizes) - 1)] if save_stages else []
        check_outputs([output, *stage_paths], files=[stem + ".json", stem + ".png" if preview else None])
        geom = check_views(xrays, geometry)
        raw = load_radiographs(xrays, expected_shape=geom.detector_shape)
        images = normalize_radiograph(raw)
        fov, center, how = reconstruction_grid(geometry, fov_mm)
        gt = load_volume(ground_truth) if ground_truth is not None else None  # a bad file stops before any write
        aff0 = cube_affine(sizes[0], fov, center)
        with torch.no_grad():
            outs = self.network(images[None].to(self.device), [geom.to(self.device)], aff0.to(self.device),
                                up_to_stage=self.num_stages - 1)
        volumes = []
        for k, s in enumerate(sizes):
            aff = rescale_affine(aff0, (sizes[0],) * 3, (s,) * 3)
            hu = unscale_hu(outs[k][0].float().cpu(), self.intensity_range)
            volumes.append((hu, aff))
            if save_stages and k < len(sizes) - 1:
                save_nifti(hu, stage_paths[k], affine=aff.numpy())
        pred, aff = volumes[-1]
        save_nifti(pred, out_path, affine=aff.numpy())
        report: dict[str, Any] = {"output": str(out_path), "checkpoint": self.checkpoint, "stages": self.num_stages,
                                  "size": sizes[-1], "fov_mm": fov, "fov_from": how, "spacing_mm": fov / sizes[-1],
                                  "inputs": [str(x) for x in xrays]}
        # re-projection consistency: the prediction's DRRs against the inputs (both percentile-normalised)
        with torch.no_grad():
            drr = DRRProjector(geom)(pred[None].float(), aff)[0]
        drr_n = normalize_radiograph(drr)
        per_view = psnr(drr_n[:, None], images[:, None], data_range=1.0)
        report["reprojection_psnr_db"] = [float(v) for v in per_view]
        report["reprojection_note"] = "PSNR between percentile-normalised input radiographs and DRRs of the prediction"
        volumes_png = {"prediction": pred[0]}
        if gt is not None:
            gt_cube = resample_to_cube(gt, sizes[-1], fov, center) if (
                tuple(gt.shape[1:]) != (sizes[-1],) * 3 or not torch.allclose(torch.as_tensor(gt.affine, dtype=torch.float64), aff, atol=1e-3)
            ) else gt
            volumes_png["ground truth"] = gt_cube.as_tensor()[0]
            report["metrics"] = {f"{w[0]}_{w[1]}": compute_image_metrics(pred, gt_cube.as_tensor(), window=w)
                                 for w in ((-1024, 3071), (-1000, 1000))}
        if preview:
            inputs = {f"input {v} ({float(a):g} deg)": images[v] for v, a in enumerate(geom.angles_deg)}
            inputs.update({f"DRR of prediction {v}": drr_n[v] for v in range(geom.num_views)})
            save_triplanar_png(volumes_png, stem + ".png", title=out_path.name, inputs=inputs,
                               error_of=("prediction", "ground truth") if ground_truth else None)
            report["preview"] = stem + ".png"
        atomic_write_json(report, stem + ".json")
        logger.info("reconstruction written to %s (re-projection PSNR %s dB)", out_path,
                    ", ".join(f"{v:.1f}" for v in report["reprojection_psnr_db"]))
        return report
