"""Thick -> thin slice interpolation without diffusion: classical baselines and a fast learned refiner.

* :func:`interpolate_slices`: linear or cubic interpolation along the slice axis onto any spacing, with
  the affine of the new grid (slice centres keep their world positions).
* :func:`degrade_along`: thick-slab simulation along any axis (slab average, then interpolation back),
  the degradation the refiner learns to undo.
* :func:`thick_consistency`: gives any thin prediction the band its thick series measured.
* :class:`SliceRefiner`: a 2D residual U-Net (MONAI ``BasicUNet``) applied to the planes that contain
  the slice axis (coronal and sagittal), on top of cubic interpolation.
* :func:`fit_refiner`: trains it from (degraded, sharp) volume pairs, either paired thick/thin data or,
  self-supervised (SMORE-style), the thick volume's own in-plane detail degraded along x and y with the
  thick slice profile (:func:`self_supervised_pairs`); :func:`fit_paired_refiner` and
  :func:`fit_self_supervised_refiner` set both up.
* :func:`refine_volume`: applies a trained refiner to a cubic-interpolated volume (averaged over its mirror images).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn
from tqdm.auto import tqdm

from ctsynth.meta_schema import MetaField
from ctsynth.phantoms import slab_average
from ctsynth.transforms import scale_hu, unscale_hu

__all__ = ["INTERPOLATION_MODES", "resample_axis", "slice_positions", "slab_extent_grid", "thin_grid_offset_mm",
           "interpolate_slices",
           "degrade_along", "thick_consistency", "self_supervised_pairs", "paired_pairs",
           "SliceRefiner", "fit_refiner", "fit_self_supervised_refiner", "fit_paired_refiner", "refine_volume",
           "save_refiner", "load_refiner",
           "STUDY_METHODS", "SLICE_METHODS", "interpolate_study"]

logger = logging.getLogger(__name__)
INTERPOLATION_MODES = ("linear", "cubic")


def resample_axis(data: torch.Tensor, axis: int, positions: torch.Tensor, mode: str) -> torch.Tensor:
    """Samples (X, Y, Z) ``data`` along ``axis`` at fractional voxel ``positions`` (other axes unchanged).

    ``linear``: two-tap; ``cubic``: Catmull-Rom (Keys, a = -0.5, which reproduces quadratics), edges clamped.
    """
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"mode must be one of {INTERPOLATION_MODES}, got {mode!r}")
    d = data.movedim(axis, -1)
    n = d.shape[-1]
    p = positions.to(torch.float64).clamp(0, n - 1)
    i = torch.floor(p).long().clamp(max=max(n - 2, 0))
    t = (p - i).to(d.dtype)
    if mode == "linear":
        taps, weights = [i, i + 1], [1 - t, t]
    else:
        t2, t3 = t * t, t * t * t
        taps = [i - 1, i, i + 1, i + 2]
        weights = [-0.5 * t3 + t2 - 0.5 * t, 1.5 * t3 - 2.5 * t2 + 1, -1.5 * t3 + 2 * t2 + 0.5 * t, 0.5 * t3 - 0.5 * t2]
    out = sum(w * d[..., k.clamp(0, n - 1)] for k, w in zip(taps, weights))
    return out.movedim(-1, axis)


#: the finest slice spacing and the most slices an output grid may have
MIN_SLICE_SPACING_MM, MAX_SLICES = 0.05, 8192


def slice_positions(volume: MetaTensor, spacing_mm: float | None = None, factor: float | None = None,
                    count: int | None = None, offset_mm: float = 0.0, axis: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional input indices along ``axis`` of a new slice grid, and that grid's affine.

    The new grid starts ``offset_mm`` along the slice direction from the first input slice and steps by
    ``spacing_mm`` (or input spacing / ``factor``). ``count`` slices; default: as many as fit in the input's
    span (the last input slice is hit exactly when the spacings divide).

    Returns:
        (positions (count,) float64 in input voxel units, 4x4 float64 affine of the new grid).
    """
    if (spacing_mm is None) == (factor is None):
        raise ValueError("give exactly one of spacing_mm and factor")
    aff = torch.as_tensor(getattr(volume, "affine", torch.eye(4)), dtype=torch.float64)
    step_in = float(aff[:3, axis].norm())
    step_out = float(spacing_mm) if spacing_mm is not None else step_in / float(factor)
    if not math.isfinite(step_out) or step_out < MIN_SLICE_SPACING_MM:
        raise ValueError(f"target spacing must be at least {MIN_SLICE_SPACING_MM} mm, got {step_out:g}; pass a "
                         "spacing in mm such as --spacing 1")
    n = volume.shape[1 + axis]
    if count is None:
        count = int(math.floor(((n - 1) * step_in - offset_mm) / step_out + 1e-6)) + 1
    if count > MAX_SLICES:
        raise ValueError(f"the requested grid needs {int(count)} slices at {step_out:g} mm (at most {MAX_SLICES}); "
                         "choose a larger --spacing")
    if count < 1:
        raise ValueError(f"no slice of the requested grid (offset {offset_mm} mm, spacing {step_out} mm) lies inside "
                         f"the input's {(n - 1) * step_in:.1f} mm span")
    positions = (offset_mm + torch.arange(int(count), dtype=torch.float64) * step_out) / step_in
    lo, hi = float(positions[0]), float(positions[-1])
    if lo < -0.5 - 1e-6 or hi > n - 0.5 + 1e-6:  # each input slice stands for a slab of its spacing
        raise ValueError(f"the requested grid ({int(count)} slices at {step_out:g} mm from {offset_mm:g} mm) reaches "
                         f"{lo * step_in:.1f}..{hi * step_in:.1f} mm, beyond the input's slabs "
                         f"({-0.5 * step_in:.1f}..{(n - 0.5) * step_in:.1f} mm from its first slice): lower the slice "
                         "count or the offset, or leave the count out to fill the input's span")
    new_aff = aff.clone()
    new_aff[:3, axis] = aff[:3, axis] * (step_out / step_in)
    new_aff[:3, 3] = aff[:3, 3] + aff[:3, axis] * (offset_mm / step_in)
    return positions, new_aff


def slab_extent_grid(volume: MetaTensor, spacing_mm: float, axis: int = 2) -> tuple[int, float]:
    """(count, offset_mm) of the thin grid at ``spacing_mm`` that covers the thick slabs' whole extent.

    Each of the ``n`` thick slices of spacing ``S`` stands for the slab ``[c - S/2, c + S/2]`` around its centre
    ``c``: the extent is ``n S`` long, ``count = floor(n S / spacing)`` thin slices fit in it and they are centred
    in it, so the first lies ``(S - spacing) / 2`` before the first centre when the spacings divide (``n``
    slices of 12.5 mm give ``5 n`` slices of 2.5 mm: the series the slabs were averaged from). Pass both to
    :func:`interpolate_slices`.
    """
    step_in = float(torch.as_tensor(getattr(volume, "affine", torch.eye(4)), dtype=torch.float64)[:3, axis].norm())
    n = int(volume.shape[1 + axis])
    spacing_mm = float(spacing_mm)
    if not math.isfinite(spacing_mm) or spacing_mm <= 0:
        raise ValueError(f"target spacing must be > 0 mm, got {spacing_mm}")
    count = max(1, int(math.floor(n * step_in / spacing_mm + 1e-6)))
    # the grid's first slice centre, from the first thick centre: slab edge, half a thin slice, half the leftover
    return count, -step_in / 2 + spacing_mm / 2 + (n * step_in - count * spacing_mm) / 2


def thin_grid_offset_mm(thick: MetaTensor, thin: MetaTensor, axis: int = 2) -> float:
    """Distance (mm) from the thick series' first slice to the thin series' first slice along the slice axis
    (the ``offset_mm`` that puts :func:`interpolate_slices` output on the thin series' grid)."""
    a_thick = torch.as_tensor(thick.affine, dtype=torch.float64)
    a_thin = torch.as_tensor(thin.affine, dtype=torch.float64)
    direction = a_thick[:3, axis] / a_thick[:3, axis].norm()
    return float((a_thin[:3, 3] - a_thick[:3, 3]) @ direction)


def interpolate_slices(volume: MetaTensor, spacing_mm: float | None = None, factor: float | None = None,
                       mode: str = "cubic", axis: int = 2, count: int | None = None, offset_mm: float = 0.0) -> MetaTensor:
    """Resamples a (1, X, Y, Z) volume along ``axis`` to ``spacing_mm`` (or ``factor`` times more slices).

    The grid is that of :func:`slice_positions` (by default the first output slice sits on the first input
    slice and the output covers the input's span). Cubic is Catmull-Rom (Keys, a = -0.5), clamped at the
    borders.

    Returns:
        (1, X, Y, Z') MetaTensor with the new affine.
    """
    positions, new_aff = slice_positions(volume, spacing_mm, factor, count, offset_mm, axis)
    data = torch.as_tensor(volume).float()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    out = resample_axis(data[0], axis, positions.float(), mode)[None]
    return MetaTensor(out, affine=new_aff)


def degrade_along(volume: MetaTensor, factor: int, axis: int, mode: str = "cubic") -> MetaTensor:
    """Simulates ``factor``-times thicker slabs along ``axis`` and interpolates back to the original grid."""
    thick = slab_average(volume, int(factor), axis=axis)
    n_thick, n = thick.shape[1 + axis], volume.shape[1 + axis]
    # thick slice k is centred on original index k*factor + (factor-1)/2
    positions = (torch.arange(n, dtype=torch.float32) - (factor - 1) / 2) / factor
    positions = positions.clamp(0, n_thick - 1)
    out = resample_axis(torch.as_tensor(thick).float()[0], axis, positions, mode)[None]
    return MetaTensor(out, affine=torch.as_tensor(volume.affine).clone())


def thick_consistency(pred: MetaTensor, thick: MetaTensor, axis: int = 2) -> MetaTensor:
    """Gives a thin prediction the band the thick series measured: ``pred + cubic(thick) - cubic(slabs(pred))``.

    ``slabs(pred)`` are the prediction's own thick slices (the mean of the thin slices within each thick slice's
    extent, as :func:`ctsynth.phantoms.slab_average` makes them), and ``cubic`` interpolates thick slices onto
    ``pred``'s grid as :func:`interpolate_slices` does. What the thick series says about the volume is then the
    thick series' (the prediction of its own thick slices becomes cubic's), and what it cannot say (detail finer
    than a thick slice) is the prediction's. For the truth it changes nothing; for a blurred prediction it
    keeps the part the blur destroyed from the measurement. Slabs that reach beyond ``pred`` repeat its end slices.

    Args:
        pred: (1, X, Y, Z') HU on a thin grid along ``axis`` within the thick slabs' extent (its affine places it).
        thick: (1, X, Y, Z) HU, the series ``pred`` was made from, on the same in-plane grid.

    Returns:
        (1, X, Y, Z') HU with ``pred``'s affine.
    """
    others = [d for d in range(4) if d != 1 + axis]
    if [pred.shape[d] for d in others] != [thick.shape[d] for d in others]:
        raise ValueError(f"prediction {tuple(pred.shape)} and thick series {tuple(thick.shape)} differ outside axis "
                         f"{axis}; the prediction must be on the thick series' in-plane grid")
    st = float(torch.as_tensor(thick.affine, dtype=torch.float64)[:3, axis].norm())
    sp = float(torch.as_tensor(pred.affine, dtype=torch.float64)[:3, axis].norm())
    if sp >= st:
        raise ValueError(f"the prediction's slice spacing {sp:g} mm is not finer than the thick series' {st:g} mm")
    offset = thin_grid_offset_mm(thick, pred, axis)
    n_thick, n = thick.shape[1 + axis], pred.shape[1 + axis]
    per_slab = max(1, round(st / sp))  # samples per thick slice, one thin spacing apart (st/sp when it divides)
    step = st / sp / per_slab
    centres = (torch.arange(n_thick, dtype=torch.float64) * st - offset) / sp
    within = (torch.arange(per_slab, dtype=torch.float64) - (per_slab - 1) / 2) * step
    data = torch.as_tensor(pred).float()[0]
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    samples = resample_axis(data, axis, (centres[:, None] + within[None]).flatten(), "linear")
    shape = list(samples.shape)
    shape[axis:axis + 1] = [n_thick, per_slab]
    slabs = samples.reshape(shape).mean(axis + 1)
    positions = (offset + torch.arange(n, dtype=torch.float64) * sp) / st
    base = torch.as_tensor(thick).float()[0]
    base = base.as_tensor() if isinstance(base, MetaTensor) else base
    out = data + resample_axis(base, axis, positions, "cubic") - resample_axis(slabs, axis, positions, "cubic")
    return MetaTensor(out[None], affine=torch.as_tensor(pred.affine).clone())


def self_supervised_pairs(thick: MetaTensor, slice_axis: int = 2) -> list[tuple[MetaTensor, MetaTensor, int, int]]:
    """(degraded, sharp, degraded axis, plane normal) pairs from a thick volume's own in-plane detail
    (SMORE-style): the in-plane slices, degraded along x or y with the thick slice profile.

    The factor is the ratio of slice spacing to in-plane spacing (rounded); both in-plane axes are degraded.
    (SMORE's in-plane rotation augmentation was tried and cost 2 dB on the demo phantoms: not offered.)

    Raises:
        ValueError: the slices are not thicker than the pixels (nothing to learn).
    """
    aff = torch.as_tensor(thick.affine, dtype=torch.float64)
    sp = [float(aff[:3, i].norm()) for i in range(3)]
    in_plane = [i for i in range(3) if i != slice_axis]
    factor = round(sp[slice_axis] / min(sp[i] for i in in_plane))
    if factor < 2:
        raise ValueError(f"slice spacing {sp[slice_axis]:.2f} mm is not at least twice the pixel spacing "
                         f"{min(sp[i] for i in in_plane):.2f} mm; self-supervised training has nothing to learn")
    return [(degrade_along(thick, factor, ax), thick, ax, slice_axis) for ax in in_plane]


def paired_pairs(upsampled: MetaTensor, thin: MetaTensor, slice_axis: int = 2) -> list[tuple[MetaTensor, MetaTensor, int, int]]:
    """(interpolated thick, thin, slice axis, plane normal) pairs for supervised training: the coronal and
    sagittal planes of a thick series interpolated onto its thin series' grid."""
    if tuple(upsampled.shape) != tuple(thin.shape):
        raise ValueError(f"interpolated thick {tuple(upsampled.shape)} and thin {tuple(thin.shape)} volumes differ; "
                         "interpolate onto the thin grid first (interpolate_slices with the thin spacing)")
    return [(upsampled, thin, slice_axis, n) for n in range(3) if n != slice_axis]


class SliceRefiner(nn.Module):
    """Residual 2D U-Net for planes whose rows run along the thick-slice axis.

    Input and output: (N, 1, H, W) images in [0, 1] (HU window ``window``), rows = the degraded axis. Any
    H, W (padded to multiples of 16 inside).

    Args:
        features: BasicUNet widths.
        window: HU window mapped to [0, 1].
        norm: ``instance`` (statistics of each image) or ``batch`` (statistics learnt in training, used as they
            are at inference: a plane is normalised the same whatever its extent and content, which matters when
            the training planes are not the planes refined, as for a self-supervised fit: axial planes in
            training, coronal and sagittal ones when applied; measured 0.4-1.1 dB closer to cubic than
            ``instance`` on phantoms).
        context_rows: mirrored rows added at both ends of the slice axis when :func:`refine_volume` applies it
            (0: none). A refiner fitted on in-plane planes (self-supervised) has only seen air at its images'
            borders, never a border cutting through the body as the first and last slices of a stack do; without
            the mirrored context it measured 20x cubic's error on the first slice of a phantom.
        flips: whether :func:`refine_volume` averages over the volume's mirror images by default. Worth it for a
            refiner whose training planes do not tie it to the anatomy's orientation (self-supervised: in-plane
            slices): +0.08 to +0.17 dB on five phantoms. A refiner trained on coronal and sagittal planes can learn
            the orientation (ribs slope down towards the front) and lost 1.25 dB with it on a phantom (+1.87 ->
            +0.62 dB over cubic).
    """

    NORMS = ("instance", "batch")

    def __init__(self, features: Sequence[int] = (16, 16, 32, 32, 64, 16), window: Sequence[float] = (-1024.0, 3071.0),
                 context_rows: int = 0, norm: str = "instance", flips: bool = False):
        super().__init__()
        from monai.networks.nets import BasicUNet

        if context_rows < 0:
            raise ValueError(f"context_rows must be >= 0, got {context_rows}")
        if norm not in self.NORMS:
            raise ValueError(f"norm must be one of {self.NORMS}, got {norm!r}")
        self.norm = norm
        self.window = tuple(float(w) for w in window)
        self.features = tuple(int(f) for f in features)
        self.context_rows = int(context_rows)
        self.flips = bool(flips)
        self.unet = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=self.features,
                              norm=("instance", {"affine": True}) if norm == "instance" else ("batch", {}))
        last = self.unet.final_conv.conv if hasattr(self.unet.final_conv, "conv") else self.unet.final_conv
        nn.init.zeros_(last.weight)  # starts as the identity on the interpolated input
        nn.init.zeros_(last.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        x = F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images
        return images + self.unet(x)[..., :h, :w]


def _seeded_refiner(seed: int, **kwargs) -> SliceRefiner:
    """A :class:`SliceRefiner` whose initial weights depend on ``seed`` only (not on the global random state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SliceRefiner(**kwargs)


def _planes(volume: torch.Tensor, rows_axis: int, normal_axis: int) -> torch.Tensor:
    """(X, Y, Z) -> the planes perpendicular to ``normal_axis``, rows along ``rows_axis``: (N, 1, rows, cols)."""
    cols = 3 - rows_axis - normal_axis
    return volume.permute(normal_axis, rows_axis, cols)[:, None]


def fit_refiner(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]], steps: int = 300, patch: int = 64,
                batch: int = 16, lr: float = 5e-4, seed: int = 0, model: SliceRefiner | None = None,
                progress: bool = True) -> SliceRefiner:
    """Trains a :class:`SliceRefiner` on (degraded, sharp, degraded axis, plane normal) volume pairs
    (1, X, Y, Z) in HU (from :func:`self_supervised_pairs` or :func:`paired_pairs`).

    Without ``model`` a new default one is made, its initial weights drawn from ``seed``.

    Each step draws ``batch`` random planes with rows along the degraded axis (random pair, random plane,
    random ``patch``-sized crop; no flips: they cost 2 dB on held-out phantoms) and minimises L1 in the
    normalised window. The learning rate is constant, then a fifth of it for the last 20 % of the steps.
    """
    if not pairs:
        raise ValueError("fit_refiner needs at least one (degraded, sharp, axis) pair")
    g = torch.Generator().manual_seed(seed)
    model = model or _seeded_refiner(seed)
    stacks = []
    for low, high, axis, normal in pairs:
        lo = scale_hu(torch.as_tensor(low).float()[0], model.window)
        hi = scale_hu(torch.as_tensor(high).float()[0], model.window)
        stacks.append((_planes(lo, axis, normal), _planes(hi, axis, normal)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 0.8 * steps else 0.2)  # constant, then a fifth
    model.train()
    bar = tqdm(range(steps), desc="fit slice refiner", unit="step", disable=not progress)
    # one crop size for every pair (planes of different pairs may differ in size)
    pr, pc = min([patch] + [lo.shape[-2] for lo, _ in stacks]), min([patch] + [lo.shape[-1] for lo, _ in stacks])
    for _ in bar:
        xs, ys = [], []
        for _ in range(batch):
            lo, hi = stacks[int(torch.randint(len(stacks), (1,), generator=g))]
            i = int(torch.randint(lo.shape[0], (1,), generator=g))
            r, c = lo.shape[-2:]
            r0 = int(torch.randint(r - pr + 1, (1,), generator=g))
            c0 = int(torch.randint(c - pc + 1, (1,), generator=g))
            x, y = lo[i, :, r0:r0 + pr, c0:c0 + pc], hi[i, :, r0:r0 + pr, c0:c0 + pc]
            xs.append(x)
            ys.append(y)
        x, y = torch.stack(xs), torch.stack(ys)
        loss = F.l1_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss):.4f}")
    return model.eval()


@torch.no_grad()
def refine_volume(model: SliceRefiner, upsampled: MetaTensor, axis: int = 2, chunk: int = 32,
                  flips: bool | None = None, progress: bool = True) -> MetaTensor:
    """Applies a refiner to a (1, X, Y, Z) HU volume interpolated along ``axis``: the planes containing the
    axis are refined in both orientations and averaged (with ``model.context_rows`` mirrored slices of context at
    both ends of ``axis``). Returns HU with the input's affine.

    ``flips`` (default ``model.flips``): also refine the volume mirrored along the in-plane axes, along ``axis``,
    and along all three, and average the four results mapped back (4x the time). A mirrored volume is still an
    interpolated thick series (the network is convolutional: the slab positions move with the content), so each
    mirror image gives one more estimate of the same volume. On five phantoms (64x64x84, 2 mm, 5x slabs,
    self-supervised, 300 steps) it added 0.08-0.17 dB. ``progress``: a progress bar (with its ETA) over the planes.
    """
    vol = scale_hu(torch.as_tensor(upsampled).float()[0], model.window)
    vol = vol.as_tensor() if isinstance(vol, MetaTensor) else vol
    in_plane = [i for i in range(3) if i != axis]
    variants = [[], in_plane, [axis], [0, 1, 2]] if (model.flips if flips is None else flips) else [[]]
    planes = sum(vol.shape[i] for i in in_plane) * len(variants)
    with tqdm(total=planes, desc="refine slices", unit="plane", disable=not progress) as bar:
        acc = sum(_refine_both_orientations(model, vol.flip(dims), axis, chunk, bar).flip(dims) if dims
                  else _refine_both_orientations(model, vol, axis, chunk, bar) for dims in variants) / len(variants)
    return MetaTensor(unscale_hu(acc, model.window)[None], affine=torch.as_tensor(upsampled.affine).clone())


def _refine_both_orientations(model: SliceRefiner, vol: torch.Tensor, axis: int, chunk: int,
                              bar: Any = None) -> torch.Tensor:
    """(X, Y, Z) in the model's [0, 1] window -> the mean of its two plane orientations' refinements (``bar``: a
    progress bar advanced by the planes refined)."""
    n = vol.shape[axis]
    r = min(model.context_rows, n - 1)
    if r:
        vol = torch.cat([vol.narrow(axis, 1, r).flip(axis), vol, vol.narrow(axis, n - 1 - r, r).flip(axis)], axis)
    acc = torch.zeros_like(vol)
    model.eval()
    for normal in (i for i in range(3) if i != axis):
        planes = _planes(vol, axis, normal)  # (n, 1, rows along axis, cols)
        parts = []
        for i in range(0, planes.shape[0], chunk):
            parts.append(model(planes[i:i + chunk]))
            if bar is not None:
                bar.update(parts[-1].shape[0])
        out = torch.cat(parts)[:, 0]
        order = [0, 0, 0]  # undo _planes' (normal, axis, cols) order
        order[normal], order[axis], order[3 - axis - normal] = 0, 1, 2
        acc += out.permute(*order)
    return acc.narrow(axis, r, n) / 2


def fit_self_supervised_refiner(thick: MetaTensor, steps: int = 400, seed: int = 0, progress: bool = True,
                                context_rows: int = 8, norm: str = "batch", slice_axis: int = 2) -> SliceRefiner:
    """A refiner fitted on a thick volume alone (:func:`self_supervised_pairs`), with ``context_rows`` of mirrored
    context at the ends of the stack when applied (8 measured best of 0 / 8 / 16) and ``batch`` normalisation
    (see :class:`SliceRefiner`)."""
    return fit_refiner(self_supervised_pairs(thick, slice_axis), steps=steps, seed=seed, progress=progress,
                       model=_seeded_refiner(seed, context_rows=context_rows, norm=norm, flips=True))


def fit_paired_refiner(cases: Sequence[tuple[MetaTensor, MetaTensor]], steps: int = 400, seed: int = 0,
                       progress: bool = True, in_plane: bool = True, context_rows: int = 8,
                       norm: str = "batch") -> SliceRefiner:
    """A refiner trained on (thick, thin) series of the same studies: each thick series is interpolated (cubic)
    onto its thin series' grid and its coronal and sagittal planes learn the thin ones (:func:`paired_pairs`);
    with ``in_plane`` the thick series' own in-plane pairs (:func:`self_supervised_pairs`) are added.

    On phantoms that keep their proportions (12 training pairs, 64x64x84 at 2 mm, 5x slabs, 400 steps, two
    held-out cases, vs cubic) the paired planes alone scored -0.27 / -0.24 dB (they teach the training studies'
    own z layout), the in-plane pairs alone +0.13 / +0.28 dB and both +0.21 / +0.37 dB.

    Args:
        cases: (1, X, Y, Z) HU volumes with their affines, Z the slice axis; the thin grid inside the thick span.
    """
    from ctsynth.prepare import slice_spacing_mm

    if not cases:
        raise ValueError("fit_paired_refiner needs at least one (thick, thin) pair")
    pairs: list[tuple[MetaTensor, MetaTensor, int, int]] = []
    for thick, thin in cases:
        up = interpolate_slices(thick, spacing_mm=slice_spacing_mm(thin), count=int(thin.shape[3]),
                                offset_mm=thin_grid_offset_mm(thick, thin))
        pairs += paired_pairs(up, thin)
        if in_plane:
            pairs += self_supervised_pairs(thick)
    return fit_refiner(pairs, steps=steps, seed=seed, progress=progress,
                       model=_seeded_refiner(seed, context_rows=context_rows, norm=norm))


def save_refiner(model: SliceRefiner, path: str | Path, meta: dict | None = None) -> Path:
    """Writes a refiner (weights, widths, window and ``meta``) atomically."""
    from ctsynth.engine import atomic_torch_save

    return atomic_torch_save({"network": model.state_dict(), "meta": {"features": list(model.features),
                              "window": list(model.window), "context_rows": model.context_rows, "flips": model.flips,
                              "norm": model.norm, **(meta or {})}}, path)


#: what a refiner file's meta may hold (:func:`ctsynth.meta_schema.validate_meta`)
REFINER_META = {
    "features": MetaField("ints", min=1, max=512, max_len=16),
    "window": MetaField("floats", min=-4096, max=65535, len=2),
    "context_rows": MetaField("int", min=0, max=64),
    "norm": MetaField("str", choices=SliceRefiner.NORMS),
    "flips": MetaField("bool"),
}


def load_refiner(path: str | Path) -> SliceRefiner:
    """Reads a refiner written by :func:`save_refiner`.

    Raises:
        FileNotFoundError / ValueError: naming the file.
    """
    from ctsynth.engine import load_network_weights, read_checkpoint_meta
    from ctsynth.meta_schema import validate_meta

    raw = read_checkpoint_meta(path)
    if "features" not in raw:
        raise ValueError(f"{path}: not a slice refiner (no 'features' in its meta); train one with "
                         "`ctsynth interpolate ... --method self-supervised --save-model PATH`")
    meta = validate_meta(raw, REFINER_META, path)
    model = SliceRefiner(meta["features"], meta.get("window", (-1024.0, 3071.0)), meta.get("context_rows", 0),
                         meta.get("norm", "instance"), meta.get("flips", False))
    load_network_weights(model, path)
    return model.eval()


#: what :func:`interpolate_study` does (``ldm`` runs the slice_interp_ldm bundle and is not among them)
STUDY_METHODS = ("cubic", "linear", "self-supervised", "refiner")
#: what ``ctsynth interpolate`` and the MONAI Deploy app offer: :data:`STUDY_METHODS` and the bundle's ``ldm``
SLICE_METHODS = (*STUDY_METHODS, "ldm")


def interpolate_study(volume: MetaTensor, spacing_mm: float, method: str = "cubic", model: str | Path | None = None,
                      steps: int = 400, seed: int = 0, save_model: str | Path | None = None,
                      flips: bool | None = None, consistency: bool = False,
                      phases: dict[str, dict[str, float]] | None = None) -> MetaTensor:
    """A thick-slice CT -> thin slices at ``spacing_mm`` with one of :data:`STUDY_METHODS` (what ``ctsynth
    interpolate`` and the MONAI Deploy application run).

    ``refiner`` applies a refiner saved with :func:`save_refiner` (``model``); ``self-supervised`` fits one on the
    volume's own in-plane detail first (``steps``, ``seed``; kept at ``save_model`` when given). The refiners work
    at the in-plane pixel spacing and resample to ``spacing_mm`` afterwards when they differ; ``flips``: see
    :func:`refine_volume`; ``consistency``: the result gets the band the thick series measured
    (:func:`thick_consistency`). ``phases``, when given, receives per phase (``interpolate``, ``fit``,
    ``refine``, ``resample``, ``consistency``) its ``seconds`` and the process's ``peak_rss_mb`` after it.

    Args:
        volume: (1, X, Y, Z) HU with a RAS affine, Z the thick axis.

    Returns:
        (1, X, Y, Z') HU on the thin grid covering the thick slabs' whole extent (:func:`slab_extent_grid`).
    """
    if method not in STUDY_METHODS:
        raise ValueError(f"method must be one of {STUDY_METHODS}, got {method!r}")
    if method == "refiner" and not model:
        raise ValueError("method 'refiner' needs a refiner file (saved by --save-model / save_refiner)")
    log = phases if phases is not None else {}
    count, offset = slab_extent_grid(volume, spacing_mm)
    if method in INTERPOLATION_MODES:
        with _phase(log, "interpolate"):
            result = interpolate_slices(volume, spacing_mm=spacing_mm, count=count, offset_mm=offset, mode=method)
    else:
        aff = torch.as_tensor(volume.affine, dtype=torch.float64)
        pixel = float(min(aff[:3, 0].norm(), aff[:3, 1].norm()))
        pixel_count, pixel_offset = slab_extent_grid(volume, pixel)
        with _phase(log, "interpolate"):
            up = interpolate_slices(volume, spacing_mm=pixel, count=pixel_count, offset_mm=pixel_offset, mode="cubic")
        with _phase(log, "fit"):
            net = load_refiner(model) if method == "refiner" else fit_self_supervised_refiner(volume, steps=steps,
                                                                                              seed=seed)
        if save_model and method == "self-supervised":
            save_refiner(net, save_model, {"trained_on": str(volume.meta.get("filename_or_obj", "")), "steps": steps})
        with _phase(log, "refine"):
            result = refine_volume(net, up, flips=flips)
        if abs(pixel - spacing_mm) > 1e-3 or pixel_count != count:
            with _phase(log, "resample"):
                result = interpolate_slices(result, spacing_mm=spacing_mm, count=count,
                                            offset_mm=offset - pixel_offset, mode="cubic")
    if consistency:
        with _phase(log, "consistency"):
            result = thick_consistency(result, volume)
    return result


@contextlib.contextmanager
def _phase(log: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Records the seconds a phase took and the process's peak resident memory after it (MiB, Linux)."""
    import resource

    t0 = time.perf_counter()
    yield
    log[name] = {"seconds": time.perf_counter() - t0,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
