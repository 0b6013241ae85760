"""Image-quality metrics in Hounsfield units, each report stating how it was computed.

PSNR depends on its data range and on 3D vs slice-averaged computation (several dB apart), SSIM on its
``data_range``. So every result carries the HU ``window`` (values are clipped to it), the
``data_range`` (``window[1] - window[0]`` HU), the ``mode`` (``"3d"`` or ``"per-slice"``) and whether a
body ``mask`` restricted it.

Consistency with the acquisition: :func:`reprojection_psnr`, how well a volume's DRRs match the radiographs it
was reconstructed from.

Detection: :func:`roc_auc_ci`, the area under the ROC curve with a confidence interval (DeLong, or a stratified
bootstrap).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs
from scipy.stats import rankdata

from ctsynth.atomic import atomic_write_json, atomic_write_text
from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry

__all__ = ["METRIC_MODES", "HU_REGIONS", "hu_fidelity", "summarise_hu_fidelity", "same_grid", "ssim_window", "ms_ssim_weights", "ssim", "ms_ssim", "psnr", "compute_image_metrics",
           "write_metrics_report", "AUC_CI_METHODS", "roc_auc_ci", "window_borders", "seam_ratio", "reprojection_psnr"]

METRIC_MODES = ("3d", "per-slice")
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
PSNR_CAP_DB = 100.0


#: tissue classes of :func:`hu_fidelity`, by the ground truth's HU: [low, high)
HU_REGIONS: dict[str, tuple[float, float]] = {"lung": (-math.inf, -500.0), "soft_tissue": (-200.0, 300.0),
                                              "bone": (300.0, math.inf)}


def hu_fidelity(pred_hu: torch.Tensor, target_hu: torch.Tensor, regions: Mapping[str, Sequence[float]] = HU_REGIONS,
                laa_threshold_hu: float = -950.0, lung: str = "lung") -> dict[str, Any]:
    """HU bias of a prediction by tissue, and the emphysema index it implies, against the ground truth.

    Regions are set by the ground truth's HU (``regions``: name -> [low, high)). For each: the mean signed
    difference ``mean(pred - target)`` (HU). LAA-950 (low-attenuation area) is the percentage of the ``lung``
    region's voxels below ``laa_threshold_hu``, in the prediction and in the ground truth, and their
    difference (percentage points). PSNR can improve while these biases stay: report them side by side.

    Args:
        pred_hu, target_hu: volumes of one shape in HU (any leading channel/batch dimensions).

    Returns:
        ``{"<region>_shift_hu": float or None (empty region), "<region>_voxels": int, "laa950_pct",
        "laa950_target_pct", "laa950_diff_pct", "regions": {name: [low, high]} (None: unbounded), "laa_threshold_hu"}``.

    Example:
        >>> t = torch.tensor([-960.0, -900.0, 40.0, 700.0])
        >>> hu_fidelity(t + 20, t)["lung_shift_hu"], hu_fidelity(t + 20, t)["laa950_diff_pct"]
        (20.0, -50.0)
    """
    p = torch.as_tensor(pred_hu).double().reshape(-1)
    t = torch.as_tensor(target_hu).double().reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target differ in size: {p.numel()} vs {t.numel()} voxels")
    out: dict[str, Any] = {}
    for name, (lo, hi) in regions.items():
        sel = (t >= lo) & (t < hi)
        n = int(sel.sum())
        out[f"{name}_shift_hu"] = float((p[sel] - t[sel]).mean()) if n else None
        out[f"{name}_voxels"] = n
    lo, hi = regions[lung]
    in_lung = (t >= lo) & (t < hi)
    if bool(in_lung.any()):
        laa_p = 100.0 * float((p[in_lung] < laa_threshold_hu).double().mean())
        laa_t = 100.0 * float((t[in_lung] < laa_threshold_hu).double().mean())
        out.update(laa950_pct=laa_p, laa950_target_pct=laa_t, laa950_diff_pct=laa_p - laa_t)
    else:
        out.update(laa950_pct=None, laa950_target_pct=None, laa950_diff_pct=None)
    out["regions"] = {k: [float(v) if math.isfinite(v) else None for v in b] for k, b in regions.items()}
    out["laa_threshold_hu"] = float(laa_threshold_hu)
    return out


def summarise_hu_fidelity(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean over cases of each ``*_shift_hu`` and LAA-950 entry of :func:`hu_fidelity` results (cases where a
    region is empty are left out of its mean; ``None`` when all are)."""
    keys = [k for k in rows[0] if k.endswith(("_shift_hu", "_pct"))] if rows else []
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def same_grid(a: Any, b: Any, tol_mm: float = 1e-3, explain: bool = False) -> bool | str:
    """Whether volumes ``a`` and ``b`` (``(1, X, Y, Z)`` MetaTensors) sample the same points in space: equal
    shapes and affines within ``tol_mm`` (for every voxel corner). With ``explain``, the difference in words
    (empty when there is none)."""
    shape_a, shape_b = tuple(a.shape[1:]), tuple(b.shape[1:])
    why = ""
    if shape_a != shape_b:
        why = f"shapes {shape_a} and {shape_b}"
    else:
        aff_a = torch.as_tensor(a.affine, dtype=torch.float64)
        aff_b = torch.as_tensor(b.affine, dtype=torch.float64)
        corners = torch.tensor([[i, j, k, 1.0] for i in (0, shape_a[0] - 1) for j in (0, shape_a[1] - 1)
                                for k in (0, shape_a[2] - 1)], dtype=torch.float64).T
        gap = float(((aff_a - aff_b) @ corners)[:3].norm(dim=0).max())
        if gap > tol_mm:
            why = f"the same voxel lies up to {gap:.3g} mm apart (affines differ in position or orientation)"
    return why if explain else not why


def ssim_window(spatial_shape: Sequence[int], win_size: int = 11) -> int:
    """The SSIM window actually used: ``win_size``, shrunk to the smallest side (kept odd, >= 3)."""
    w = min(win_size, min(spatial_shape))
    w = w if w % 2 == 1 else w - 1
    if w < 3:
        raise ValueError(f"SSIM needs every side >= 3 voxels, got {tuple(spatial_shape)}")
    return w


def ms_ssim_weights(spatial_shape: Sequence[int], win_size: int = 11, max_scales: int = 5) -> tuple[float, ...]:
    """Scale weights for multi-scale SSIM on an image of this size.

    Rule: use the largest number of scales ``n <= max_scales`` such that MONAI's size check passes
    (``side // (n-1)^2 > win_size - 1``) and the coarsest scale still holds a full window
    (``side / 2^(n-1) >= win_size``); keep the first ``n`` of Wang et al.'s five weights and renormalise
    them to sum to 1. A 64^3 volume gets 3 scales, 176^3 and larger the full 5; with 1 scale MS-SSIM
    equals SSIM.
    """
    side = min(spatial_shape)
    if side < win_size:
        raise ValueError(f"MS-SSIM needs every side >= win_size={win_size}, got {tuple(spatial_shape)}")
    n = 1
    for cand in range(2, max_scales + 1):
        div = max(1, cand - 1) ** 2
        if side // div > win_size - 1 and side / 2 ** (cand - 1) >= win_size:
            n = cand
    w = _MS_SSIM_WEIGHTS[:n]
    total = sum(w)
    return tuple(x / total for x in w)


def _check_pair(pred: torch.Tensor, target: torch.Tensor, spatial_dims: int) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != spatial_dims + 2:
        raise ValueError(f"expected (B, C, {'x'.join('S' * spatial_dims)}) tensors, got shape {tuple(pred.shape)}")


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float,
    spatial_dims: int = 3,
    win_size: int = 11,
    sigma: float = 1.5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian-window SSIM per batch item (MONAI's formula, valid region only).

    Args:
        pred, target: (B, C, *spatial).
        data_range: the value range the images live in (required: it changes the result).
        spatial_dims: 2 or 3.
        win_size: Gaussian window side, shrunk for small images (:func:`ssim_window`).
        sigma: Gaussian standard deviation (voxels).
        mask: optional (B, 1, *spatial) boolean; the SSIM map is averaged where it is true.

    Returns:
        (B,) SSIM values.
    """
    _check_pair(pred, target, spatial_dims)
    w = ssim_window(pred.shape[2:], win_size)
    smap, _ = compute_ssim_and_cs(
        pred, target, spatial_dims=spatial_dims, kernel_size=[w] * spatial_dims, kernel_sigma=[sigma] * spatial_dims,
        data_range=data_range,
    )
    if mask is None:
        return smap.flatten(1).mean(1)
    r = w // 2
    crop = (slice(None), slice(None)) + tuple(slice(r, s - r) for s in mask.shape[2:])
    m = mask[crop].to(smap.dtype).expand_as(smap)
    return (smap * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def ms_ssim(
    pred: torch.Tensor, target: torch.Tensor, data_range: float, spatial_dims: int = 3, win_size: int = 11,
    max_scales: int = 5,
) -> torch.Tensor:
    """Multi-scale SSIM per batch item with the scale rule of :func:`ms_ssim_weights`. Returns (B,)."""
    _check_pair(pred, target, spatial_dims)
    weights = ms_ssim_weights(pred.shape[2:], win_size, max_scales)
    if len(weights) == 1:
        return ssim(pred, target, data_range, spatial_dims, win_size)
    return compute_ms_ssim(
        pred, target, spatial_dims=spatial_dims, data_range=data_range, kernel_size=win_size, weights=weights
    ).flatten()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR (dB) per batch item, ``10 log10(range^2 / MSE)``, capped at 100 dB for identical images."""
    diff2 = (pred.float() - target.float()) ** 2
    if mask is None:
        mse = diff2.flatten(1).mean(1)
    else:
        m = mask.to(diff2.dtype).expand_as(diff2)
        mse = (diff2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    val = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
    return val.clamp(max=PSNR_CAP_DB)


def compute_image_metrics(
    pred_hu: torch.Tensor,
    target_hu: torch.Tensor,
    window: Sequence[float] = (-1000.0, 1000.0),
    mask: torch.Tensor | None = None,
    mode: str = "3d",
    slice_axis: int = -1,
) -> dict[str, Any]:
    """PSNR, SSIM and MAE between two CT volumes in HU, on a declared window.

    Both volumes are clipped to ``window``; ``data_range = window[1] - window[0]`` HU.

    Args:
        pred_hu, target_hu: (S0, S1, S2), (C, S0, S1, S2) or (B, C, S0, S1, S2) in HU.
        window: (low, high) HU.
        mask: optional body mask of the same spatial shape (non-zero = inside).
        mode: ``"3d"`` (one 3D computation per volume) or ``"per-slice"`` (2D metrics averaged over the
            slices along ``slice_axis``).
        slice_axis: spatial axis (0-2 or negative) of the slices in per-slice mode.

    Returns:
        ``{"psnr": dB, "ssim": ..., "mae": HU, "window": [lo, hi], "data_range": HU, "mode": ..., "masked": bool,
        "n": volumes}``, averaged over the batch.
    """
    if mode not in METRIC_MODES:
        raise ValueError(f"mode must be one of {METRIC_MODES}, got {mode!r}")
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {tuple(window)}")

    def as5d(x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).float()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        while x.ndim < 5:
            x = x[None]
        return x

    p, t = as5d(pred_hu), as5d(target_hu)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    if not (torch.isfinite(p).all() and torch.isfinite(t).all()):
        raise ValueError("NaN or Inf in the volumes: metrics would be meaningless; check the model output")
    m = as5d(mask).bool() if mask is not None else None
    rng = hi - lo
    p, t = (p.clamp(lo, hi) - lo) / rng, (t.clamp(lo, hi) - lo) / rng  # [0, 1]: data_range 1 == window in HU
    if mode == "per-slice":
        ax = 2 + (slice_axis % 3)
        p2 = p.movedim(ax, 2).flatten(0, 2).unsqueeze(1)
        t2 = t.movedim(ax, 2).flatten(0, 2).unsqueeze(1)
        m2 = m.movedim(ax, 2).flatten(0, 2).unsqueeze(1) if m is not None else None
        ps, ss = psnr(p2, t2, 1.0, m2), ssim(p2, t2, 1.0, spatial_dims=2, mask=m2)
        mae = ((p2 - t2).abs() * (m2 if m2 is not None else 1)).flatten(1).sum(1)
        mae = mae / (m2.flatten(1).sum(1).clamp_min(1) if m2 is not None else p2[0].numel())
        if m2 is not None:  # slices without any body voxel do not count
            keep = m2.flatten(1).any(1)
            ps, ss, mae = ps[keep], ss[keep], mae[keep]
    else:
        ps, ss = psnr(p, t, 1.0, m), ssim(p, t, 1.0, spatial_dims=3, mask=m)
        diff = (p - t).abs()
        mae = (diff * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1) if m is not None else diff.flatten(1).mean(1)
    result = {
        "psnr": float(ps.mean()),
        "ssim": float(ss.mean()),
        "mae": float(mae.mean() * rng),
        "window": [lo, hi],
        "data_range": rng,
        "mode": mode,
        "masked": m is not None,
        "n": int(p.shape[0] * p.shape[1]),
        "units": {"psnr": "dB", "mae": "HU", "window": "HU"},
    }
    return result


def write_metrics_report(out_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """Writes ``report`` as ``OUT/metrics.json`` and its ``summary`` as a two-column ``OUT/metrics.md`` table
    (floats to 4 significant digits); returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(report, out / "metrics.json")
    lines = ["| measure | value |", "|---|---|"] + [
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in report.get("summary", {}).items()]
    atomic_write_text("\n".join(lines) + "\n", out / "metrics.md")
    return out / "metrics.json"


#: how :func:`roc_auc_ci` computes its interval
AUC_CI_METHODS = ("delong", "bootstrap")


def roc_auc_ci(scores: Sequence[float], labels: Sequence[int], level: float = 0.95, method: str = "delong",
               n_bootstrap: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive), with a ``level`` confidence
    interval.

    The AUC is the probability that a random positive scores above a random negative (ties count one half), the
    Mann-Whitney statistic. ``delong``: DeLong et al. (1988) variance from the structural components, computed with
    midranks (Sun & Xu 2014), ``V10_i`` the share of negatives positive ``i`` outranks and ``V01_j`` the share of
    positives that outrank negative ``j``::

        var(AUC) = var(V10) / m + var(V01) / n        (m positives, n negatives, sample variances)

    and a normal interval ``AUC +- z se``, clipped to [0, 1]. ``bootstrap``: ``n_bootstrap`` resamples of the
    positives and of the negatives separately (``seed``), the percentile interval. When every positive outranks
    every negative both intervals are ``[1, 1]``: with few cases read that as "no error seen", not as certainty.

    Returns:
        ``{"auc", "ci_low", "ci_high", "se", "level", "method", "n", "positives"}`` (``se``: DeLong's, also for the
        bootstrap), or None when ``labels`` hold one class only (the AUC is undefined).

    Raises:
        ValueError: lengths differ, labels other than 0 / 1, non-finite scores, ``level`` outside (0, 1) or an
            unknown ``method``.
    """
    if method not in AUC_CI_METHODS:
        raise ValueError(f"method must be one of {AUC_CI_METHODS}, got {method!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = torch.as_tensor([float(v) for v in scores], dtype=torch.float64)
    y = [int(v) for v in labels]
    if len(y) != x.numel():
        raise ValueError(f"{x.numel()} scores for {len(y)} labels")
    if set(y) - {0, 1}:
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y) - {0, 1})}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("scores must be finite")
    lab = torch.as_tensor(y, dtype=torch.bool)
    pos, neg = x[lab].numpy(), x[~lab].numpy()
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None

    def components(p, q):  # DeLong's structural components from midranks
        all_ranks = rankdata(list(p) + list(q))
        v10 = (all_ranks[:len(p)] - rankdata(p)) / len(q)
        v01 = 1.0 - (all_ranks[len(p):] - rankdata(q)) / len(p)
        return v10, v01

    v10, v01 = components(pos, neg)
    auc = float(v10.mean())
    var = (float(v10.var(ddof=1)) / m if m > 1 else 0.0) + (float(v01.var(ddof=1)) / n if n > 1 else 0.0)
    se = math.sqrt(max(var, 0.0))
    if method == "delong":
        z = statistics.NormalDist().inv_cdf(0.5 + float(level) / 2)
        lo, hi = max(0.0, auc - z * se), min(1.0, auc + z * se)
    else:
        g = torch.Generator().manual_seed(int(seed))
        aucs = []
        for _ in range(int(n_bootstrap)):
            p = pos[torch.randint(m, (m,), generator=g).numpy()]
            q = neg[torch.randint(n, (n,), generator=g).numpy()]
            aucs.append(float(components(p, q)[0].mean()))
        t = torch.tensor(aucs, dtype=torch.float64)
        lo, hi = (float(torch.quantile(t, q)) for q in ((1 - float(level)) / 2, (1 + float(level)) / 2))
    return {"auc": auc, "ci_low": lo, "ci_high": hi, "se": se, "level": float(level), "method": method,
            "n": m + n, "positives": m}


def window_borders(windows: Sequence[Sequence[slice]], shape: Sequence[int], scale: int = 1) -> list[list[int]]:
    """Per axis of a volume of ``shape`` (X, Y, Z), the sorted indices where one of ``windows`` (3 slices each, on a
    grid ``scale`` times coarser, e.g. latents) starts or ends inside the volume: the ``borders`` of
    :func:`seam_ratio`."""
    borders: list[set[int]] = [set(), set(), set()]
    for window in windows:
        for a, sl in enumerate(window):
            borders[a].update(int(b) * int(scale) for b in (sl.start, sl.stop) if 0 < int(b) * int(scale) < int(shape[a]))
    return [sorted(b) for b in borders]


def seam_ratio(volume: torch.Tensor, borders: Sequence[Sequence[int]]) -> float:
    """How much window borders show in a volume assembled from windows: the mean squared intensity step across
    the ``borders`` divided by that across every other voxel face (1: seams are invisible; above 1: steps
    concentrate where windows meet).

    Args:
        volume: (..., X, Y, Z).
        borders: per spatial axis, the indices ``b`` (0 < b < size) where a window starts or ends; the step
            across border ``b`` is the one from voxel ``b - 1`` to voxel ``b``.

    Returns:
        The ratio; 1.0 when there are no borders (one window).

    Example::

        seam_ratio(volume, [[], [], [64]])  # one seam across z at slice 64
    """
    v = torch.as_tensor(volume).float()
    if v.ndim < 3 or len(borders) != 3:
        raise ValueError(f"need a (..., X, Y, Z) volume and borders for 3 axes, got {tuple(v.shape)} and {len(borders)}")
    border_sum, border_n, other_sum, other_n = 0.0, 0, 0.0, 0
    for a, axis_borders in enumerate(borders):
        dim = v.ndim - 3 + a
        steps = v.diff(dim=dim).pow(2).movedim(dim, 0).flatten(1).mean(1)  # per face
        bad = [int(b) for b in axis_borders if not 0 < int(b) < v.shape[dim]]
        if bad:
            raise ValueError(f"borders {bad} on axis {a} are outside (0, {v.shape[dim]})")
        mask = torch.zeros(steps.shape[0], dtype=torch.bool)
        mask[[int(b) - 1 for b in axis_borders]] = True
        border_sum, border_n = border_sum + float(steps[mask].sum()), border_n + int(mask.sum())
        other_sum, other_n = other_sum + float(steps[~mask].sum()), other_n + int((~mask).sum())
    if border_n == 0:
        return 1.0
    return (border_sum / border_n) / max(other_sum / max(other_n, 1), 1e-12)


def reprojection_psnr(volume_hu: torch.Tensor, affine: torch.Tensor, geometry: ProjectionGeometry,
                      line_integrals: torch.Tensor, window: Sequence[float] | None = None,
                      projector: DRRProjector | None = None) -> float:
    """PSNR (dB) of a volume's DRRs against the line integrals it should reproduce (the radiographs it was
    reconstructed from): the consistency of a reconstruction with its own acquisition.

    The volume, clipped to ``window`` (HU) when given, is projected with ``geometry``; the PSNR is taken over
    every view and pixel at once, with data range = the largest input line integral:
    ``10 log10(max(L)^2 / mean((DRR - L)^2))``.

    Args:
        volume_hu: (1, S0, S1, S2) or (S0, S1, S2) HU.
        affine: (4, 4) voxel -> RAS mm of the volume.
        geometry: the acquisition (V views).
        line_integrals: (V, rows, cols) of the acquisition.
        window: HU window applied before projecting; None: the volume as it is.
        projector: a :class:`ctsynth.drr.DRRProjector` with HU input (default: the standard one).

    Example::

        reprojection_psnr(prediction_hu, affine, geometry, line_integrals, window=(-1000, 1000))
    """
    vol = torch.as_tensor(volume_hu).float()
    vol = vol[None] if vol.ndim == 3 else vol
    if vol.ndim != 4 or vol.shape[0] != 1:
        raise ValueError(f"expected a (1, S0, S1, S2) volume, got {tuple(torch.as_tensor(volume_hu).shape)}")
    li = torch.as_tensor(line_integrals).float()
    if li.ndim != 3 or li.shape[0] != geometry.num_views:
        raise ValueError(f"expected ({geometry.num_views}, rows, cols) line integrals, got {tuple(li.shape)}")
    if window is not None:
        vol = vol.clamp(float(window[0]), float(window[1]))
    projector = projector or DRRProjector(input_kind="hu")
    with torch.no_grad():
        drr = projector(vol[None], torch.as_tensor(affine), geometry)[0].float()
    if drr.shape != li.shape:
        raise ValueError(f"DRRs {tuple(drr.shape)} do not match the line integrals {tuple(li.shape)}: the geometry's "
                         "detector must be the acquisition's")
    peak = float(li.max())
    if peak <= 0:
        raise ValueError("the line integrals are all zero: nothing to compare the re-projection with")
    return float(psnr(drr.flatten()[None], li.flatten()[None], data_range=peak)[0])
