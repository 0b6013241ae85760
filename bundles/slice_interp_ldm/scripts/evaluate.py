"""Evaluation on the test split (``evaluate.json``): the diffusion model next to linear and cubic interpolation,
the autoencoder's ceiling and the fast refiners, in HU, 3D and per slice, on two windows.

Per case, every method predicts the thin series on the thin series' own grid (spacing, slice count and the
offset of its first slice from the thick series'), and is compared with it:

* ``linear`` / ``cubic``: interpolation of the thick slices;
* ``vae_ceiling``: the thin series encoded and decoded by the autoencoder (no model working in its latent
  space can do better);
* ``ldm``: the latent diffusion model (DDIM, ``samples`` averaged);
* ``refiner``: the fast paired model (``ctsynth.slices.SliceRefiner`` from ``refiner_path``);
* ``self_supervised``: a refiner fitted on each thick series alone (SMORE-style), never seeing the thin one;
* ``<method>_consistent`` (:data:`CONSISTENT_METHODS`): that method's prediction given the band the thick series
  measured (``ctsynth.slices.thick_consistency``); ``cubic_consistent`` shows what the step alone does.

Writes ``metrics.json`` (per case and mean), ``metrics.md`` and, per case, a coronal/sagittal reformat PNG.
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

from ctsynth.atomic import atomic_write_json, atomic_write_text
from ctsynth.io import load_volume
from ctsynth.maisi import ct_to_unit, unit_to_ct
from ctsynth.metrics import compute_image_metrics, hu_fidelity, summarise_hu_fidelity
from ctsynth.plots import save_reformat_png
from ctsynth.prepare import load_datalist, slice_spacing_mm
from ctsynth.slices import (fit_self_supervised_refiner, interpolate_onto, load_refiner, refine_volume,
                            thick_consistency, thin_grid_offset_mm)

from .inference import SliceInterpolator

__all__ = ["EVALUATION_METHODS", "CONSISTENT_METHODS", "SliceInterpEvaluation"]

logger = logging.getLogger(__name__)
_BASE_METHODS = ("linear", "cubic", "vae_ceiling", "ldm", "refiner", "self_supervised")
#: methods scored once more after :func:`ctsynth.slices.thick_consistency`
CONSISTENT_METHODS = tuple(f"{m}_consistent" for m in ("cubic", "ldm", "refiner", "self_supervised"))
EVALUATION_METHODS = _BASE_METHODS + CONSISTENT_METHODS
METRIC_MODES = ("3d", "per-slice")


class SliceInterpEvaluation:
    """Runs the evaluation (``run()``) and returns its summary.

    Args:
        datalist: the prepared datalist JSON.
        output_dir: where metrics and figures go.
        interpolator: the trained model (needed by ``ldm`` and ``vae_ceiling``).
        methods: subset of :data:`EVALUATION_METHODS`.
        split: datalist split.
        windows: HU windows of the metrics (data range = window width).
        samples: diffusion samples averaged per case.
        refiner_path: paired refiner weights (``refiner``).
        self_supervised_steps: fitting steps of the per-case self-supervised refiner.
        seed: sampling / fitting seed.
    """

    def __init__(self, datalist: str | Path, output_dir: str | Path, interpolator: SliceInterpolator | None = None,
                 methods: Sequence[str] = ("linear", "cubic", "vae_ceiling", "ldm"), split: str = "test",
                 windows: Sequence[Sequence[float]] = ((-1024, 3071), (-1000, 1000)), samples: int = 1,
                 refiner_path: str | Path | None = None, self_supervised_steps: int = 400, seed: int = 0) -> None:
        unknown = sorted(set(methods) - set(EVALUATION_METHODS))
        if unknown:
            raise ValueError(f"unknown evaluation methods {unknown}; choose from {EVALUATION_METHODS}")
        if interpolator is None and {"ldm", "ldm_consistent", "vae_ceiling"} & set(methods):
            raise ValueError("methods ldm, ldm_consistent and vae_ceiling need the trained model (interpolator)")
        if {"refiner", "refiner_consistent"} & set(methods) and not refiner_path:
            raise ValueError("method refiner needs refiner_path (a model from `ctsynth interpolate ... --save-model` "
                             "or the demo's paired refiner)")
        self.datalist, self.out = Path(datalist), Path(output_dir)
        self.interpolator, self.methods, self.split = interpolator, list(methods), split
        self.windows = [[float(w[0]), float(w[1])] for w in windows]
        self.samples, self.refiner_path, self.ss_steps, self.seed = int(samples), refiner_path, int(self_supervised_steps), seed
        self._refiner = None

    def predict(self, method: str, thick: MetaTensor, thin: MetaTensor,
                done: dict[str, MetaTensor] | None = None) -> MetaTensor:
        """``method``'s thin volume (HU) on ``thin``'s grid (``done``: this case's predictions so far, reused by
        the ``_consistent`` methods)."""
        if method in CONSISTENT_METHODS:
            base = method[: -len("_consistent")]
            pred = (done or {}).get(base)
            return thick_consistency(pred if pred is not None else self.predict(base, thick, thin), thick)
        sn, n, offset = slice_spacing_mm(thin), int(thin.shape[3]), thin_grid_offset_mm(thick, thin)
        if method in ("linear", "cubic"):
            return interpolate_onto(thick, thin, mode=method)
        if method == "vae_ceiling":
            rec = self.interpolator.codec.reconstruct(ct_to_unit(thin.as_tensor().float())[None])
            return MetaTensor(unit_to_ct(rec)[0].cpu(), affine=thin.affine)
        if method == "ldm":
            return self.interpolator(thick, sn, self.samples, count=n, offset_mm=offset, seed=self.seed)[0]
        if method == "refiner":
            self._refiner = self._refiner or load_refiner(self.refiner_path)
            model = self._refiner
        else:
            model = fit_self_supervised_refiner(thick, steps=self.ss_steps, seed=self.seed, progress=False, spacing_mm=sn)
        return refine_volume(model, interpolate_onto(thick, thin), progress=False)

    def run(self) -> dict[str, Any]:
        entries = load_datalist(self.datalist, self.split)
        cases, seconds = [], {m: 0.0 for m in self.methods}
        for e in tqdm(entries, desc=f"evaluate {self.split}", unit="case"):
            thick, thin = load_volume(e["thick"]), load_volume(e["thin"])
            preds = {}
            for m in self.methods:
                t = time.perf_counter()
                preds[m] = self.predict(m, thick, thin, preds)
                seconds[m] += time.perf_counter() - t
                if tuple(preds[m].shape) != tuple(thin.shape):
                    raise RuntimeError(f"{m} produced {tuple(preds[m].shape)} for a {tuple(thin.shape)} thin series")
            row: dict[str, Any] = {"id": e.get("id"), "category": e.get("category"), "metrics": [],
                                   "hu_fidelity": {m: hu_fidelity(p, thin) for m, p in preds.items()}}
            for m, p in preds.items():
                for w in self.windows:
                    for mode in METRIC_MODES:
                        r = compute_image_metrics(p, thin, window=w, mode=mode, slice_axis=2)
                        row["metrics"].append({"method": m, "window": w, "mode": mode, "psnr": r["psnr"],
                                               "ssim": r["ssim"], "mae": r["mae"]})
            aff = torch.as_tensor(thin.affine, dtype=torch.float64)
            spacing = [float(aff[:3, i].norm()) for i in range(3)]
            shown = {"ground truth": thin, **{m: preds[m] for m in ("cubic", "ldm", "refiner", "self_supervised")
                                              if m in preds}}
            name = str(e.get("id", len(cases))).replace("/", "__")
            row["reformat_png"] = str(save_reformat_png(shown, self.out / "reformats" / f"{name}.png", spacing,
                                                        title=str(e.get("id", ""))))
            cases.append(row)
        summary = []
        for m in self.methods:
            for w in self.windows:
                for mode in METRIC_MODES:
                    rows = [r for c in cases for r in c["metrics"] if r["method"] == m and r["window"] == w
                            and r["mode"] == mode]
                    summary.append({"method": m, "window": w, "mode": mode, "data_range": w[1] - w[0],
                                    **{k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "mae")}})
        hu = [{"method": m, **summarise_hu_fidelity([c["hu_fidelity"][m] for c in cases])} for m in self.methods]
        report = {"split": self.split, "cases": cases, "summary": summary, "hu_fidelity": hu, "samples": self.samples,
                  "seconds_per_case": {m: s / max(len(cases), 1) for m, s in seconds.items()},
                  "definitions": {"psnr": "dB, data range = window width", "mae": "HU", "3d": "one value per volume",
                                  "per-slice": "2D metrics averaged over axial slices",
                                  "hu_fidelity": "mean(pred - truth) HU within the truth's lung (< -500 HU), soft "
                                                 "tissue [-200, 300) and bone (>= 300); LAA-950: % of lung voxels "
                                                 "below -950 HU, prediction minus truth (percentage points)"}}
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(report, self.out / "metrics.json")
        lines = ["| method | window (HU) | mode | PSNR (dB) | SSIM | MAE (HU) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | [{r['window'][0]:g}, {r['window'][1]:g}] | {r['mode']} | {r['psnr']:.2f} | "
                  f"{r['ssim']:.4f} | {r['mae']:.1f} |" for r in summary]
        lines += ["", "| method | lung shift (HU) | soft tissue shift (HU) | bone shift (HU) | LAA-950 pred - truth (pp) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {_num(r['lung_shift_hu'])} | {_num(r['soft_tissue_shift_hu'])} | "
                  f"{_num(r['bone_shift_hu'])} | {_num(r['laa950_diff_pct'], 2)} |" for r in hu]
        atomic_write_text("\n".join(lines) + "\n", self.out / "metrics.md")
        logger.info("evaluation of %d %s cases written to %s", len(cases), self.split, self.out)
        return report


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"
