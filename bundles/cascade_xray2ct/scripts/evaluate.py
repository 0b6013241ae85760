"""Test-split evaluation of a trained cascade next to its baselines.

For every test case and every trained stage: the stage's prediction, the mean training volume, the
back-projection of the views and, from stage 2 on, the previous stage's prediction upsampled (trilinear) to
this stage's grid (what the stage must refine) and each separately trained baseline network (e.g. the U-Net
of ``unet_baseline.json``: its prediction resampled trilinear to every stage's grid), each compared with the
ground-truth cube of that stage's size by 3D PSNR, SSIM and MAE (HU) on each HU window, and re-projected onto
its input radiographs (:func:`ctsynth.metrics.reprojection_psnr`, the volume clipped to the window). Writes ``metrics.json`` (per
case and mean +- std), ``metrics.md`` (a table), ``metrics.png`` (PSNR per stage and method) and a tri-planar
preview of the first case.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ctsynth.atomic import atomic_write, atomic_write_json, atomic_write_text
from ctsynth.bundles import checkpoint_network
from ctsynth.drr import backprojection_reconstruction
from ctsynth.engine import load_network_weights
from ctsynth.io import load_volume
from ctsynth.metrics import compute_image_metrics, reprojection_psnr
from ctsynth.plots import save_triplanar_png
from ctsynth.prepare import load_datalist
from ctsynth.transforms import geometries_from_batch, load_geometry_json, load_radiographs, normalize_radiograph, unscale_hu

from .network import rescale_affine

__all__ = ["CascadeEvaluation", "METHODS"]

logger = logging.getLogger(__name__)
METHODS = ("cascade", "previous_stage", "mean_volume", "backprojection")
_METRICS = ("psnr", "ssim", "mae", "reprojection_psnr")


class CascadeEvaluation:
    """Evaluates ``network`` (weights from ``checkpoint``) on ``split`` of ``datalist``.

    Args:
        network: the network definition (same settings as training).
        checkpoint: weights (``models/model.pt``); its ``meta.stage`` says how many stages were trained.
        datalist: ``datalist.json`` from ``ctsynth prepare xray2ct``.
        output_dir: where the reports go.
        device: torch device.
        intensity_range: HU mapped to [0, 1] in training.
        windows: HU windows the metrics are computed on (data range = width).
        split: datalist split to evaluate.
        num_stages: stages to evaluate (default: as trained, from the checkpoint).
        baselines: name -> checkpoint of a separately trained network of this bundle (e.g. the U-Net baseline's
            ``model.pt``); each is rebuilt from its checkpoint's checked network record and evaluated as a method
            of that name, its last output resampled to every stage's grid. Names are words (letters, digits, ``_``)
            other than the built-in methods.

    Raises:
        ValueError: a baseline name that is not a word or is a built-in method, or a baseline checkpoint that
            records no network (a bare state dict), naming the file.
    """

    def __init__(self, network: nn.Module, checkpoint: str, datalist: str, output_dir: str,
                 device: str | torch.device = "cpu", intensity_range: Sequence[float] = (-1000, 1000),
                 windows: Sequence[Sequence[float]] = ((-1024, 3071), (-1000, 1000)), split: str = "test",
                 num_stages: int | None = None, baselines: Mapping[str, str] | None = None) -> None:
        self.network, self.checkpoint, self.datalist = network, checkpoint, datalist
        self.output_dir, self.device = Path(output_dir), torch.device(device)
        self.intensity_range = tuple(float(v) for v in intensity_range)
        self.windows = [tuple(float(v) for v in w) for w in windows]
        self.split, self.num_stages = split, num_stages
        self.baselines = dict(baselines or {})
        for name in self.baselines:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,40}", str(name)) or name in METHODS:
                raise ValueError(f"baseline name {str(name)[:60]!r} must be a word of letters, digits and '_' other "
                                 f"than {', '.join(METHODS)}; e.g. unet_baseline")
        self.methods = (*METHODS, *self.baselines)

    def _baseline_networks(self) -> dict[str, nn.Module]:
        """Each baseline rebuilt from its checkpoint's checked network record, weights loaded, in eval mode."""
        nets = {}
        for name, path in self.baselines.items():
            _, record = checkpoint_network("cascade_xray2ct", path)
            if record is None:
                raise ValueError(f"{path}: baseline {name!r} is a bare state dict with no network record; pass the "
                                 "model.pt its training run wrote (it records the network it was trained with)")
            net = record.cls(**record.args)
            load_network_weights(net, path)
            nets[name] = net.to(self.device).eval()
        return nets

    def _mean_volumes(self, sizes: Sequence[int]) -> dict[int, torch.Tensor]:
        entries = load_datalist(self.datalist, "training")
        means = {}
        for s in sizes:
            acc = None
            for e in entries:
                v = load_volume(e[f"image_{s}"]).as_tensor()
                acc = v.clone() if acc is None else acc + v
            means[s] = acc / len(entries)
        return means

    def run(self) -> dict[str, Any]:
        meta = load_network_weights(self.network, self.checkpoint)
        net = self.network.to(self.device).eval()
        n_stages = int(self.num_stages or meta.get("stage") or net.num_stages)
        sizes = list(net.sizes[:n_stages])
        cases = load_datalist(self.datalist, self.split)
        means = self._mean_volumes(sizes)
        baseline_nets = self._baseline_networks()
        rows: list[dict[str, Any]] = []
        preview: dict[str, torch.Tensor] = {}
        for i, case in enumerate(tqdm(cases, desc=f"evaluate {self.split}", unit="case")):
            li = load_radiographs(case["xrays"])
            geom = geometries_from_batch(load_geometry_json(case["geometry"]))[0]
            truth = {s: load_volume(case[f"image_{s}"]) for s in sizes}
            aff0 = rescale_affine(truth[sizes[-1]].affine, (sizes[-1],) * 3, (sizes[0],) * 3)
            with torch.no_grad():
                outs = net(normalize_radiograph(li)[None].to(self.device), [geom.to(self.device)], aff0.to(self.device),
                           up_to_stage=n_stages - 1)
                baseline_outs = {name: b(normalize_radiograph(li)[None].to(self.device), [geom.to(self.device)],
                                         rescale_affine(aff0, (sizes[0],) * 3, (b.sizes[0],) * 3).to(self.device))[-1]
                                 for name, b in baseline_nets.items()}
            for k, s in enumerate(sizes):
                preds = {"cascade": unscale_hu(outs[k][0].float().cpu(), self.intensity_range)}
                if k:
                    preds["previous_stage"] = _resampled(unscale_hu(outs[k - 1].float().cpu(), self.intensity_range), s)
                preds["mean_volume"] = means[s]
                preds["backprojection"] = backprojection_reconstruction(li, geom.cpu(), truth[s].affine, (s, s, s))
                for name, out in baseline_outs.items():
                    preds[name] = _resampled(unscale_hu(out.float().cpu(), self.intensity_range), s)
                for method, pred in preds.items():
                    for w in self.windows:
                        m = compute_image_metrics(pred, truth[s].as_tensor(), window=w)
                        rows.append({"case": case.get("id", str(i)), "stage": k + 1, "size": s, "method": method,
                                     "window": list(w), "psnr": m["psnr"], "ssim": m["ssim"], "mae": m["mae"],
                                     "reprojection_psnr": reprojection_psnr(pred, truth[s].affine, geom.cpu(), li, w)})
                if i == 0 and k == n_stages - 1:
                    preview = {"ground truth": truth[s].as_tensor()[0], **{m: p[0] for m, p in preds.items()}}
                    preview_inputs = {f"view {v} ({float(a):g} deg)": normalize_radiograph(li[v])
                                      for v, a in enumerate(geom.angles_deg)}
        summary = self._summarise(rows, sizes)
        report = {"split": self.split, "cases": len(cases), "checkpoint": str(self.checkpoint), "stages": n_stages,
                  "sizes": sizes, "baselines": {name: str(path) for name, path in self.baselines.items()},
                  "mode": "3d", "units": "psnr dB, ssim 1, mae HU",
                  "note": "data_range = window width; predictions clipped to the window",
                  "summary": summary, "per_case": rows}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(report, self.output_dir / "metrics.json")
        atomic_write_text(self.markdown(summary), self.output_dir / "metrics.md")
        self._plot(summary, sizes)
        if preview:
            save_triplanar_png(preview, self.output_dir / "preview.png", title=f"{cases[0].get('id', 'case 0')}",
                               error_of=("cascade", "ground truth"), inputs=preview_inputs)
        logger.info("evaluation written to %s\n%s", self.output_dir, self.markdown(summary))
        return report

    def _summarise(self, rows: list[dict[str, Any]], sizes: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        for k, s in enumerate(sizes):
            for w in self.windows:
                for method in self.methods:
                    sel = [r for r in rows if r["stage"] == k + 1 and r["method"] == method and r["window"] == list(w)]
                    if not sel:  # previous_stage at stage 1
                        continue
                    entry: dict[str, Any] = {"stage": k + 1, "size": s, "method": method, "window": list(w),
                                             "data_range": w[1] - w[0], "n": len(sel)}
                    for key in _METRICS:
                        vals = [r[key] for r in sel]
                        mean = sum(vals) / len(vals)
                        entry[key] = mean
                        entry[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
                    out.append(entry)
        return out

    @staticmethod
    def markdown(summary: list[dict[str, Any]]) -> str:
        """The summary as a Markdown table, one row per stage, window and method, with a note on the metrics."""
        lines = ["| stage | size | HU window | method | PSNR (dB) | SSIM | MAE (HU) | re-projection PSNR (dB) |",
                 "|---|---|---|---|---|---|---|---|"]
        for e in summary:
            lines.append(f"| {e['stage']} | {e['size']}^3 | [{e['window'][0]:g}, {e['window'][1]:g}] | {e['method']} | "
                         f"{e['psnr']:.2f} ± {e['psnr_std']:.2f} | {e['ssim']:.3f} ± {e['ssim_std']:.3f} | "
                         f"{e['mae']:.1f} ± {e['mae_std']:.1f} | "
                         f"{e['reprojection_psnr']:.2f} ± {e['reprojection_psnr_std']:.2f} |")
        lines.append("\n3D metrics over the whole cube; data range = window width; ± = standard deviation over the n "
                     "test cases of each row. Re-projection: DRRs of the volume (clipped to the window) against the "
                     "input radiographs' line integrals, data range = their maximum. previous_stage and separately "
                     "trained baselines are resampled (trilinear) to each stage's grid.")
        return "\n".join(lines) + "\n"

    def _plot(self, summary: list[dict[str, Any]], sizes: Sequence[int]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.windows), figsize=(5 * len(self.windows), 4), squeeze=False)
        width = 0.8 / len(self.methods)
        for ax, w in zip(axes[0], self.windows):
            for j, method in enumerate(self.methods):
                vals = [e for e in summary if e["method"] == method and e["window"] == list(w)]
                ax.bar([e["stage"] - 1 + j * width for e in vals], [e["psnr"] for e in vals], width,
                       yerr=[e["psnr_std"] for e in vals], label=method)
            ax.set_xticks([k + (len(self.methods) - 1) / 2 * width for k in range(len(sizes))],
                          [f"stage {k + 1} ({s}^3)" for k, s in enumerate(sizes)])
            ax.set_ylabel("3D PSNR (dB)")
            ax.set_title(f"HU window [{w[0]:g}, {w[1]:g}]")
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), self.output_dir / "metrics.png")
        plt.close(fig)


def _resampled(volume: torch.Tensor, size: int) -> torch.Tensor:
    """(1, 1, s, s, s) -> (1, size, size, size), trilinear (unchanged when already that size)."""
    if tuple(volume.shape[-3:]) != (size,) * 3:
        volume = F.interpolate(volume, size=(size,) * 3, mode="trilinear", align_corners=False)
    return volume[0]
