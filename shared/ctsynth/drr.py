"""Differentiable digitally reconstructed radiographs (DRR).

The projector integrates linear attenuation ``mu`` (1/mm) along every ray of a
:class:`~ctsynth.geometry.ProjectionGeometry` through a volume placed in the world by its affine. Two
backends sit behind one ``forward``:

* ``"joseph"`` (default): Joseph's method. For each view, the volume axis most aligned with the rays
  is walked plane by plane; every plane is resampled onto the detector with a 2D bilinear
  ``grid_sample`` at the ray/plane intersections and weighted by the ray's path length between two
  planes. Exact for piecewise-bilinear volumes, fast, and memory-light.
* ``"raymarch"``: uniform samples along each ray, clipped to the volume's bounding box, with a 3D
  trilinear ``grid_sample``. Slower; kept as an independent reference.

Both are differentiable with respect to the volume and run on CPU and CUDA in float32 or bfloat16
(accumulation in float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctsynth.geometry import ProjectionGeometry

__all__ = [
    "DRR_BACKENDS",
    "WATER_MASS_ATTENUATION",
    "BONE_MASS_ATTENUATION",
    "mu_water",
    "mu_to_hu",
    "backprojection_reconstruction",
    "hu_to_mu",
    "line_integral_to_intensity",
    "display_image",
    "DRRProjector",
]

DRR_BACKENDS = ("joseph", "raymarch")

# Mass attenuation coefficients (cm^2/g, coherent scattering included) from NIST XCOM tables, rounded:
# liquid water (1.0 g/cm^3) and ICRU-44 cortical bone (1.92 g/cm^3).
WATER_MASS_ATTENUATION: dict[float, float] = {
    20: 0.8096, 30: 0.3756, 40: 0.2683, 50: 0.2269, 60: 0.2059, 80: 0.1837, 100: 0.1707, 150: 0.1505,
}
BONE_MASS_ATTENUATION: dict[float, float] = {
    20: 4.001, 30: 1.331, 40: 0.6655, 50: 0.4242, 60: 0.3148, 80: 0.2229, 100: 0.1855, 150: 0.1480,
}
_BONE_DENSITY = 1.92


def _loglog_interp(table: dict[float, float], energy_kev: float) -> float:
    keys = sorted(table)
    if not keys[0] <= energy_kev <= keys[-1]:
        raise ValueError(f"effective energy must be within [{keys[0]}, {keys[-1]}] keV, got {energy_kev}")
    for lo, hi in zip(keys[:-1], keys[1:]):
        if lo <= energy_kev <= hi:
            w = (math.log(energy_kev) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))
    return table[keys[-1]]  # pragma: no cover


def mu_water(energy_kev: float = 70.0) -> float:
    """Linear attenuation of water (1/mm) at an effective photon energy (keV)."""
    return _loglog_interp(WATER_MASS_ATTENUATION, energy_kev) / 10.0


def _mu_bone(energy_kev: float) -> float:
    return _loglog_interp(BONE_MASS_ATTENUATION, energy_kev) * _BONE_DENSITY / 10.0


def _mu_slopes(energy_kev: float, ct_energy_kev: float) -> tuple[float, float, float]:
    """(mu_water, slope below 0 HU, slope above 0 HU) of the bilinear model, in 1/mm and 1/(mm HU)."""
    mw, mw_ct = mu_water(energy_kev), mu_water(ct_energy_kev)
    hu_bone = 1000.0 * (_mu_bone(ct_energy_kev) / mw_ct - 1.0)
    return mw, mw / 1000.0, (_mu_bone(energy_kev) - mw) / hu_bone


def mu_to_hu(mu: torch.Tensor, energy_kev: float = 70.0, ct_energy_kev: float = 70.0) -> torch.Tensor:
    """Inverse of :func:`hu_to_mu` (bilinear model) for mu >= 0; mu below air's maps to -1000 HU."""
    mw, lo, hi = _mu_slopes(energy_kev, ct_energy_kev)
    soft = (mu - mw) / lo
    return torch.where(mu > mw, (mu - mw) / hi, soft).clamp_min(-1000.0)


class _BilinearHUToMu(torch.autograd.Function):
    """Piecewise-linear HU to mu with a one-pass backward (the generic autograd graph costs ~3 passes)."""

    @staticmethod
    def forward(ctx, hu: torch.Tensor, mw: float, slope_lo: float, slope_hi: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(hu)
        ctx.slopes = (slope_lo, slope_hi)
        h = torch.clamp(hu, min=-1000.0)
        mu = torch.addcmul(torch.full_like(h, mw), h, torch.tensor(slope_lo, dtype=h.dtype, device=h.device))
        return torch.addcmul(mu, h.clamp_(min=0.0), torch.tensor(slope_hi - slope_lo, dtype=h.dtype, device=h.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (hu,) = ctx.saved_tensors
        slope_lo, slope_hi = ctx.slopes
        slope = torch.where(hu > 0, slope_hi, slope_lo).masked_fill_(hu < -1000.0, 0.0)
        return grad * slope, None, None, None


def hu_to_mu(hu: torch.Tensor, energy_kev: float = 70.0, ct_energy_kev: float = 70.0) -> torch.Tensor:
    """Converts Hounsfield units to linear attenuation (1/mm), bilinear model.

    Below 0 HU a voxel is an air/water mixture: ``mu = mu_w(E) * (1 + HU/1000)``, so lung (-800 HU)
    keeps 20% of water's attenuation and stays distinct from air (-1000 HU -> 0). Above 0 HU it is a
    water/cortical-bone mixture whose bone fraction is ``HU / HU_bone`` with ``HU_bone`` the bone's CT
    number at the scanner's effective energy; its attenuation is then evaluated at the radiograph's
    effective energy. With ``energy_kev == ct_energy_kev`` this reduces to the definition of HU.

    Args:
        hu: any shape, Hounsfield units (values below -1000 are treated as air).
        energy_kev: effective energy of the radiograph being simulated (20-150 keV).
        ct_energy_kev: effective energy of the CT scan that produced ``hu``.

    Returns:
        ``mu`` in 1/mm, same shape and dtype as ``hu``; differentiable.
    """
    mw, slope_lo, slope_hi = _mu_slopes(energy_kev, ct_energy_kev)
    return _BilinearHUToMu.apply(hu, mw, slope_lo, slope_hi)


def line_integral_to_intensity(
    line_integral: torch.Tensor,
    i0: float = 1.0,
    poisson: bool = False,
    photons: float = 1e5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Beer-Lambert: ``I = I0 * exp(-integral mu dl)``, optionally with quantum (Poisson) noise.

    Args:
        line_integral: any shape, dimensionless ``integral mu dl``.
        i0: unattenuated intensity.
        poisson: draw counts from a Poisson law with ``photons`` expected unattenuated photons per pixel.
        photons: expected photons per pixel without attenuation (only with ``poisson``).
        generator: random generator for reproducible noise.
    """
    intensity = i0 * torch.exp(-line_integral.float())
    if poisson:
        if photons <= 0:
            raise ValueError(f"photons must be > 0, got {photons}")
        counts = torch.poisson(intensity / i0 * photons, generator=generator)
        intensity = counts * (i0 / photons)
    return intensity


def display_image(
    line_integral: torch.Tensor, window: tuple[float, float] | None = None, invert: bool = False
) -> torch.Tensor:
    """Maps line integrals to a [0, 1] display image (bone white on a dark background, as on film).

    Args:
        line_integral: (..., rows, cols).
        window: (low, high) of ``integral mu dl`` mapped to 0 and 1; defaults to the 0.5th-99.5th
            percentile of each image.
        invert: white background instead (as a fluoroscopy screen shows intensity).
    """
    li = line_integral.float()
    if window is None:
        flat = li.flatten(-2)
        lo = torch.quantile(flat, 0.005, dim=-1)[..., None, None]
        hi = torch.quantile(flat, 0.995, dim=-1)[..., None, None]
    else:
        lo, hi = (torch.tensor(float(w)) for w in window)
    img = ((li - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return 1.0 - img if invert else img


def _as_affines(affine: torch.Tensor | None, volume: torch.Tensor, batch: int) -> torch.Tensor:
    if affine is None:
        affine = getattr(volume, "affine", None)
        if affine is None:
            raise ValueError("no affine given and the volume is not a MetaTensor: pass affine=(4,4) or (B,4,4)")
    affine = torch.as_tensor(affine).to(dtype=torch.float64, device=volume.device)
    if affine.ndim == 2:
        affine = affine.expand(batch, 4, 4)
    if affine.shape != (batch, 4, 4):
        raise ValueError(f"affine must be (4,4) or (B,4,4) with B={batch}, got {tuple(affine.shape)}")
    return affine


class DRRProjector(nn.Module):
    """Renders DRRs (line integrals of attenuation) of a batch of volumes.

    Args:
        geometry: default geometry, used when ``forward`` is given none.
        backend: one of :data:`DRR_BACKENDS`.
        input_kind: ``"hu"`` (volumes in Hounsfield units, converted with :func:`hu_to_mu`) or
            ``"mu"`` (volumes already in 1/mm).
        energy_kev: effective energy of the simulated radiograph.
        ct_energy_kev: effective energy of the CT.
        plane_chunk: planes resampled at once by the ``joseph`` backend (memory vs speed).
        samples_per_voxel: ray samples per voxel length for the ``raymarch`` backend.

    Shapes:
        volume: (B, 1, S0, S1, S2) with an affine mapping (S0, S1, S2) indices to RAS mm.
        output: (B, V, rows, cols) line integrals (dimensionless).
    """

    def __init__(
        self,
        geometry: ProjectionGeometry | None = None,
        backend: str = "joseph",
        input_kind: str = "hu",
        energy_kev: float = 70.0,
        ct_energy_kev: float = 70.0,
        plane_chunk: int = 128,
        samples_per_voxel: float = 2.0,
    ) -> None:
        super().__init__()
        if backend not in DRR_BACKENDS:
            raise ValueError(f"backend must be one of {DRR_BACKENDS}, got {backend!r}")
        if input_kind not in ("hu", "mu"):
            raise ValueError(f"input_kind must be 'hu' or 'mu', got {input_kind!r}")
        if plane_chunk < 1:
            raise ValueError(f"plane_chunk must be >= 1, got {plane_chunk}")
        self.geometry = geometry
        self.backend = backend
        self.input_kind = input_kind
        self.energy_kev = energy_kev
        self.ct_energy_kev = ct_energy_kev
        self.plane_chunk = plane_chunk
        self.samples_per_voxel = samples_per_voxel
        mu_water(energy_kev), mu_water(ct_energy_kev)  # validates the energies now

    def forward(
        self,
        volume: torch.Tensor,
        affine: torch.Tensor | None = None,
        geometry: ProjectionGeometry | Sequence[ProjectionGeometry] | None = None,
    ) -> torch.Tensor:
        """Line integrals of ``volume`` for every view of ``geometry``.

        Args:
            volume: (B, 1, S0, S1, S2), HU or 1/mm according to ``input_kind``.
            affine: (4, 4) or (B, 4, 4) voxel to RAS mm; taken from a MetaTensor when omitted.
            geometry: one geometry for the whole batch, or one per sample (same view count and detector).

        Returns:
            (B, V, rows, cols) line integrals, float32 (float64 for float64 input).
        """
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(
                f"volume must be (B, 1, S0, S1, S2), got {tuple(volume.shape)}; add batch/channel dims with "
                "volume[None, None] or select one channel"
            )
        batch = volume.shape[0]
        affines = _as_affines(affine, volume, batch)
        geoms = self._geometries(geometry, batch)
        vol = torch.as_tensor(volume)  # drop MetaTensor bookkeeping for speed
        if isinstance(vol, torch.Tensor) and type(vol) is not torch.Tensor:
            vol = vol.as_tensor()  # type: ignore[attr-defined]
        if vol.device.type == "cpu" and vol.dtype not in (torch.float32, torch.float64):
            vol = vol.float()  # CPU grid_sample has no reduced-precision kernel
        outs = []
        for b in range(batch):
            g = geoms[b].to(volume.device)
            origins, directions = g.rays()
            views = []
            for v in range(g.num_views):
                fn = self._joseph if self.backend == "joseph" else self._raymarch
                views.append(fn(vol[b, 0], affines[b], origins[v], directions[v]))
            outs.append(torch.stack(views))
        return torch.stack(outs)

    def _geometries(self, geometry, batch: int) -> list[ProjectionGeometry]:
        geometry = geometry if geometry is not None else self.geometry
        if geometry is None:
            raise ValueError("no geometry: pass one to DRRProjector(...) or to forward(...)")
        if isinstance(geometry, ProjectionGeometry):
            return [geometry] * batch
        geoms = list(geometry)
        if len(geoms) != batch:
            raise ValueError(f"got {len(geoms)} geometries for a batch of {batch}: pass one, or one per sample")
        first = geoms[0]
        for g in geoms[1:]:
            if g.num_views != first.num_views or g.detector_shape != first.detector_shape:
                raise ValueError("per-sample geometries must share the view count and detector shape")
        return geoms

    # ------------------------------------------------------------------ backends
    def _to_mu(self, values: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "mu":
            return values
        return hu_to_mu(values, self.energy_kev, self.ct_energy_kev)

    @staticmethod
    def _to_voxel(affine: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor):
        inv = torch.linalg.inv(affine)
        o = origins @ inv[:3, :3].T + inv[:3, 3]
        d = directions @ inv[:3, :3].T
        return o, d

    def _joseph(self, vol: torch.Tensor, affine, origins, directions) -> torch.Tensor:
        shape = vol.shape
        o, d = self._to_voxel(affine, origins, directions)
        rows, cols = o.shape[:2]
        central = d[rows // 2, cols // 2].abs()
        axis = int(torch.argmax(central))
        da = d[..., axis]
        if bool((da.abs() < 1e-9).any()):
            raise ValueError("some rays run parallel to the walking axis; use backend='raymarch' for this geometry")
        others = [i for i in range(3) if i != axis]
        # ray/plane k intersection: p_j(k) = base_j + k * slope_j for the two other axes j
        slope = d[..., others] / da[..., None]  # rows, cols, 2
        base = o[..., others] - o[..., axis : axis + 1] * slope
        # path length (mm) between consecutive planes
        step_mm = (directions.norm(dim=-1) / da.abs()).float()
        # normalised grid_sample coordinates: grid[..., 0] indexes the last dim, grid[..., 1] the first
        sizes = torch.tensor([shape[others[0]], shape[others[1]]], dtype=torch.float64, device=vol.device)
        scale = 2.0 / (sizes - 1).clamp_min(1)
        dtype = vol.dtype
        base_n = (base * scale - 1.0).flip(-1).to(dtype)
        slope_n = (slope * scale).flip(-1).to(dtype)
        planes = vol.movedim(axis, 0).unsqueeze(1)  # N, 1, S_b, S_c
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        acc = torch.zeros(rows, cols, dtype=acc_dtype, device=vol.device)
        start = 0
        # split (not slicing) so that the backward pass concatenates chunk gradients once
        for chunk in planes.split(self.plane_chunk):
            k = torch.arange(start, start + chunk.shape[0], dtype=dtype, device=vol.device)[:, None, None, None]
            grid = torch.addcmul(base_n[None], k, slope_n[None])
            # converting chunk by chunk keeps the planes in cache between conversion and sampling
            samples = F.grid_sample(
                self._to_mu(chunk), grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            acc = acc + samples.sum(dim=(0, 1), dtype=acc_dtype)
            start += chunk.shape[0]
        return acc * step_mm.to(acc_dtype)

    def _raymarch(self, vol: torch.Tensor, affine, origins, directions) -> torch.Tensor:
        mu = self._to_mu(vol)
        shape = torch.tensor(mu.shape, dtype=torch.float64, device=mu.device)
        o, d = self._to_voxel(affine, origins, directions)
        # slab intersection of each ray with [-1, S]: the support of the zero-padded trilinear interpolant
        with torch.no_grad():
            inv_d = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
            t0 = (-1.0 - o) * inv_d
            t1 = (shape - o) * inv_d
            t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
            t_far = torch.maximum(t0, t1).amin(-1)
            voxel_len = d.norm(dim=-1)  # voxels per unit t
            n_samples = int(math.ceil(float((t_far - t_near).clamp_min(0).max() * voxel_len.max())
                                      * self.samples_per_voxel)) + 1
        rows, cols = o.shape[:2]
        frac = (torch.arange(n_samples, dtype=torch.float64, device=mu.device) + 0.5) / n_samples
        span = (t_far - t_near).clamp_min(0)
        t = t_near[..., None] + span[..., None] * frac  # rows, cols, n
        pts = o[..., None, :] + t[..., None] * d[..., None, :]  # rows, cols, n, 3 (voxel index)
        norm = pts / (shape - 1).clamp_min(1) * 2.0 - 1.0
        grid = norm.flip(-1).to(mu.dtype)[None]  # 1, rows, cols, n, 3 (x indexes last dim)
        samples = F.grid_sample(mu[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        acc_dtype = torch.float64 if mu.dtype == torch.float64 else torch.float32
        step_mm = (span * directions.norm(dim=-1) / n_samples).to(acc_dtype)
        return samples[0, 0].sum(-1, dtype=acc_dtype) * step_mm


def backprojection_reconstruction(line_integrals: torch.Tensor, geometry: ProjectionGeometry, affine: torch.Tensor,
                                  shape: Sequence[int], energy_kev: float = 70.0, min_chord_mm: float = 1.0) -> torch.Tensor:
    """Naive reconstruction from few views: each ray's mean attenuation smeared back along the ray.

    For each view the line integral is divided by the ray's chord through the reconstruction box (mean mu
    along the ray); every voxel takes the mean over views of the value at its projection, converted to HU.
    It is the floor a learned X-ray -> CT model must beat (it knows the body outline, little else).

    Args:
        line_integrals: (V, rows, cols) integral mu dl of the acquisition (1/mm * mm).
        geometry: the acquisition geometry (V views).
        affine: (4, 4) voxel -> RAS mm of the output grid.
        shape: (S0, S1, S2) of the output grid.

    Returns:
        (1, S0, S1, S2) HU.
    """
    from ctsynth.geometry import backproject_features

    if line_integrals.ndim != 3 or line_integrals.shape[0] != geometry.num_views:
        raise ValueError(f"expected ({geometry.num_views}, rows, cols) line integrals, got {tuple(line_integrals.shape)}")
    li = line_integrals.float()
    ones = torch.ones(1, 1, *shape, dtype=torch.float32, device=li.device)
    with torch.no_grad():
        chord = DRRProjector(geometry, input_kind="mu")(ones, affine)[0]  # mm of box along each ray
        mean_mu = torch.where(chord > min_chord_mm, li / chord.clamp_min(min_chord_mm), torch.zeros_like(li))
        bp = backproject_features(mean_mu[None, :, None], [geometry], torch.as_tensor(affine)[None], tuple(shape))
    return mu_to_hu(bp[:, 0], energy_kev, energy_kev)
