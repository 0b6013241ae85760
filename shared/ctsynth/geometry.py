"""Projection geometry for radiographs rendered from, and reconstructed into, CT volumes.

Everything is expressed in world millimetres in the RAS frame (x: patient Left, y: Anterior, z:
Superior), the frame a NIfTI affine or a MONAI ``MetaTensor.affine`` maps voxel indices into.

A view is described by its gantry angle ``theta`` (degrees) about the superior (z) axis through the
isocentre:

* source direction ``s(theta) = (-sin theta, cos theta, 0)``: the source sits at
  ``isocentre + sid * s``; ``theta = 0`` puts it anterior (an AP radiograph), ``90`` at the patient's
  right (a left-lateral radiograph, the left side against the detector), ``180`` posterior (PA);
* detector centre at ``source - sdd * s`` (``sdd`` from the source, behind the patient);
* detector columns run along ``u(theta) = (cos theta, sin theta, 0)`` (for AP/PA the patient's right is
  on the viewer's left) and detector rows run along ``v = (0, 0, -1)`` (row 0 is superior).

Cone beam: every ray starts at the source and passes through a detector pixel centre. Parallel beam:
every ray is perpendicular to the detector (direction ``-s``); ``sid``/``sdd`` then only place the
detector.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctsynth.atomic import atomic_write_json

__all__ = ["NAMED_VIEWS", "BEAM_KINDS", "ProjectionGeometry", "parse_views", "check_finite", "volume_center", "volume_extent_mm",
           "voxel_world_coordinates", "cube_affine", "radiograph_geometry", "detector_sampling_grid",
           "backproject_features"]

#: Named views and their gantry angle in degrees.
NAMED_VIEWS: dict[str, float] = {"ap": 0.0, "lateral": 90.0, "pa": 180.0, "lateral-right": 270.0}
#: Supported beam kinds.
BEAM_KINDS = ("cone", "parallel")
#: limits a geometry must keep (a detector of 8192 pixels a side, 1 um pixels, 100 m distances)
MAX_DETECTOR_PIXELS, MIN_PIXEL_SPACING_MM, MAX_DISTANCE_MM = 8192, 1e-3, 1e5
_REQUIRED_KEYS = ("kind", "angles_deg", "sid_mm", "sdd_mm", "detector_shape", "pixel_spacing_mm", "isocenter_mm")


def parse_views(views: str | int | float | Sequence[str | float]) -> list[float]:
    """Turns a view description into gantry angles in degrees.

    Args:
        views: ``"ap,lateral"``, a list of names and/or angles, or an integer ``n`` for ``n`` views
            evenly spaced over 180 degrees starting at AP (``n=2`` gives AP + lateral).

    Returns:
        The gantry angles in degrees.

    Raises:
        ValueError: an unknown view name or an empty list.
    """
    if isinstance(views, bool):
        raise ValueError(f"views must be names, angles or a count, got {views!r}")
    if isinstance(views, int):
        if views < 1:
            raise ValueError(f"the number of views must be >= 1, got {views}")
        return [180.0 * i / views for i in range(views)]
    if isinstance(views, float):
        return [views]
    items: Sequence[Any] = views.split(",") if isinstance(views, str) else views
    angles: list[float] = []
    for item in items:
        if isinstance(item, str):
            name = item.strip().lower()
            if name in NAMED_VIEWS:
                angles.append(NAMED_VIEWS[name])
                continue
            try:
                angles.append(float(name))
            except ValueError:
                raise ValueError(
                    f"unknown view {item!r}: expected one of {sorted(NAMED_VIEWS)} or an angle in degrees"
                ) from None
        else:
            angles.append(float(item))
    if not angles:
        raise ValueError("no views given: name at least one, e.g. 'ap,lateral'")
    _check_angles(angles, "views")
    return angles


def _check_angles(angles: Sequence[float], source: str) -> None:
    """Refuses non-finite angles and views that repeat (equal modulo 360 degrees)."""
    bad = [a for a in angles if not math.isfinite(float(a))]
    if bad:
        raise ValueError(f"{source}: view angle {bad[0]!r} is not a finite number of degrees; give names "
                         f"({', '.join(NAMED_VIEWS)}) or angles such as 0,90")
    seen: dict[float, int] = {}
    for i, a in enumerate(angles):
        key = round(float(a) % 360.0, 4)
        if key in seen:
            raise ValueError(f"{source}: views {seen[key] + 1} and {i + 1} are the same ({float(a):g} degrees); "
                             "give each view once")
        seen[key] = i


def check_finite(name: str, values: Any, source: str, positive: bool = False, lo: float | None = None,
            hi: float | None = None) -> None:
    """Refuses NaN / Inf (and, with ``positive``, values <= 0; values outside ``[lo, hi]``) in ``values``.

    Raises:
        ValueError: naming ``source`` and the field ``name``.
    """
    for v in torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist():
        if not math.isfinite(v) or (positive and v <= 0) or (lo is not None and v < lo) or (hi is not None and v > hi):
            want = "a finite number" + (" > 0" if positive else "") + (f" in [{lo:g}, {hi:g}]" if lo is not None else "")
            raise ValueError(f"{source}: {name} is {v!r}, expected {want}; correct it (or re-create the geometry "
                             "with `ctsynth drr` / ProjectionGeometry.save_json)")


def volume_center(affine: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """World position (mm) of the centre of a voxel grid.

    Args:
        affine: (4, 4) voxel-index to world (RAS mm) matrix.
        spatial_shape: the grid's three sizes, in the affine's index order.

    Returns:
        (3,) centre in mm.
    """
    affine = torch.as_tensor(affine, dtype=torch.float64)
    idx = torch.tensor([(s - 1) / 2.0 for s in spatial_shape] + [1.0], dtype=torch.float64)
    return (affine @ idx)[:3]


def volume_extent_mm(affine: torch.Tensor, spatial_shape: Sequence[int]) -> list[float]:
    """Physical length (mm) of a voxel grid along each of its three index axes."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return [float(torch.linalg.norm(affine[:3, i])) * int(spatial_shape[i]) for i in range(3)]


def voxel_world_coordinates(affine: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """World RAS positions (mm) of every voxel centre of a grid, float64.

    Returns:
        (S0, S1, S2, 3), on the affine's device.
    """
    affine = torch.as_tensor(affine, dtype=torch.float64)
    axes = [torch.arange(int(s), dtype=torch.float64, device=affine.device) for s in spatial_shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def cube_affine(size: int, fov_mm: float, center_mm: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(4, 4) float64 affine of an axis-aligned RAS cube of ``size`` voxels spanning ``fov_mm`` around ``center_mm``."""
    sp = float(fov_mm) / int(size)
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, :3] *= sp
    aff[:3, 3] = torch.as_tensor(center_mm, dtype=torch.float64).reshape(3) - (int(size) - 1) / 2.0 * sp
    return aff


class ProjectionGeometry(nn.Module):
    """Cone- or parallel-beam acquisition geometry of one or more views, in world millimetres.

    The numeric parameters are registered buffers, so the geometry moves with ``.to(device)`` and is
    saved in a ``state_dict``; everything else is derived.

    Args:
        angles_deg: gantry angle of each view in degrees (see :func:`parse_views`).
        sid_mm: source to isocentre distance in mm.
        sdd_mm: source to detector distance in mm (``>= sid_mm``).
        detector_shape: detector (rows, columns) in pixels.
        pixel_spacing_mm: detector pixel spacing (row, column) in mm, or one number for both.
        isocenter_mm: (3,) rotation centre in world RAS mm.
        kind: ``"cone"`` or ``"parallel"``.

    Example:
        >>> g = ProjectionGeometry.for_volume(torch.eye(4), (64, 64, 64), views="ap,lateral",
        ...                                   detector_shape=(128, 128), pixel_spacing_mm=1.0)
        >>> g.num_views, g.magnification
        (2, 1.2)
    """

    angles_deg: torch.Tensor
    sid_mm: torch.Tensor
    sdd_mm: torch.Tensor
    pixel_spacing_mm: torch.Tensor
    isocenter_mm: torch.Tensor

    def __init__(
        self,
        angles_deg: Sequence[float] | torch.Tensor = (0.0, 90.0),
        sid_mm: float = 1000.0,
        sdd_mm: float = 1200.0,
        detector_shape: Sequence[int] = (256, 256),
        pixel_spacing_mm: float | Sequence[float] = 1.6,
        isocenter_mm: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
        kind: str = "cone",
        source: str = "geometry",
    ) -> None:
        super().__init__()
        if kind not in BEAM_KINDS:
            raise ValueError(f"{source}: kind must be one of {BEAM_KINDS}, got {kind!r}")
        angles = torch.as_tensor(angles_deg, dtype=torch.float32).reshape(-1)
        if angles.numel() == 0:
            raise ValueError(f"{source}: a geometry needs at least one view angle")
        _check_angles(angles.tolist(), source)
        check_finite("sid_mm", sid_mm, source, lo=1.0, hi=MAX_DISTANCE_MM)
        check_finite("sdd_mm", sdd_mm, source, lo=1.0, hi=MAX_DISTANCE_MM)
        if float(sdd_mm) < float(sid_mm):
            raise ValueError(f"{source}: need sid_mm <= sdd_mm (source-isocentre <= source-detector), got "
                             f"sid={sid_mm}, sdd={sdd_mm}; correct the distances")
        shape = tuple(int(s) for s in detector_shape)
        if len(shape) != 2 or min(shape) < 1 or max(shape) > MAX_DETECTOR_PIXELS:
            raise ValueError(f"{source}: detector_shape must be (rows, columns) from 1 to {MAX_DETECTOR_PIXELS}, got "
                             f"{list(detector_shape)}; pass a detector size such as --size 256")
        spacing = torch.as_tensor(pixel_spacing_mm, dtype=torch.float32).reshape(-1)
        if spacing.numel() == 1:
            spacing = spacing.repeat(2)
        if spacing.numel() != 2:
            raise ValueError(f"{source}: pixel_spacing_mm must be one or two numbers (mm), got {pixel_spacing_mm}")
        check_finite("pixel_spacing_mm", spacing, source, lo=MIN_PIXEL_SPACING_MM, hi=100.0)
        iso = torch.as_tensor(isocenter_mm, dtype=torch.float32).reshape(-1)
        if iso.numel() != 3:
            raise ValueError(f"{source}: isocenter_mm must have 3 values (RAS mm), got {iso.numel()}")
        check_finite("isocenter_mm", iso, source)
        self.kind = kind
        self.detector_shape: tuple[int, int] = (shape[0], shape[1])
        self.register_buffer("angles_deg", angles)
        self.register_buffer("sid_mm", torch.tensor(float(sid_mm)))
        self.register_buffer("sdd_mm", torch.tensor(float(sdd_mm)))
        self.register_buffer("pixel_spacing_mm", spacing)
        self.register_buffer("isocenter_mm", iso)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_volume(
        cls,
        affine: torch.Tensor,
        spatial_shape: Sequence[int],
        views: str | int | Sequence[str | float] = "ap,lateral",
        **kwargs: Any,
    ) -> ProjectionGeometry:
        """A geometry whose isocentre is the centre of the given voxel grid.

        Args:
            affine: (4, 4) voxel to world RAS mm.
            spatial_shape: grid size in the affine's index order.
            views: see :func:`parse_views`.
            kwargs: the other constructor arguments.
        """
        return cls(angles_deg=parse_views(views), isocenter_mm=volume_center(affine, spatial_shape), **kwargs)

    # ------------------------------------------------------------------ derived properties
    @property
    def num_views(self) -> int:
        return int(self.angles_deg.numel())

    @property
    def magnification(self) -> float:
        """Magnification of an object at the isocentre (``sdd / sid``; 1 for parallel beam)."""
        return 1.0 if self.kind == "parallel" else float(self.sdd_mm / self.sid_mm)

    @property
    def source_directions(self) -> torch.Tensor:
        """(V, 3) unit vectors from the isocentre towards each source."""
        t = torch.deg2rad(self.angles_deg.double())
        return torch.stack([-torch.sin(t), torch.cos(t), torch.zeros_like(t)], -1)

    @property
    def u_axes(self) -> torch.Tensor:
        """(V, 3) unit vectors along increasing detector column."""
        t = torch.deg2rad(self.angles_deg.double())
        return torch.stack([torch.cos(t), torch.sin(t), torch.zeros_like(t)], -1)

    @property
    def v_axes(self) -> torch.Tensor:
        """(V, 3) unit vectors along increasing detector row (towards the feet)."""
        v = torch.zeros(self.num_views, 3, dtype=torch.float64, device=self.angles_deg.device)
        v[:, 2] = -1.0
        return v

    @property
    def source_positions(self) -> torch.Tensor:
        """(V, 3) source positions in world mm."""
        return self.isocenter_mm.double() + self.sid_mm.double() * self.source_directions

    @property
    def detector_centers(self) -> torch.Tensor:
        """(V, 3) detector centres in world mm."""
        return self.source_positions - self.sdd_mm.double() * self.source_directions

    def pixel_positions(self) -> torch.Tensor:
        """(V, rows, cols, 3) world positions (mm) of every detector pixel centre, float64."""
        rows, cols = self.detector_shape
        dev = self.angles_deg.device
        r = (torch.arange(rows, dtype=torch.float64, device=dev) - (rows - 1) / 2.0) * float(self.pixel_spacing_mm[0])
        c = (torch.arange(cols, dtype=torch.float64, device=dev) - (cols - 1) / 2.0) * float(self.pixel_spacing_mm[1])
        centers = self.detector_centers[:, None, None, :]
        u = self.u_axes[:, None, None, :]
        v = self.v_axes[:, None, None, :]
        return centers + c[None, None, :, None] * u + r[None, :, None, None] * v

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every ray as an origin and a direction (source towards detector), float64.

        Returns:
            ``(origins, directions)``, each (V, rows, cols, 3) in mm. For a cone beam the origin is the
            source and the direction ends at the pixel; for a parallel beam the origin is the pixel moved
            back by ``sdd`` and the direction is ``sdd * (-s)``.
        """
        pix = self.pixel_positions()
        if self.kind == "cone":
            src = self.source_positions[:, None, None, :].expand_as(pix)
            return src, pix - src
        d = (-self.source_directions * self.sdd_mm.double())[:, None, None, :].expand_as(pix)
        return pix - d, d

    def project_points(self, points_mm: torch.Tensor) -> torch.Tensor:
        """Projects world points onto each detector.

        Args:
            points_mm: (N, 3) world RAS mm.

        Returns:
            (V, N, 2) detector (row, column) coordinates in pixels (fractional; 0 is the first pixel
            centre).
        """
        p = torch.as_tensor(points_mm, dtype=torch.float64, device=self.angles_deg.device)[None]  # 1,N,3
        src = self.source_positions[:, None]
        s = self.source_directions[:, None]
        det_c = self.detector_centers[:, None]
        if self.kind == "cone":
            d = p - src
            # intersection with the detector plane {x : (x - det_c) . s = 0}
            t = ((det_c - src) * s).sum(-1, keepdim=True) / (d * s).sum(-1, keepdim=True)
            hit = src + t * d
        else:
            hit = p - ((p - det_c) * s).sum(-1, keepdim=True) * s
        rel = hit - det_c
        rows, cols = self.detector_shape
        col = (rel * self.u_axes[:, None]).sum(-1) / float(self.pixel_spacing_mm[1]) + (cols - 1) / 2.0
        row = (rel * self.v_axes[:, None]).sum(-1) / float(self.pixel_spacing_mm[0]) + (rows - 1) / 2.0
        return torch.stack([row, col], -1)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (units in the key names)."""
        return {
            "kind": self.kind,
            "angles_deg": [round(float(a), 6) for a in self.angles_deg],
            "sid_mm": float(self.sid_mm),
            "sdd_mm": float(self.sdd_mm),
            "detector_shape": list(self.detector_shape),
            "pixel_spacing_mm": [float(s) for s in self.pixel_spacing_mm],
            "isocenter_mm": [float(x) for x in self.isocenter_mm],
            "frame": "RAS",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "geometry") -> ProjectionGeometry:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: naming the missing fields and where they were expected.
        """
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing:
            raise ValueError(
                f"{source}: geometry is missing fields {missing}; expected all of {list(_REQUIRED_KEYS)}. "
                "Write one with `ctsynth drr` or ProjectionGeometry.save_json()."
            )
        try:
            return cls(
                angles_deg=data["angles_deg"],
                sid_mm=data["sid_mm"],
                sdd_mm=data["sdd_mm"],
                detector_shape=data["detector_shape"],
                pixel_spacing_mm=data["pixel_spacing_mm"],
                isocenter_mm=data["isocenter_mm"],
                kind=data["kind"],
                source=source,
            )
        except (TypeError, RuntimeError) as e:  # a string or a nested list where a number belongs
            raise ValueError(f"{source}: a geometry field holds a value of the wrong type ({e}); expected numbers as "
                             "`ctsynth drr` writes them") from None

    def save_json(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Writes :meth:`to_dict` (plus ``extra`` entries, e.g. the reconstruction grid) as JSON."""
        return atomic_write_json({**self.to_dict(), **(extra or {})}, path)

    @classmethod
    def load_json(cls, path: str | Path) -> ProjectionGeometry:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"geometry file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a geometry written by ctsynth") from None
        return cls.from_dict(data, source=str(path))

    def select_views(self, index: Sequence[int]) -> ProjectionGeometry:
        """A geometry holding only the given views."""
        d = self.to_dict()
        d["angles_deg"] = [d["angles_deg"][i] for i in index]
        return ProjectionGeometry.from_dict(d).to(self.angles_deg.device)

    def extra_repr(self) -> str:
        angles = ", ".join(f"{float(a):g}" for a in self.angles_deg)
        return (
            f"kind={self.kind}, angles_deg=[{angles}], sid_mm={float(self.sid_mm):g}, sdd_mm={float(self.sdd_mm):g}, "
            f"detector_shape={self.detector_shape}, pixel_spacing_mm={[float(s) for s in self.pixel_spacing_mm]}"
        )

    def __eq__(self, other: object) -> bool:  # value equality, used when batching geometries
        return isinstance(other, ProjectionGeometry) and self.to_dict() == other.to_dict()

    __hash__ = nn.Module.__hash__


def radiograph_geometry(extent_mm: Sequence[float], detector_size: int, center_mm: Sequence[float] | None = None,
                        views: str | int | Sequence[str | float] = "ap", margin: float = 1.3, **kwargs: Any
                        ) -> ProjectionGeometry:
    """The geometry of radiographs of a field of view: isocentre at its centre, a square detector of
    ``detector_size`` pixels whose side covers ``margin`` times the larger of the field's left-right and
    superior-inferior extents (the AP view's two detector axes).

    Args:
        extent_mm: (3,) field of view along x, y, z (mm), e.g. :func:`volume_extent_mm`.
        detector_size: detector pixels per side.
        center_mm: (3,) isocentre; default the origin.
        views: see :func:`parse_views`.
        margin: detector side / larger in-plane extent.
        kwargs: the other :class:`ProjectionGeometry` arguments (``kind``, ``sid_mm``, ``sdd_mm``).
    """
    ext = [float(e) for e in extent_mm]
    if len(ext) != 3 or min(ext) <= 0:
        raise ValueError(f"extent_mm must be 3 positive sizes in mm, got {list(extent_mm)}")
    center = [0.0, 0.0, 0.0] if center_mm is None else center_mm
    return ProjectionGeometry(angles_deg=parse_views(views), detector_shape=(int(detector_size), int(detector_size)),
                              pixel_spacing_mm=max(ext[0], ext[2]) * float(margin) / int(detector_size),
                              isocenter_mm=center, **kwargs)


def detector_sampling_grid(geometry: ProjectionGeometry, affine: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """Where each voxel of a grid projects on every view's detector, as ``grid_sample`` coordinates.

    ``out[v, i, j, k]`` is (x, y) = (column, row) of voxel (i, j, k)'s centre on view ``v``'s detector,
    normalised to [-1, 1] across the detector (``align_corners=False``: -1 and 1 are the detector's outer
    edges); voxels projecting off the detector get coordinates outside [-1, 1]. Sampling a feature map that
    covers the detector at these coordinates gives every voxel the features of the ray through it.

    Args:
        geometry: V views.
        affine: (4, 4) voxel -> RAS mm of the grid.
        grid_shape: (S0, S1, S2).

    Returns:
        (V, S0, S1, S2, 2) float32.
    """
    s0, s1, s2 = (int(n) for n in grid_shape)
    world = voxel_world_coordinates(torch.as_tensor(affine, dtype=torch.float64), (s0, s1, s2)).reshape(-1, 3)
    rows, cols = geometry.detector_shape
    rc = geometry.project_points(world.to(geometry.angles_deg.device))  # V, N, 2 (row, col) in detector pixels
    grid = torch.stack([(2 * rc[..., 1] + 1) / cols - 1, (2 * rc[..., 0] + 1) / rows - 1], -1)
    return grid.reshape(geometry.num_views, s0, s1, s2, 2).float()


def backproject_features(
    features: torch.Tensor,
    geometries: Sequence[ProjectionGeometry],
    affines: torch.Tensor,
    grid_shape: Sequence[int],
    max_voxels: int = 2**20,
) -> torch.Tensor:
    """Samples each view's feature map at every voxel's projection and fuses the views (mean, max).

    The grid is processed in slabs along its first axis of at most ``max_voxels`` voxels, so the projection
    and sampling temporaries (float64 coordinates, per-view samples) stay small however large the grid.

    Args:
        features: (B, V, C, h, w) feature maps covering each view's full detector.
        geometries: one geometry per batch item (V views, any detector size).
        affines: (B, 4, 4) voxel -> RAS mm of the output grid.
        grid_shape: (S0, S1, S2).
        max_voxels: voxels per slab.

    Returns:
        (B, 2C, S0, S1, S2): mean over views, then max over views.
    """
    b, v, c = features.shape[:3]
    if len(geometries) != b:
        raise ValueError(f"need one geometry per batch item: {len(geometries)} for {b}")
    s0, s1, s2 = (int(n) for n in grid_shape)
    step = max(1, int(max_voxels) // (s1 * s2))
    out = []
    for i, g in enumerate(geometries):
        if g.num_views != v:
            raise ValueError(f"geometry {i} has {g.num_views} views, the radiographs have {v}")
        aff = torch.as_tensor(affines[i], dtype=torch.float64, device=features.device)
        g = g.to(features.device)
        fused = torch.empty((2 * c, s0, s1, s2), dtype=features.dtype, device=features.device)
        for start in range(0, s0, step):
            n0 = min(step, s0 - start)
            slab_aff = aff.clone()
            slab_aff[:3, 3] = aff[:3, 3] + start * aff[:3, 0]  # the slab's first voxel
            grid = detector_sampling_grid(g, slab_aff, (n0, s1, s2)).reshape(v, 1, -1, 2)
            sampled = F.grid_sample(features[i], grid.to(features.dtype), mode="bilinear",
                                    padding_mode="zeros", align_corners=False)[:, :, 0]  # V, C, N
            sampled = sampled.reshape(v, c, n0, s1, s2)
            fused[:c, start:start + n0] = sampled.mean(0)
            fused[c:, start:start + n0] = sampled.amax(0)
        out.append(fused)
    return torch.stack(out)
