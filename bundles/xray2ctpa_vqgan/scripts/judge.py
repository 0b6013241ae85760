"""Stage 3: judging generated CTPA (``evaluate_generation.json``), the X-ray2CTPA paper's protocol.

A 3D PE classifier (a MONAI network, trained on real CTPA by ``train_classifier.json``) scores the real test
volumes and the volumes generated from their X-rays: if generation keeps the findings, the AUC on generated
volumes approaches the AUC on real ones (each AUC with its DeLong 95 % interval, ``ctsynth.metrics.roc_auc_ci``,
and ``n_judged``, the labelled volumes it rests on). Alongside: PSNR / SSIM / MAE of each generated volume against its
paired real CTPA (3D, [-1000, 1000] HU, data range 2000) next to the same metrics of the training set's mean
volume (the floor any X-ray-conditioned model must beat) and of the real volume encoded and decoded by the
VQ-GAN (``vqgan_ceiling``: no model generating its latents can do better), tri-planar previews of the first
cases, and the generated volumes themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn
from tqdm.auto import tqdm

from ctsynth.engine import load_network_weights
from ctsynth.io import load_volume, save_nifti
from ctsynth.metrics import compute_image_metrics, roc_auc_ci, write_metrics_report
from ctsynth.prepare import load_datalist, resample_to_shape
from ctsynth.transforms import scale_hu, unscale_hu

from .diffusion import decode_latents, encode_latents
from .generate import CTPAGenerator, xray_transform

__all__ = ["PEScorer", "XrayPEScorer", "xray_pe_scorer", "GenerationJudge"]

logger = logging.getLogger(__name__)


class PEScorer:
    """The trained PE classifier: CTPA in HU -> probability of PE.

    Args:
        network: the classifier (one logit out), weights loaded from ``checkpoint``.
        checkpoint: ``models/classifier.pt``.
        intensity_range: HU window of its [0, 1] input; None: the one its checkpoint records (else [-1000, 1000]).
        device: where to run.
    """

    def __init__(self, network: nn.Module, checkpoint: str | Path, intensity_range: Sequence[float] | None = None,
                 device: str | torch.device = "cpu") -> None:
        meta = load_network_weights(network, checkpoint)
        if intensity_range is None:
            intensity_range = meta.get("intensity_range", (-1000.0, 1000.0))
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.window = tuple(float(w) for w in intensity_range)

    @torch.no_grad()
    def __call__(self, volume_hu: torch.Tensor) -> float:
        """(1, X, Y, Z) HU -> P(PE)."""
        x = scale_hu(torch.as_tensor(volume_hu).float(), self.window)
        if x.ndim != 4:
            raise ValueError(f"expected a (1, X, Y, Z) volume, got {tuple(x.shape)}")
        return float(torch.sigmoid(self.network(x[None].to(self.device)).float().flatten()[0]))


class XrayPEScorer:
    """The X-ray-only PE classifier (``train_xray_classifier.json``): a radiograph file -> probability of PE, the
    paper's third number (what the X-ray alone tells).

    Args:
        network: the 2D classifier (one logit out), weights loaded from ``checkpoint``.
        checkpoint: ``models/xray_classifier.pt`` (records ``xray_size``).
        device: where to run.
    """

    def __init__(self, network: nn.Module, checkpoint: str | Path, device: str | torch.device = "cpu") -> None:
        meta = load_network_weights(network, checkpoint, require_meta=("xray_size",), not_this_kind=(
            "not an X-ray-only PE classifier; train one with train_classifier.json + train_xray_classifier.json"))
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.transform = xray_transform(int(meta["xray_size"]))

    @torch.no_grad()
    def __call__(self, xray_path: str | Path) -> float:
        x = torch.as_tensor(self.transform(str(xray_path))).float()
        return float(torch.sigmoid(self.network(x[None].to(self.device)).float().flatten()[0]))


def xray_pe_scorer(network: nn.Module, checkpoint: str | Path | None,
                   device: str | torch.device = "cpu") -> XrayPEScorer | None:
    """:class:`XrayPEScorer` of ``checkpoint``, or None without one (the judge then reports no X-ray-only AUC)."""
    return None if checkpoint is None else XrayPEScorer(network, checkpoint, device)


class GenerationJudge:
    """Generates a CTPA from each X-ray of a split and judges it against the real one (``run()``).

    Args:
        generator: the stage-2 model (:class:`scripts.generate.CTPAGenerator`).
        scorer: the PE classifier (:class:`PEScorer`); None: image metrics only.
        datalist / split / output_dir: the cases and where ``metrics.json``, ``metrics.md``, ``generated/`` and
            ``previews/`` go.
        samples / seed: samples per X-ray (their mean is judged) and the noise seed.
        previews: tri-planar PNGs (real, generated, |error|) of the first this many cases.
        baseline_split: split whose mean volume is the baseline (None: no baseline).
        xray_scorer: the X-ray-only PE classifier (:class:`XrayPEScorer`), scored on the same cases' X-rays
            (``auc_xray_only`` with its interval); None: none.
        guidance_sweep: guidance scales at which every case is generated again (same seeds) and scored, to show
            how much the X-ray steers the model (``summary["guidance_sweep"]``: mean PSNR / SSIM / MAE per scale,
            and ``guidance_spread_db``, the largest minus the smallest mean PSNR); empty: none.
    """

    def __init__(self, generator: CTPAGenerator, scorer: PEScorer | None, datalist: str | Path, output_dir: str | Path,
                 split: str = "test", samples: int = 1, seed: int = 0, previews: int = 3,
                 baseline_split: str | None = "training", guidance_sweep: Sequence[float] = (),
                 xray_scorer: XrayPEScorer | None = None) -> None:
        self.generator, self.scorer, self.baseline_split = generator, scorer, baseline_split
        self.xray_scorer = xray_scorer
        self.datalist, self.split, self.out = Path(datalist), split, Path(output_dir)
        self.samples, self.seed, self.previews = int(samples), int(seed), int(previews)
        self.guidance_sweep = [float(g) for g in guidance_sweep]
        bad = [g for g in self.guidance_sweep if not 0.0 <= g <= 50.0]
        if bad:
            raise ValueError(f"guidance_sweep scales must be in [0, 50], got {bad}")

    def mean_volume(self) -> torch.Tensor | None:
        """Voxel-wise mean (1, X, Y, Z) HU of the baseline split's volumes (None when they differ in shape)."""
        total, n = None, 0
        for e in load_datalist(self.datalist, self.baseline_split):
            v = load_volume(e["image"]).as_tensor().double()
            if total is not None and v.shape != total.shape:
                logger.warning("%s volumes differ in shape: no mean-volume baseline", self.baseline_split)
                return None
            total, n = (v if total is None else total + v), n + 1
        return (total / n).float() if n else None

    def _generate(self, entry: dict[str, Any], index: int, real: MetaTensor) -> MetaTensor:
        """The mean of ``samples`` volumes generated from ``entry``'s X-ray (seed ``seed + index``), on ``real``'s
        grid and in its frame (for viewing side by side)."""
        gen, _ = self.generator.generate_file(entry["xray"], self.samples, self.seed + index)
        if tuple(gen.shape[1:]) != tuple(real.shape[1:]):
            gen = resample_to_shape(gen, real.shape[1:])
        return MetaTensor(gen.as_tensor(), affine=real.affine)

    @torch.no_grad()
    def _ceiling(self, real: MetaTensor) -> torch.Tensor:
        """``real`` (1, X, Y, Z) HU encoded to its codes and decoded by the generator's VQ-GAN, in HU."""
        vq, window = self.generator.vqgan, self.generator.meta["intensity_range"]
        x = scale_hu(real.as_tensor().float(), window, clip=True)[None].to(self.generator.device)
        rec = decode_latents(vq, encode_latents(vq, x), 1.0, real.shape[1:], quantize=False)[0]
        return unscale_hu(rec.cpu(), window)

    def _sweep(self, entries: list[dict[str, Any]], main: dict[str, float]) -> list[dict[str, float]]:
        """Mean PSNR / SSIM / MAE (3D, [-1000, 1000] HU) of every case generated at each ``guidance_sweep`` scale
        (``main``: the means of the main pass, reused at its own scale: same seeds, same volumes)."""
        sampler = self.generator.sampler
        kept, rows = sampler.guidance, []
        try:
            for g in self.guidance_sweep:
                if g == kept:
                    rows.append({"guidance": g, **{k: main[k] for k in ("psnr", "ssim", "mae")}})
                    continue
                sampler.guidance = g
                scores = [compute_image_metrics(self._generate(e, i, real := load_volume(e["image"])), real,
                                                window=(-1000, 1000))
                          for i, e in enumerate(tqdm(entries, desc=f"guidance {g:g}", unit="case"))]
                rows.append({"guidance": g, **{k: sum(s[k] for s in scores) / len(scores) for k in ("psnr", "ssim", "mae")}})
        finally:
            sampler.guidance = kept
        return rows

    def run(self) -> dict[str, Any]:
        from ctsynth.plots import save_triplanar_png

        entries = load_datalist(self.datalist, self.split)
        if not entries:
            raise ValueError(f"{self.datalist}: the {self.split!r} split is empty")
        mean_vol = self.mean_volume() if self.baseline_split else None
        cases = []
        for i, e in enumerate(tqdm(entries, desc=f"generate {self.split}", unit="case")):
            real = load_volume(e["image"])
            gen = self._generate(e, i, real)
            row: dict[str, Any] = {"id": e.get("id"), "label": e.get("label"),
                                   "written": str(save_nifti(gen, self.out / "generated" / f"{e.get('id', i)}.nii.gz")),
                                   **compute_image_metrics(gen, real, window=(-1000, 1000))}
            row["vqgan_ceiling"] = compute_image_metrics(self._ceiling(real), real.as_tensor(), window=(-1000, 1000))
            if mean_vol is not None and tuple(mean_vol.shape) == tuple(real.shape):
                row["mean_volume"] = compute_image_metrics(mean_vol, real.as_tensor(), window=(-1000, 1000))
            if self.scorer is not None:
                row.update(p_pe_real=self.scorer(real), p_pe_generated=self.scorer(gen))
            if self.xray_scorer is not None:
                row["p_pe_xray_only"] = self.xray_scorer(e["xray"])
            if i < self.previews:
                save_triplanar_png({"real": real, "generated": gen}, self.out / "previews" / f"{e.get('id', i)}.png",
                                   title=str(e.get("id", i)), error_of=("generated", "real"))
            cases.append(row)
        summary: dict[str, Any] = {k: sum(c[k] for c in cases) / len(cases) for k in ("psnr", "ssim", "mae")}
        summary.update({f"vqgan_ceiling_{k}": sum(c["vqgan_ceiling"][k] for c in cases) / len(cases)
                        for k in ("psnr", "ssim", "mae")})
        summary["minus_vqgan_ceiling_psnr_db"] = summary["psnr"] - summary["vqgan_ceiling_psnr"]
        base = [c["mean_volume"] for c in cases if "mean_volume" in c]
        if base:
            summary.update({f"mean_volume_{k}": sum(b[k] for b in base) / len(base) for k in ("psnr", "ssim", "mae")})
            summary["minus_mean_volume_psnr_db"] = summary["psnr"] - summary["mean_volume_psnr"]
        summary.update(cases=len(cases), window_hu=[-1000.0, 1000.0], data_range_hu=2000.0, mode="3d",
                       steps=(1 if getattr(self.generator, "objective", "diffusion") == "regression"
                              else self.generator.sampler.num_inference_steps), guidance=self.generator.sampler.guidance,
                       samples=self.samples, objective=getattr(self.generator, "objective", "diffusion"),
                       conditioning=getattr(self.generator.network, "conditioning", None))
        if self.guidance_sweep and summary["objective"] == "regression":
            logger.info("a regression model ignores guidance: no guidance sweep")
        elif self.guidance_sweep:
            summary["guidance_sweep"] = self._sweep(entries, summary)
            psnrs = [r["psnr"] for r in summary["guidance_sweep"]]
            summary["guidance_spread_db"] = max(psnrs) - min(psnrs)
        labelled = [c for c in cases if c.get("label") is not None and "p_pe_real" in c]
        if self.scorer is not None:
            labels = [int(c["label"]) for c in labelled]
            summary.update(labelled_cases=len(labelled), n_judged=len(labelled), positives=sum(labels))
            names = ("real", "generated") + (("xray_only",) if self.xray_scorer is not None else ())
            for name in names:  # DeLong 95 % intervals
                auc = roc_auc_ci([c[f"p_pe_{name}"] for c in labelled], labels)
                summary[f"auc_{name}"] = auc["auc"] if auc else None
                summary[f"auc_{name}_ci"] = [auc["ci_low"], auc["ci_high"]] if auc else None
            if summary["auc_real"] is None:
                summary["auc_note"] = (f"AUC undefined: the {self.split!r} split's labelled cases hold one class only "
                                       f"({len(labelled)} cases, {sum(labels)} with PE)")
        report = {"split": self.split, "summary": summary, "cases": cases}
        write_metrics_report(self.out, report)
        logger.info("X-ray -> CTPA on %s: PSNR %.2f dB (training mean volume %s dB), SSIM %.3f ([-1000, 1000] HU, 3D); "
                    "AUC real %s, generated %s", self.split, summary["psnr"], summary.get("mean_volume_psnr"),
                    summary["ssim"], summary.get("auc_real"), summary.get("auc_generated"))
        return report
