"""Latents of the thick/thin pairs: conditioning on any thin grid, a cache of encoded training pairs, and the
transforms that load and crop them.

Geometry: the thin grid is described like :func:`ctsynth.slices.slice_positions` (spacing, slice count and
offset of its first slice from the thick series' first slice, in mm along the slice axis). A latent voxel
covers f slices (f: the autoencoder's compression per axis, ``codec.downsample``; 4 for the released MAISI one),
so latent voxel ``j`` of the thin grid is centred on thin slice ``f j + (f - 1) / 2``.

Conditioning modes (:data:`CONDITIONING_MODES`):

* ``latent`` (the seed's): encode the thick series at its own spacing and interpolate its latents linearly
  along depth to the centres of the thin latent voxels.
* ``image``: interpolate the thick series (cubic) onto the thin grid, then encode it: the conditioning then
  has the thin latent depth by construction and the encoder sees every thick slice at full resolution.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from tqdm.auto import tqdm

from ctsynth.engine import atomic_torch_save, is_rank_zero
from ctsynth.io import load_volume
from ctsynth.maisi import LatentCodec, ct_to_unit
from ctsynth.prepare import load_datalist, slice_spacing_mm
from ctsynth.slices import interpolate_slices, resample_axis, thin_grid_offset_mm

__all__ = ["CONDITIONING_MODES", "ThickConditioner", "LatentPairCache", "LoadLatentsd"]

logger = logging.getLogger(__name__)
CONDITIONING_MODES = ("latent", "image")


class ThickConditioner:
    """Conditioning latents of a thick series for a thin grid.

    Args:
        codec: the frozen autoencoder's codec (its scale factor is applied).
        mode: one of :data:`CONDITIONING_MODES`.
        axis: slice axis of the (1, X, Y, Z) volumes.
    """

    def __init__(self, codec: LatentCodec, mode: str = "latent", axis: int = 2) -> None:
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {mode!r}")
        self.codec, self.mode, self.axis = codec, mode, axis

    def latent_depth(self, count: int) -> int:
        """Latent depth of a thin grid of ``count`` slices (padded to a multiple of the compression)."""
        return math.ceil(int(count) / self.codec.downsample)

    def __call__(self, thick_hu: MetaTensor, spacing_mm: float, count: int, offset_mm: float = 0.0) -> torch.Tensor:
        """(1, X, Y, Z) thick volume in HU -> (1, C, X/f, Y/f, ceil(count/f)) conditioning latents."""
        if thick_hu.ndim != 4 or thick_hu.shape[0] != 1:
            raise ValueError(f"expected a (1, X, Y, Z) thick volume, got {tuple(thick_hu.shape)}")
        depth, f = self.latent_depth(count), self.codec.downsample
        if self.mode == "image":
            up = interpolate_slices(thick_hu, spacing_mm=spacing_mm, count=depth * f,
                                    offset_mm=offset_mm, mode="cubic", axis=self.axis)
            return self.codec.encode(ct_to_unit(up.as_tensor())[None])
        z = self.codec.encode(ct_to_unit(torch.as_tensor(thick_hu).float())[None])  # (1, C, x, y, zt)
        step_thick = slice_spacing_mm(thick_hu) if self.axis == 2 else float(
            torch.as_tensor(thick_hu.affine, dtype=torch.float64)[:3, self.axis].norm())
        half = (f - 1) / 2  # a latent voxel's centre, in the voxels it covers
        centres_mm = offset_mm + (torch.arange(depth, dtype=torch.float64) * f + half) * spacing_mm
        positions = (centres_mm / step_thick - half) / f  # in thick latent voxels
        return resample_axis(z[0], 1 + self.axis, positions.float(), "linear")[None]


def _fingerprint(path: str | Path | None) -> str:
    if path is None or not Path(path).is_file():
        return "none"
    st = Path(path).stat()
    return hashlib.sha1(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


class LatentPairCache:
    """Encodes every pair of a datalist once with the frozen autoencoder and keeps the latents on disk.

    ``OUT/<split>/<id>.pt`` holds ``{"thin": (C, x, y, z), "cond": (C, x, y, z)}`` unscaled latents (z = the
    thin latent depth) and ``OUT/index.json`` what they were made with (autoencoder file, conditioning mode,
    codec windows); a cache made with anything else is rebuilt. The latent scale factor (1 / std of the
    training thin latents) is estimated here, from data.

    Args:
        datalist: the prepared datalist JSON (``thick``/``thin`` NIfTI per case).
        codec: codec of the frozen autoencoder (scale factor 1).
        cache_dir: where the latents go.
        conditioning: one of :data:`CONDITIONING_MODES`.
        autoencoder_path: the weights file, recorded to invalidate the cache when it changes.
    """

    def __init__(self, datalist: str | Path, codec: LatentCodec, cache_dir: str | Path, conditioning: str = "latent",
                 autoencoder_path: str | Path | None = None) -> None:
        self.datalist, self.codec, self.dir = Path(datalist), codec, Path(cache_dir)
        if codec.scale_factor != 1.0:
            raise ValueError(f"the cache stores unscaled latents: give it a codec with scale_factor 1 (got "
                             f"{codec.scale_factor})")
        self.conditioner = ThickConditioner(codec, conditioning)
        self.signature = {"datalist": str(self.datalist.resolve()), "autoencoder": _fingerprint(autoencoder_path),
                          "conditioning": conditioning, "chunk": codec.chunk, "overlap": codec.overlap,
                          "tile": codec.tile, "version": 1}
        self._index: dict[str, Any] | None = None

    def _build(self) -> dict[str, Any]:
        index_path = self.dir / "index.json"
        if index_path.is_file():
            index = json.loads(index_path.read_text())
            if index.get("signature") == self.signature and all(
                    (self.dir / e["latent"]).is_file() for items in index["splits"].values() for e in items):
                return index
            logger.info("latent cache %s was made with other settings; re-encoding", self.dir)
        if not is_rank_zero():
            raise RuntimeError("rank 0 builds the latent cache; it should exist by now")
        index: dict[str, Any] = {"signature": self.signature, "splits": {}}
        listed = json.loads(self.datalist.read_text()) if self.datalist.is_file() else {}
        for split in ("training", "validation", "test"):
            entries = load_datalist(self.datalist, split) if listed.get(split) or split == "training" else []
            rows = []
            for e in tqdm(entries, desc=f"encode {split} pairs", unit="case"):
                thick, thin = load_volume(e["thick"]), load_volume(e["thin"])
                offset = thin_grid_offset_mm(thick, thin)
                z_thin = self.codec.encode(ct_to_unit(thin.as_tensor().float())[None])[0]
                cond = self.conditioner(thick, slice_spacing_mm(thin), thin.shape[3], offset)[0]
                if cond.shape != z_thin.shape:
                    raise ValueError(f"{e['thick']}: conditioning latents {tuple(cond.shape)} do not match the thin "
                                     f"latents {tuple(z_thin.shape)}; thick and thin must share the in-plane grid "
                                     "(ctsynth prepare slice-interp resamples them)")
                name = f"{split}/{str(e['id']).replace('/', '__')}.pt"
                atomic_torch_save({"thin": z_thin.clone(), "cond": cond.clone()}, self.dir / name)
                rows.append({**{k: v for k, v in e.items() if isinstance(v, (str, int, float))}, "latent": name,
                             "thin_slices": int(thin.shape[3])})
            index["splits"][split] = rows
        train = [torch.load(self.dir / r["latent"], weights_only=True)["thin"] for r in index["splits"]["training"]]
        if not train:
            raise ValueError(f"{self.datalist}: the training split is empty; nothing to estimate the latent scale from")
        std = float(torch.cat([t.flatten() for t in train]).std())
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"training latents have standard deviation {std}; are the volumes constant?")
        index["scale_factor"] = 1.0 / std
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(index_path)
        logger.info("latent cache %s: %s cases, scale factor %.4f", self.dir,
                    {k: len(v) for k, v in index["splits"].items()}, index["scale_factor"])
        return index

    @property
    def index(self) -> dict[str, Any]:
        if self._index is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if is_rank_zero():
                    self._index = self._build()
                torch.distributed.barrier()
                if self._index is None:
                    self._index = self._build()
            else:
                self._index = self._build()
        return self._index

    @property
    def scale_factor(self) -> float:
        """1 / std of the training thin latents."""
        return float(self.index["scale_factor"])

    def items(self, split: str = "training") -> list[dict[str, Any]]:
        """Dataset items of ``split``: the datalist entry plus ``latent`` (absolute path of its latents file)."""
        rows = self.index["splits"].get(split, [])
        if not rows:
            raise ValueError(f"split {split!r} of {self.datalist} has no cases")
        base = self.datalist.parent
        return [{**r, "latent": str(self.dir / r["latent"]), "thin": str(base / r["thin"]),
                 "thick": str(base / r["thick"])} for r in rows]


class LoadLatentsd(MapTransform):
    """Loads a latents file (written by :class:`LatentPairCache`) from ``data[key]`` into ``data["thin_latent"]``
    and ``data["cond_latent"]`` ((C, x, y, z) float tensors), safely (``weights_only``)."""

    def __init__(self, keys: KeysCollection = "latent", prefix: str = "", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.prefix = prefix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                pair = torch.load(d[key], map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot read latents {d[key]} ({type(e).__name__}: {e}); delete the latent cache "
                                 "folder to re-encode") from None
            d[f"{self.prefix}thin_latent"] = pair["thin"].float()
            d[f"{self.prefix}cond_latent"] = pair["cond"].float()
        return d
