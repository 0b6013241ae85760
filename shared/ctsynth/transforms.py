"""MONAI transforms used by the bundles: functional core, array transform, dictionary wrapper (``d``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry
from ctsynth.io import VolumeReadError, load_projection
from ctsynth.phantoms import slab_average

__all__ = [
    "scale_hu", "unscale_hu", "pad_to_multiple", "ScaleHU", "ScaleHUd",
    "render_drr", "RenderDRR", "RenderDRRd",
    "SlabAverage", "SlabAveraged",
    "normalize_radiograph", "NormalizeRadiograph", "NormalizeRadiographd",
    "load_radiographs", "LoadRadiographs", "LoadRadiographsd",
    "load_geometry_json", "LoadGeometry", "LoadGeometryd", "geometries_from_batch",
]


def scale_hu(x: torch.Tensor, window: Sequence[float] = (-1000.0, 1000.0), clip: bool = True) -> torch.Tensor:
    """Maps HU in ``window`` linearly to [0, 1] (clipped by default)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {tuple(window)}")
    y = (x - lo) / (hi - lo)
    return y.clamp(0.0, 1.0) if clip else y


def unscale_hu(y: torch.Tensor, window: Sequence[float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Inverse of :func:`scale_hu` (values outside the window stay at its edges)."""
    lo, hi = float(window[0]), float(window[1])
    return y * (hi - lo) + lo


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "replicate") -> torch.Tensor:
    """Pads the last three axes of a (..., X, Y, Z) tensor at their ends to multiples of ``multiple`` (edge values
    by default); crop back with ``[..., :X, :Y, :Z]``."""
    pads = [(-s) % int(multiple) for s in x.shape[-3:]]
    if not any(pads):
        return x
    import torch.nn.functional as F

    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode=mode)


class ScaleHU(Transform):
    """Array transform around :func:`scale_hu`; ``inverse`` maps back to HU."""

    def __init__(self, window: Sequence[float] = (-1000.0, 1000.0), clip: bool = True) -> None:
        scale_hu(torch.zeros(1), window)  # validates the window now
        self.window, self.clip = tuple(float(w) for w in window), clip

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return scale_hu(img, self.window, self.clip)

    def inverse(self, img: torch.Tensor) -> torch.Tensor:
        return unscale_hu(img, self.window)


class ScaleHUd(MapTransform):
    """Dictionary wrapper of :class:`ScaleHU`."""

    def __init__(self, keys: KeysCollection, window: Sequence[float] = (-1000.0, 1000.0), clip: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = ScaleHU(window, clip)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


def render_drr(volume_hu: torch.Tensor, geometry: ProjectionGeometry, projector: DRRProjector | None = None) -> torch.Tensor:
    """DRR line integrals (V, rows, cols) of one (1, S0, S1, S2) HU MetaTensor with the given geometry."""
    if volume_hu.ndim != 4 or volume_hu.shape[0] != 1:
        raise ValueError(f"expected a (1, S0, S1, S2) volume, got {tuple(volume_hu.shape)}")
    affine = getattr(volume_hu, "affine", None)
    if affine is None:
        raise ValueError("render_drr needs a MetaTensor with an affine (load it with ctsynth.io.load_volume)")
    projector = projector or DRRProjector(input_kind="hu")
    with torch.no_grad():
        return projector(torch.as_tensor(volume_hu)[None].float(), affine, geometry)[0]


class RenderDRR(Transform):
    """Array transform around :func:`render_drr`."""

    def __init__(self, geometry: ProjectionGeometry, **projector_kwargs: Any) -> None:
        self.geometry = geometry
        self.projector = DRRProjector(input_kind="hu", **projector_kwargs)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return render_drr(img, self.geometry, self.projector)


class RenderDRRd(MapTransform):
    """Dictionary wrapper of :class:`RenderDRR`: writes the DRRs of ``keys`` under ``output_keys``."""

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection, geometry: ProjectionGeometry,
                 allow_missing_keys: bool = False, **projector_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"need one output key per key, got {self.keys} -> {self.output_keys}")
        self.t = RenderDRR(geometry, **projector_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out in self.key_iterator(d, self.output_keys):
            d[out] = self.t(d[key])
        return d


class SlabAverage(Transform):
    """Array transform around :func:`ctsynth.phantoms.slab_average` (thin -> thick slices)."""

    def __init__(self, factor: int, axis: int = -1, stride: int | None = None) -> None:
        self.factor, self.axis, self.stride = factor, axis, stride

    def __call__(self, img: torch.Tensor) -> MetaTensor:
        return slab_average(img, self.factor, self.axis, self.stride)


class SlabAveraged(MapTransform):
    """Dictionary wrapper of :class:`SlabAverage`: writes the thick volume of ``keys`` under ``output_keys``."""

    def __init__(self, keys: KeysCollection, output_keys: KeysCollection, factor: int, axis: int = -1,
                 stride: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
        self.t = SlabAverage(factor, axis, stride)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out in self.key_iterator(d, self.output_keys):
            d[out] = self.t(d[key])
        return d


class _ApplyToKeys(MapTransform):
    """Dictionary wrapper applying one array transform ``self.t`` to every key (no logic of its own)."""

    t: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


def normalize_radiograph(x: torch.Tensor, quantiles: Sequence[float] = (0.005, 0.995)) -> torch.Tensor:
    """Maps each radiograph (..., rows, cols) linearly so its ``quantiles`` go to 0 and 1 (not clipped).

    Line integrals (NIfTI from ``ctsynth prepare``) and display images (PNG/TIFF/DICOM, bone bright) of the
    same view map to nearly the same image, so a network trained on one accepts the other.
    """
    if x.ndim < 2:
        raise ValueError(f"expected (..., rows, cols) radiographs, got {tuple(x.shape)}")
    flat = x.float().flatten(-2)
    lo = torch.quantile(flat, float(quantiles[0]), dim=-1)[..., None, None]
    hi = torch.quantile(flat, float(quantiles[1]), dim=-1)[..., None, None]
    return (x.float() - lo) / (hi - lo).clamp_min(1e-6)


class NormalizeRadiograph(Transform):
    """Array transform around :func:`normalize_radiograph`."""

    def __init__(self, quantiles: Sequence[float] = (0.005, 0.995)) -> None:
        if not 0 <= quantiles[0] < quantiles[1] <= 1:
            raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {tuple(quantiles)}")
        self.quantiles = tuple(quantiles)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return normalize_radiograph(torch.as_tensor(img), self.quantiles)


class NormalizeRadiographd(_ApplyToKeys):
    """Dictionary wrapper of :class:`NormalizeRadiograph`."""

    def __init__(self, keys: KeysCollection, quantiles: Sequence[float] = (0.005, 0.995),
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = NormalizeRadiograph(quantiles)


def load_radiographs(paths: Sequence[str | Path], expected_shape: Sequence[int] | None = None) -> torch.Tensor:
    """Reads the views of one study (any format :func:`ctsynth.io.load_projection` reads) as (V, rows, cols).

    Raises:
        VolumeReadError: a view unreadable, or the views differing in size (names both files).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise VolumeReadError("no radiographs given; expected one file per view")
    views = []
    for p in paths:
        img, _ = load_projection(p, expected_shape)
        if views and img.shape != views[0].shape:
            raise VolumeReadError(f"{p}: {tuple(img.shape)} pixels, but {paths[0]} has {tuple(views[0].shape)}; "
                                  "all views of a study must have the detector size of the geometry: resample the views "
                                  "or use the matching geometry.json")
        views.append(img)
    return torch.stack(views)


class LoadRadiographs(Transform):
    """Array transform around :func:`load_radiographs`."""

    def __init__(self, expected_shape: Sequence[int] | None = None) -> None:
        self.expected_shape = expected_shape

    def __call__(self, paths: Sequence[str | Path]) -> torch.Tensor:
        return load_radiographs(paths, self.expected_shape)


class LoadRadiographsd(_ApplyToKeys):
    """Dictionary wrapper of :class:`LoadRadiographs` (a list of paths per key -> (V, rows, cols))."""

    def __init__(self, keys: KeysCollection, expected_shape: Sequence[int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = LoadRadiographs(expected_shape)


def load_geometry_json(path: str | Path) -> str:
    """Reads and validates a geometry file; returns it as canonical JSON text (which batches as a string)."""
    return json.dumps(ProjectionGeometry.load_json(path).to_dict(), sort_keys=True)


class LoadGeometry(Transform):
    """Array transform around :func:`load_geometry_json`."""

    def __call__(self, path: str | Path) -> str:
        return load_geometry_json(path)


class LoadGeometryd(_ApplyToKeys):
    """Dictionary wrapper of :class:`LoadGeometry`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = LoadGeometry()


@functools.lru_cache(maxsize=256)
def _geometry_from_text(text: str) -> ProjectionGeometry:
    return ProjectionGeometry.from_dict(json.loads(text))


def geometries_from_batch(texts: str | Sequence[str], device: torch.device | str | None = None) -> list[ProjectionGeometry]:
    """One :class:`ProjectionGeometry` per batch item from the strings :class:`LoadGeometryd` wrote."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    geoms = [_geometry_from_text(t) for t in texts]
    return [g.to(device) for g in geoms] if device is not None else geoms
