"""Procedural thorax phantoms in Hounsfield units, for offline training and tests.

A phantom is built from signed distance functions (SDF, mm) painted in anatomical order, each with a
partial-volume edge: a voxel whose centre lies at signed distance ``d`` from a surface is covered to
``clip(0.5 - d / h, 0, 1)`` with ``h`` the voxel size, which anti-aliases every boundary.

Anatomy (world RAS mm, centred on the grid; scaled down to fit small fields of view): body outline
varying along z with subcutaneous fat and muscle, lungs with a branching pulmonary vessel tree and
airways (trachea, main bronchi), heart, aorta, pulmonary trunk and arteries (optionally iodine-enhanced
for CTPA, optionally with emboli as filling defects), spine (vertebral bodies, discs, canal, posterior
elements), ribs and sternum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["EMBOLI_SITES", "scanner_appearance", "TISSUE_HU", "PhantomInfo", "grid_affine", "thorax_phantom", "slab_average", "SDFPainter"]

#: Typical CT numbers (HU) per tissue; each phantom jitters them slightly.
#: where :func:`thorax_phantom` places emboli
EMBOLI_SITES = ("lobar", "central")
TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "muscle": 45.0,
    "blood": 40.0,
    "myocardium": 50.0,
    "iodine_artery": 350.0,
    "iodine_aorta": 180.0,
    "embolus": 35.0,
    "cancellous_bone": 250.0,
    "cortical_bone": 900.0,
    "disc": 80.0,
    "csf": 15.0,
    "airway_wall": 30.0,
}


@dataclass
class PhantomInfo:
    """What a phantom contains (written next to it as metadata)."""

    seed: int
    contrast: bool
    emboli: int
    scale_xy: float
    scale_z: float
    hu: dict[str, float] = field(default_factory=dict)


def grid_affine(shape: Sequence[int], spacing: float | Sequence[float]) -> torch.Tensor:
    """RAS affine (float64) of a grid centred on the world origin.

    Args:
        shape: (S0, S1, S2) voxel counts along x (L), y (A), z (S).
        spacing: mm per voxel, one or three values.
    """
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    aff = np.eye(4)
    aff[:3, :3] = np.diag(sp)
    aff[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2.0 * sp
    return torch.from_numpy(aff)


class SDFPainter:
    """Paints SDF shapes with partial-volume edges into a HU grid, each inside its bounding box."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], fill: float = -1000.0) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = -(np.asarray(self.shape) - 1) / 2.0 * self.spacing
        self.h = float(np.mean(self.spacing))
        self.vol = np.full(self.shape, fill, dtype=np.float32)

    def _box(self, lo: np.ndarray, hi: np.ndarray):
        margin = self.h
        i0 = np.floor((lo - margin - self.origin) / self.spacing).astype(int)
        i1 = np.ceil((hi + margin - self.origin) / self.spacing).astype(int) + 1
        i0 = np.clip(i0, 0, self.shape)
        i1 = np.clip(i1, 0, self.shape)
        if np.any(i1 <= i0):
            return None
        axes = [self.origin[a] + self.spacing[a] * np.arange(i0[a], i1[a]) for a in range(3)]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        return (slice(i0[0], i1[0]), slice(i0[1], i1[1]), slice(i0[2], i1[2])), x, y, z

    def paint(self, sdf, lo, hi, value: float, inside_only: np.ndarray | None = None) -> None:
        """Paints ``value`` where ``sdf(x, y, z) <= 0`` (mm), blending the edge.

        Args:
            sdf: callable on world coordinate arrays (mm) returning signed distances (mm).
            lo, hi: world bounding box (mm) of the shape.
            value: HU inside.
            inside_only: optional boolean grid; painting is restricted to it.
        """
        box = self._box(np.asarray(lo, float), np.asarray(hi, float))
        if box is None:
            return
        sl, x, y, z = box
        occ = np.clip(0.5 - sdf(x, y, z) / self.h, 0.0, 1.0).astype(np.float32)
        if inside_only is not None:
            occ *= inside_only[sl]
        region = self.vol[sl]
        region += occ * (np.float32(value) - region)

    # ---------------------------------------------------------------- primitives
    def ellipsoid(self, center, radii, value: float, **kw) -> None:
        c, r = np.asarray(center, float), np.asarray(radii, float)

        def sdf(x, y, z):
            q = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
            return (q - 1.0) * r.min()

        self.paint(sdf, c - r, c + r, value, **kw)

    def capsule(self, a, b, radius: float, value: float, **kw) -> None:
        a, b = np.asarray(a, float), np.asarray(b, float)
        ab = b - a
        denom = max(float(ab @ ab), 1e-9)

        def sdf(x, y, z):
            t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom, 0.0, 1.0)
            return np.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2) - radius

        self.paint(sdf, np.minimum(a, b) - radius, np.maximum(a, b) + radius, value, **kw)

    def elliptic_cylinder(self, center_xy, radii_fn, z_range, value: float, **kw) -> None:
        """Cylinder along z whose elliptic cross-section ``radii_fn(z) -> (rx, ry)`` varies with z."""
        cx, cy = center_xy
        z0, z1 = z_range
        zs = np.linspace(z0, z1, 16)
        rmax = np.max([radii_fn(zz) for zz in zs], axis=0)

        def sdf(x, y, z):
            rx, ry = radii_fn(z)
            q = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
            radial = (q - 1.0) * np.minimum(rx, ry)
            axial = np.maximum(z0 - z, z - z1)
            return np.maximum(radial, axial)

        self.paint(sdf, (cx - rmax[0], cy - rmax[1], z0), (cx + rmax[0], cy + rmax[1], z1), value, **kw)

    def polyline(self, points: Sequence[Sequence[float]], radius: float, value: float, **kw) -> None:
        for p, q in zip(points[:-1], points[1:]):
            self.capsule(p, q, radius, value, **kw)


def _jitter(rng: np.random.Generator, hu: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in hu.items():
        out[k] = v if k == "air" else float(v + rng.normal(0.0, 8.0 if abs(v) < 200 else 20.0))
    return out


def _vessel_tree(rng, start, direction, length, radius, depth, lung_c, lung_r, out) -> None:
    d = np.asarray(direction, float)
    d /= np.linalg.norm(d)
    end = np.asarray(start, float) + d * length
    # keep the branch inside its lung
    q = np.sqrt((((end - lung_c) / lung_r) ** 2).sum())
    if q > 0.92:
        end = lung_c + (end - lung_c) / q * 0.92
    out.append((np.asarray(start, float), end, radius, depth))
    if depth <= 0:
        return
    for _ in range(2):
        nd = d + rng.normal(0.0, 0.55, 3)
        _vessel_tree(rng, end, nd, length * 0.72, radius * 0.7, depth - 1, lung_c, lung_r, out)


def _fine_anatomy(p: SDFPainter, rng: np.random.Generator, lungs, vessel_hu: float, hu: dict[str, float], sxy: float,
                  detail: float) -> None:
    """Peripheral vessel trees in random directions, nodules and a smooth texture (see ``thorax_phantom``)."""
    for lc, lr in lungs:
        segments: list[tuple[np.ndarray, np.ndarray, float, int]] = []
        for _ in range(int(round(12 * detail))):
            u = rng.normal(size=3)
            start = lc + lr * u / np.linalg.norm(u) * rng.uniform(0.1, 0.6)
            _vessel_tree(rng, start, rng.normal(size=3), 22 * sxy, 2.8 * sxy, 3, lc, lr, segments)
        for a, b, rad, _ in segments:
            p.capsule(a, b, max(rad, 0.6 * p.h), vessel_hu)
        for _ in range(int(rng.integers(0, int(round(3 * detail)) + 1))):
            u = rng.normal(size=3)
            p.ellipsoid(lc + lr * u / np.linalg.norm(u) * rng.uniform(0.1, 0.7), np.full(3, rng.uniform(2.5, 6.0) * sxy),
                        hu["muscle"])
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.normal(size=p.shape).astype(np.float32), sigma=2.0 / p.spacing)  # 2 mm grain
    texture *= np.float32(20.0 * detail / max(float(texture.std()), 1e-6))
    p.vol += texture * (p.vol > -990.0)


def thorax_phantom(
    shape: Sequence[int] = (128, 128, 128),
    spacing: float | Sequence[float] = 3.0,
    seed: int = 0,
    contrast: bool = False,
    emboli: float = 0.0,
    noise_hu: float = 0.0,
    fit_fov: bool = True,
    detail: float = 0.0,
    keep_proportions: bool = False,
    realism: float = 0.0,
    emboli_sites: str = "lobar",
) -> tuple[MetaTensor, PhantomInfo]:
    """Generates a random thorax phantom in HU.

    Args:
        shape: (S0, S1, S2) voxels along x (patient left), y (anterior), z (superior).
        spacing: mm per voxel, one or three values.
        seed: random seed (each seed is a different "patient").
        contrast: iodine contrast in the pulmonary arteries and right heart (CTPA).
        emboli: probability that the phantom has pulmonary emboli (filling defects; needs ``contrast``
            to be visible, present either way).
        emboli_sites: where the 1-3 emboli lodge (:data:`EMBOLI_SITES`), each a filling defect of 0.75 x its
            artery's radius over 35 % of the artery's length: ``lobar`` in the lobar arteries and their first
            branches (radii about 6 and 4 mm before scaling: one to two voxels at 5 mm), ``central``: one in the
            left or right main pulmonary artery (about 12-14 mm across, as central emboli are), the others in
            lobar arteries.
        noise_hu: standard deviation of added Gaussian noise (HU).
        fit_fov: shrink the anatomy to fit a field of view smaller than an adult thorax: x and y to the in-plane
            field of view, z on its own to the depth (so the anatomy is stretched or squashed along z).
        keep_proportions: with ``fit_fov``, scale z like x and y, so the anatomy keeps an adult's proportions
            and the depth shows as much of it as fits (with a 64 x 64 x 84 grid at 2 mm the default stretches it
            1.3-1.5 times along z, which makes through-plane structure smoother than in-plane structure).
        detail: fine anatomy without a preferred direction, as real CT has it at millimetre scale: peripheral
            pulmonary vessel trees growing in random 3D directions, lung nodules, and a smooth tissue texture
            (about 20 HU). 0 (the default): none, the large anatomy only, which is elongated along z; 1: about a
            dozen peripheral trees per lung. Drawn from a separate random stream, so the large anatomy of a seed
            does not change with ``detail``.
        realism: what a scanner adds to the anatomy, scaled by this factor (0: none; 1: a routine chest CT),
            drawn from its own random stream (the anatomy of a seed does not change): partial volume (the
            anatomy blurred by a Gaussian system response of ``0.5 * realism`` voxels' sigma on every axis),
            lung parenchyma and soft-tissue texture (a correlated random field of ``30 * realism`` HU in lung and
            ``10 * realism`` HU in soft tissue) and quantum noise with CT's noise power spectrum (white noise
            filtered in-plane by ``|f| exp(-(|f| / f_c)^2)``, the ramp of filtered back-projection rolled off by the
            kernel, ``f_c`` at half the Nyquist frequency; slightly correlated along z; ``20 * realism`` HU
            standard deviation).

    Returns:
        ``(volume, info)``: a (1, S0, S1, S2) float32 MetaTensor in HU with its RAS affine, and what it holds.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be three sizes >= 4, got {shape}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if np.any(sp <= 0):
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    if not 0.0 <= emboli <= 1.0:
        raise ValueError(f"emboli is a probability in [0, 1], got {emboli}")
    if emboli_sites not in EMBOLI_SITES:
        raise ValueError(f"emboli_sites must be one of {EMBOLI_SITES}, got {emboli_sites!r}")
    if detail < 0:
        raise ValueError(f"detail must be >= 0 (0: none, 1: about a dozen peripheral vessel trees per lung), got {detail}")
    if not 0.0 <= realism <= 10.0:
        raise ValueError(f"realism must be in [0, 10] (0: none, 1: a routine chest CT), got {realism}")
    rng = np.random.default_rng(seed)
    hu = _jitter(rng, TISSUE_HU)
    fov = np.asarray(shape) * sp
    half_w, half_ap, half_h = 170.0 * rng.uniform(0.9, 1.08), 118.0 * rng.uniform(0.9, 1.1), 170.0
    sxy = min(1.0, 0.92 * fov[0] / (2 * half_w), 0.92 * fov[1] / (2 * half_ap)) if fit_fov else 1.0
    sz = sxy if keep_proportions or not fit_fov else min(1.0, fov[2] / (2 * half_h))
    S = np.array([sxy, sxy, sz])

    def P(x, y, z):  # anatomical mm -> world mm
        return np.array([x, y, z]) * S

    p = SDFPainter(shape, sp)
    zlim = (-half_h * 1.5 * sz, half_h * 1.5 * sz)
    wob = rng.uniform(0.03, 0.08)
    phase = rng.uniform(0, 2 * math.pi)

    def body_radii(z, k=1.0):
        zn = np.asarray(z) / (half_h * sz)
        f = 1.0 + wob * np.sin(2.2 * zn + phase) - 0.06 * np.clip(zn, 0, None) ** 2
        return k * half_w * sxy * f, k * half_ap * sxy * f

    # body: fat envelope, then muscle wall, then mediastinal soft tissue
    p.elliptic_cylinder((0, 0), lambda z: body_radii(z, 1.0), zlim, hu["fat"])
    p.elliptic_cylinder((0, 0), lambda z: body_radii(z, 0.9), zlim, hu["muscle"])
    p.elliptic_cylinder((0, 0), lambda z: body_radii(z, 0.8), zlim, hu["fat"] * 0.5)
    # lungs
    lungs = []
    for side in (-1, 1):
        c = P(side * 72 * rng.uniform(0.95, 1.05), -8, 25)
        r = np.array([58, 82, 135]) * rng.uniform(0.92, 1.06, 3) * S
        lungs.append((c, r))
        p.ellipsoid(c, r, hu["lung"])
    # heart (left-anterior, lower mediastinum) and, with contrast, the enhanced right heart
    heart_c = P(18, 38, -45)
    p.ellipsoid(heart_c, np.array([62, 52, 58]) * S, hu["myocardium"])
    p.ellipsoid(heart_c + P(10, -5, 0), np.array([34, 28, 34]) * S, hu["blood"])
    if contrast:
        p.ellipsoid(heart_c + P(-22, 14, 5), np.array([26, 20, 28]) * S, hu["iodine_artery"])
    # aorta: ascending, arch, descending beside the spine
    aorta_hu = hu["iodine_aorta"] if contrast else hu["blood"]
    aorta = [P(8, 22, -20), P(8, 22, 55), P(12, 5, 85), P(22, -30, 80), P(24, -52, 55), P(24, -52, -160)]
    p.polyline(aorta, 13 * sxy, aorta_hu)
    # pulmonary trunk and arteries
    pa_hu = hu["iodine_artery"] if contrast else hu["blood"]
    trunk = [P(-2, 52, -25), P(2, 30, 30)]
    p.polyline(trunk, 13 * sxy, pa_hu)
    segments: list[tuple[np.ndarray, np.ndarray, float, int]] = []
    main_arteries: list[tuple[np.ndarray, np.ndarray, float, int]] = []
    for side, (lc, lr) in zip((-1, 1), lungs):
        hilum = P(side * 48, 6, 25)
        p.capsule(trunk[1], hilum, 9 * sxy, pa_hu)
        main_arteries.append((np.asarray(trunk[1], float), np.asarray(hilum, float), 9 * sxy, 4))
        _vessel_tree(rng, hilum, np.array([side * 1.0, -0.1, 0.2]), 48 * sxy, 6.0 * sxy, 3, lc, lr, segments)
        _vessel_tree(rng, hilum, np.array([side * 0.7, 0.1, -0.9]), 48 * sxy, 6.0 * sxy, 3, lc, lr, segments)
    for a, b, rad, _ in segments:
        p.capsule(a, b, max(rad, 0.6 * p.h), pa_hu)
    # emboli: filling defects inside proximal arteries
    n_emboli = 0
    if rng.uniform() < emboli:
        n_emboli = int(rng.integers(1, 4))
        if emboli_sites == "lobar":
            big = [s for s in segments if s[3] >= 2]
            sites = [big[i] for i in rng.choice(len(big), size=min(n_emboli, len(big)), replace=False)]
        else:  # one main pulmonary artery, the others in lobar arteries
            lobar = [s for s in segments if s[3] >= 3]
            sites = [main_arteries[int(rng.integers(0, 2))]] + [
                lobar[i] for i in rng.choice(len(lobar), size=min(n_emboli - 1, len(lobar)), replace=False)]
        for a, b, rad, _ in sites:
            t0 = rng.uniform(0.1, 0.5)
            p.capsule(a + (b - a) * t0, a + (b - a) * (t0 + 0.35), max(rad * 0.75, 0.6 * p.h), hu["embolus"])
    # airways: trachea and main bronchi (air with a wall)
    carina = P(0, 12, 45)
    trachea = [P(0, 18, 200), carina]
    for (a, b) in [(trachea[0], trachea[1]), (carina, P(-42, 6, 25)), (carina, P(42, 6, 25))]:
        p.capsule(a, b, 11 * sxy, hu["airway_wall"])
    for (a, b) in [(trachea[0], trachea[1]), (carina, P(-42, 6, 25)), (carina, P(42, 6, 25))]:
        p.capsule(a, b, 8.5 * sxy, hu["air"])
    # spine: vertebral bodies with discs, canal and posterior elements
    period = 28.0 * sz
    z = zlim[0]
    while z < zlim[1]:
        top = min(z + period * 0.78, zlim[1])
        p.elliptic_cylinder(P(0, -82, 0)[:2], lambda _z: (19 * sxy, 16 * sxy), (z, top), hu["cortical_bone"])
        p.elliptic_cylinder(P(0, -82, 0)[:2], lambda _z: (16 * sxy, 13 * sxy), (z + 1.5 * sz, top - 1.5 * sz),
                            hu["cancellous_bone"])
        p.elliptic_cylinder(P(0, -82, 0)[:2], lambda _z: (18 * sxy, 15 * sxy), (top, min(z + period, zlim[1])),
                            hu["disc"])
        p.capsule(P(0, -118, 0) + np.array([0, 0, z + period * 0.2]),
                  P(0, -132, 0) + np.array([0, 0, z + period * 0.55]), 7 * sxy, hu["cortical_bone"])
        z += period
    p.elliptic_cylinder(P(0, -106, 0)[:2], lambda _z: (8 * sxy, 7 * sxy), zlim, hu["csf"])
    # ribs: tubes along the inner body outline, sloping down towards the front
    for level in np.arange(-150, 190, 30) * sz:
        for side in (-1, 1):
            pts = []
            for phi in np.linspace(-0.45 * math.pi, 0.42 * math.pi, 14):
                rx, ry = body_radii(level, 0.86)
                x = side * rx * math.cos(phi)
                y = ry * math.sin(phi) * 0.95 - 6 * sxy
                zz = level - 22 * sz * (phi + 0.45 * math.pi) / (0.87 * math.pi)
                pts.append((x, y, zz))
            p.polyline(pts, 4.5 * sxy, hu["cortical_bone"])
    # sternum
    p.capsule(P(0, 100, -70), P(0, 104, 95), 9 * sxy, hu["cortical_bone"] * 0.6)
    if detail > 0:
        _fine_anatomy(p, np.random.default_rng([seed, 2]), lungs, pa_hu, hu, sxy, detail)
    vol = p.vol
    if realism > 0:
        vol = scanner_appearance(vol, realism, np.random.default_rng([seed, 3]))
    if noise_hu > 0:
        vol = vol + rng.normal(0.0, noise_hu, vol.shape).astype(np.float32)
    info = PhantomInfo(seed=seed, contrast=contrast, emboli=n_emboli, scale_xy=float(sxy), scale_z=float(sz), hu=hu)
    return MetaTensor(torch.from_numpy(vol)[None], affine=grid_affine(shape, sp)), info


def scanner_appearance(vol: np.ndarray, realism: float, rng: np.random.Generator) -> np.ndarray:
    """What a CT scanner adds to anatomy ``vol`` (X, Y, Z in HU), scaled by ``realism`` (see :func:`thorax_phantom`):
    partial volume, tissue texture, then quantum noise with CT's noise power spectrum. Returns float32 HU."""
    from scipy.ndimage import gaussian_filter

    anatomy = np.asarray(vol, dtype=np.float32)
    # tissue texture, by the sharp anatomy's tissue: lung parenchyma is heterogeneous, soft tissue less so
    field = gaussian_filter(rng.standard_normal(anatomy.shape).astype(np.float32), 1.0)
    field /= max(float(field.std()), 1e-6)
    lung = (anatomy > -950) & (anatomy < -500)
    soft = (anatomy > -200) & (anatomy < 300)
    textured = anatomy + realism * field * np.where(lung, 30.0, np.where(soft, 10.0, 0.0)).astype(np.float32)
    # partial volume: the system response blurs every edge over about a voxel
    blurred = gaussian_filter(textured, 0.5 * realism)
    # quantum noise: white noise through the in-plane noise power spectrum of filtered back-projection
    white = rng.standard_normal(anatomy.shape).astype(np.float32)
    fx = np.fft.fftfreq(anatomy.shape[0])[:, None]
    fy = np.fft.fftfreq(anatomy.shape[1])[None, :]
    f = np.sqrt(fx ** 2 + fy ** 2)  # cycles per voxel; Nyquist 0.5
    shaping = (f * np.exp(-(f / 0.25) ** 2)).astype(np.float32)[..., None]
    noise = np.real(np.fft.ifft2(np.fft.fft2(white, axes=(0, 1)) * shaping, axes=(0, 1))).astype(np.float32)
    noise = gaussian_filter(noise, (0.0, 0.0, 0.5))  # neighbouring reconstructed slices share projections
    noise *= np.float32(20.0 * realism / max(float(noise.std()), 1e-6))
    return (blurred + noise).astype(np.float32)


def slab_average(volume: torch.Tensor, factor: int, axis: int = -1, stride: int | None = None) -> MetaTensor:
    """Thick slices from thin ones by averaging slabs of ``factor`` consecutive slices.

    Slice ``j`` of the result averages thin slices ``j*stride .. j*stride+factor-1`` and sits at their
    mean position: the affine's origin moves by ``(factor-1)/2`` thin slices along the axis and the
    spacing becomes ``stride`` thin slices. Trailing slices that do not fill a slab are dropped.

    Args:
        volume: (C, S0, S1, S2) MetaTensor (or tensor, then the identity affine is assumed).
        factor: thin slices per thick slice (e.g. 5 for 1 mm -> 5 mm).
        axis: spatial axis of the slices (0, 1, 2, or negative).
        stride: thin slices between thick slice centres (default ``factor``: contiguous slabs).

    Returns:
        (C, S0', S1', S2') MetaTensor with the corrected affine.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    stride = factor if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if volume.ndim != 4:
        raise ValueError(f"expected a channel-first (C, S0, S1, S2) volume, got shape {tuple(volume.shape)}")
    ax = axis % 3
    n = volume.shape[1 + ax]
    if n < factor:
        raise ValueError(f"cannot average {factor} slices from a volume with {n} slices along axis {ax}")
    data = torch.as_tensor(volume).float()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    moved = data.movedim(1 + ax, -1)
    slabs = moved.unfold(-1, factor, stride).mean(-1)
    out = slabs.movedim(-1, 1 + ax).contiguous()
    affine = torch.as_tensor(getattr(volume, "affine", torch.eye(4)), dtype=torch.float64).clone()
    col = affine[:3, ax].clone()
    affine[:3, 3] = affine[:3, 3] + col * (factor - 1) / 2.0
    affine[:3, ax] = col * stride
    return MetaTensor(out, affine=affine)
