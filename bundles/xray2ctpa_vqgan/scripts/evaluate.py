"""VQ-GAN evaluation (``evaluate.json``) and reconstruction of one volume (``reconstruct.json``).

For each volume of a split: the reconstruction through the codebook by the patch-wise path (overlapping windows,
the path that scales to 512 x 512 x 600) and, when the volume fits ``whole_max_voxels``, by the whole-volume path;
PSNR / SSIM / MAE in HU on [-1000, 1000] (3D, data range 2000); codebook usage and perplexity over all codes
of the split; and the seam measures: PSNR of the patch-wise against the whole-volume reconstruction (target:
within 0.3 dB of each other against the ground truth) and the seam ratio (step energy on window borders against
everywhere else; 1 = no visible seams).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from tqdm.auto import tqdm

from ctsynth.engine import load_network_weights
from ctsynth.io import load_volume, save_nifti
from ctsynth.metrics import compute_image_metrics, write_metrics_report
from ctsynth.prepare import load_datalist
from ctsynth.transforms import pad_to_multiple, scale_hu, unscale_hu
from ctsynth.vq import code_counts, perplexity_of_counts, usage_of_counts

from .vqgan import PatchwiseVQGAN, VQGAN3D

__all__ = ["VQGANReconstructor", "VQGANEvaluation"]

logger = logging.getLogger(__name__)


class VQGANReconstructor:
    """Volumes through the trained VQ-GAN: patch-wise always, whole-volume when small enough.

    Args:
        network: the VQ-GAN, weights loaded from ``checkpoint``.
        checkpoint: ``vqgan.pt`` written by training.
        intensity_range: HU window of the model's [0, 1] normalisation.
        roi_size / overlap / mode / norm_stats: the patch-wise windows (see :class:`PatchwiseVQGAN`).
        whole_max_voxels: largest volume also reconstructed in one pass (memory); 0: never.
        device: where windows run (stitching stays on CPU).
    """

    def __init__(self, network: VQGAN3D, checkpoint: str | Path, intensity_range: Sequence[float] = (-1000.0, 1000.0),
                 roi_size: Sequence[int] = (256, 256, 128), overlap: float = 0.25, mode: str = "gaussian",
                 whole_max_voxels: int = 256 * 256 * 128, device: str | torch.device = "cpu",
                 norm_stats: str = "window") -> None:
        load_network_weights(network, checkpoint)
        self.device = torch.device(device)
        self.net = network.to(self.device).eval()
        self.window = tuple(float(w) for w in intensity_range)
        self.roi_size, self.overlap, self.mode, self.whole_max_voxels = roi_size, overlap, mode, int(whole_max_voxels)
        self.norm_stats = norm_stats

    @torch.no_grad()
    def reconstruct(self, volume_hu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, PatchwiseVQGAN]:
        """(1, X, Y, Z) HU -> (patch-wise HU, whole-volume HU or None, code counts, the codec)."""
        x = scale_hu(torch.as_tensor(volume_hu).float(), self.window)[None]
        size = x.shape[-3:]
        codec = PatchwiseVQGAN.fitted(self.net, size, self.roi_size, overlap=self.overlap, mode=self.mode,
                                      device=self.device, norm_stats=self.norm_stats)
        patch = codec.reconstruct(x)[0]
        xp = pad_to_multiple(x, self.net.downsample)
        n = self.net.quantizer.num_embeddings
        whole = None
        if xp[0, 0].numel() <= self.whole_max_voxels:
            rec, _, idx = self.net(xp.to(self.device))
            whole = unscale_hu(rec.float().clamp(0, 1).cpu()[..., :size[0], :size[1], :size[2]][0], self.window)
            counts = code_counts(idx, n)
        else:  # codes of the windows the patch-wise path used
            counts = torch.zeros(n, dtype=torch.float64)
            for sl in codec.windows(xp.shape[-3:]):
                counts += code_counts(self.net.encode(xp[(..., *sl)].to(self.device))[2], n)
        return unscale_hu(patch.clamp(0, 1), self.window), whole, counts, codec

    def reconstruct_file(self, input: str, output: str, preview: str | None = None) -> dict[str, Any]:
        """``reconstruct.json``: one CTPA (NIfTI, DICOM folder or zip) through the codebook, patch-wise."""
        vol = load_volume(input)
        patch, _, counts, codec = self.reconstruct(vol)
        out = MetaTensor(patch, affine=vol.affine)
        report = {"input": str(input), "written": str(save_nifti(out, output)),
                  "metrics_vs_input": compute_image_metrics(out, vol, window=(-1000, 1000)),
                  "codebook_usage_pct": 100.0 * usage_of_counts(counts), "seam_ratio": codec.seam_ratio(patch)}
        if preview:
            from ctsynth.plots import save_triplanar_png

            report["preview"] = str(save_triplanar_png({"input": vol, "VQ-GAN": out}, preview, error_of=("VQ-GAN", "input")))
        return report


class VQGANEvaluation(VQGANReconstructor):
    """The evaluation of a split (``run()``); arguments as :class:`VQGANReconstructor` plus ``datalist``,
    ``output_dir``, ``split`` and ``max_cases`` (the split's first that many cases; None: all; the summary's
    ``cases`` says how many were scored)."""

    def __init__(self, network: VQGAN3D, checkpoint: str | Path, datalist: str | Path, output_dir: str | Path,
                 split: str = "test", max_cases: int | None = None, **kwargs: Any) -> None:
        if max_cases is not None and int(max_cases) < 1:
            raise ValueError(f"max_cases must be >= 1 (or None: every case), got {max_cases}")
        self.max_cases = None if max_cases is None else int(max_cases)
        super().__init__(network, checkpoint, **kwargs)
        self.datalist, self.split, self.out = Path(datalist), split, Path(output_dir)

    def run(self) -> dict[str, Any]:
        entries = load_datalist(self.datalist, self.split)[:self.max_cases]
        cases, total = [], None
        for e in tqdm(entries, desc=f"evaluate {self.split}", unit="volume"):
            vol = load_volume(e["image"])
            t = time.perf_counter()
            patch, whole, counts, codec = self.reconstruct(vol)
            row: dict[str, Any] = {"id": e.get("id"), "label": e.get("label"), "shape": list(vol.shape[1:]),
                                   "seconds": time.perf_counter() - t}
            row["patchwise"] = compute_image_metrics(patch, vol, window=(-1000, 1000))
            row["seam_ratio_patchwise"] = codec.seam_ratio(patch)
            if whole is not None:
                row["whole"] = compute_image_metrics(whole, vol, window=(-1000, 1000))
                row["seam_ratio_whole"] = codec.seam_ratio(whole)  # same borders, no windows: the reference
                row["patchwise_minus_whole_db"] = row["patchwise"]["psnr"] - row["whole"]["psnr"]
                row["patchwise_vs_whole_psnr_db"] = compute_image_metrics(patch, whole, window=(-1000, 1000))["psnr"]
            total = counts if total is None else total + counts
            cases.append(row)

        def mean(key: str, sub: str | None = None) -> float | None:
            vals = [c[key][sub] if sub else c[key] for c in cases if key in c]
            return sum(vals) / len(vals) if vals else None

        summary = {
            "psnr_patchwise": mean("patchwise", "psnr"), "ssim_patchwise": mean("patchwise", "ssim"),
            "mae_patchwise_hu": mean("patchwise", "mae"), "psnr_whole": mean("whole", "psnr"),
            "patchwise_minus_whole_db": mean("patchwise_minus_whole_db"),
            "seam_ratio_patchwise": mean("seam_ratio_patchwise"), "seam_ratio_whole": mean("seam_ratio_whole"),
            "codebook_usage_pct": 100.0 * usage_of_counts(total), "perplexity": perplexity_of_counts(total),
            "window_hu": [-1000.0, 1000.0], "data_range_hu": 2000.0, "mode": "3d",
            "roi_size": [int(r) for r in self.roi_size], "overlap": self.overlap, "blend": self.mode,
            "norm_stats": self.norm_stats, "cases": len(cases),
        }
        report = {"split": self.split, "summary": summary, "cases": cases}
        write_metrics_report(self.out, report)
        logger.info("VQ-GAN %s: PSNR %.2f dB patch-wise ([-1000, 1000] HU, 3D), usage %.1f %%, perplexity %.1f",
                    self.split, summary["psnr_patchwise"], summary["codebook_usage_pct"], summary["perplexity"])
        return report
