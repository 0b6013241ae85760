"""``ctsynth demo``: end-to-end runs on built-in phantoms, one per system.

Each demo writes under ``OUT/<name>/`` and ends with ``OUT/<name>/metrics.json``. Bundles register
theirs in :data:`DEMOS` (looked up by ``--bundle``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctsynth.drr import DRRProjector, display_image
from ctsynth.geometry import ProjectionGeometry
from ctsynth.io import save_nifti, save_projection_nifti
from ctsynth.metrics import compute_image_metrics
from ctsynth.phantoms import slab_average, thorax_phantom
from ctsynth.plots import save_image_png, save_triplanar_png

__all__ = ["DEMOS", "foundation_demo", "run_demo"]

logger = logging.getLogger(__name__)


def foundation_demo(out: str | Path, n: int = 3, shape: Sequence[int] = (128, 128, 128), spacing: float = 3.0,
                    seed: int = 0, **_: Any) -> dict[str, Any]:
    """Phantoms -> NIfTI, AP + lateral DRRs (NIfTI + PNG + geometry.json), previews and a metrics JSON.

    The metrics compare two naive reconstructions with each phantom (they are the floors the bundles
    must beat): 5x slab-averaged slices linearly re-interpolated, and the mean of all phantoms.
    """
    root = Path(out) / "foundation"
    root.mkdir(parents=True, exist_ok=True)
    vols, report = [], {"phantoms": [], "drr": {}, "baselines": {}}
    for i in tqdm(range(n), desc="phantoms", unit="vol"):
        vol, info = thorax_phantom(shape, spacing, seed=seed + i, contrast=(i % 2 == 1), emboli=0.5)
        save_nifti(vol, root / "phantoms" / f"phantom_{i:03d}.nii.gz")
        vols.append(vol)
        report["phantoms"].append({"file": f"phantoms/phantom_{i:03d}.nii.gz", "seed": info.seed,
                                   "contrast": info.contrast, "emboli": info.emboli,
                                   "hu_min": float(vol.min()), "hu_max": float(vol.max())})
    geom = ProjectionGeometry.for_volume(vols[0].affine, shape, views="ap,lateral", detector_shape=(256, 256),
                                         pixel_spacing_mm=float(max(shape) * spacing * 1.3 / 256))
    geom.save_json(root / "drr" / "geometry.json")
    proj = DRRProjector(geom)
    times = []
    for i, vol in enumerate(tqdm(vols, desc="DRRs", unit="vol")):
        t0 = time.perf_counter()
        with torch.no_grad():
            li = proj(vol[None], vol.affine)[0]
        times.append((time.perf_counter() - t0) / geom.num_views)
        for v, name in enumerate(("ap", "lateral")):
            save_projection_nifti(li[v], root / "drr" / f"phantom_{i:03d}_{name}.nii.gz", geom.pixel_spacing_mm.tolist())
            save_image_png(display_image(li[v]), root / "drr" / f"phantom_{i:03d}_{name}.png", 0.0, 1.0)
        save_triplanar_png({"phantom": vol}, root / "previews" / f"phantom_{i:03d}.png", title=f"phantom {i}")
    report["drr"] = {"seconds_per_view_mean": sum(times) / len(times), "geometry": "drr/geometry.json",
                     "max_line_integral": float(li.max())}
    mean_vol = torch.stack([v.as_tensor() for v in vols]).mean(0)
    for name in ("slab5_linear", "mean_volume"):
        rows = []
        for vol in vols:
            if name == "slab5_linear":
                thick = slab_average(vol, 5)
                pred = F.interpolate(thick.as_tensor()[None], size=vol.shape[1:], mode="trilinear",
                                     align_corners=False)[0]
            else:
                pred = mean_vol
            rows.append(compute_image_metrics(pred, vol, window=(-1000, 1000)))
        report["baselines"][name] = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "mae")}
        report["baselines"][name].update(window=[-1000, 1000], data_range=2000, mode="3d")
    (root / "metrics.json").write_text(json.dumps(report, indent=2))
    logger.info("foundation demo written to %s", root)
    return report


DEMOS: dict[str, Callable[..., dict[str, Any]]] = {"foundation": foundation_demo}


def run_demo(out: str | Path = "demo_out", bundle: str = "all", **kwargs: Any) -> dict[str, Any]:
    """Runs one demo (``bundle``) or all of them in order."""
    names = list(DEMOS) if bundle == "all" else [bundle]
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise ValueError(f"unknown demo {unknown}; choose from {['all', *DEMOS]}")
    return {name: DEMOS[name](out, **kwargs) for name in names}
