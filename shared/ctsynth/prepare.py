"""Dataset preparation shared by the bundles: resampling to training grids, splits, datalists.

``prepare_xray2ct`` builds the cascade_xray2ct dataset: for each CT, isotropic cubes at every stage size
over one field of view, clipped HU, radiographs rendered with the projector, the geometry, and a MONAI
datalist with a deterministic train/validation/test split. A CT that cannot be used is skipped and its
reason written to ``report.json``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from tqdm.auto import tqdm

from ctsynth.drr import DRRProjector
from ctsynth.geometry import (ProjectionGeometry, cube_affine, parse_views, volume_center, volume_extent_mm,
                              voxel_world_coordinates)
from ctsynth.io import VolumeReadError, load_volume, save_nifti, save_projection_nifti

__all__ = ["deterministic_split", "resample_to_cube", "remove_table", "expand_inputs", "prepare_xray2ct", "load_datalist"]

logger = logging.getLogger(__name__)
SPLITS = ("training", "validation", "test")


def deterministic_split(ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
                        strata: Sequence[str] | None = None) -> dict[str, str]:
    """Assigns each id to training/validation/test, reproducibly and independently of input order.

    Ids are ordered by a hash of ``seed`` and the id; each stratum (e.g. a category) is split on its own
    so the fractions hold per stratum. Every split with a non-zero fraction gets at least one id when the
    stratum has enough ids.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    strata = list(strata) if strata is not None else ["all"] * len(ids)
    if len(strata) != len(ids):
        raise ValueError("need one stratum per id")
    out: dict[str, str] = {}
    for stratum in sorted(set(strata)):
        members = sorted((i for i, s in zip(ids, strata) if s == stratum),
                         key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        n = len(members)
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 and n >= 3 else 0
        n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 and n >= 3 else 0
        for k, i in enumerate(members):
            out[i] = "test" if k < n_test else "validation" if k < n_test + n_val else "training"
    return out


def resample_to_cube(volume: MetaTensor, size: int, fov_mm: float, center_mm: torch.Tensor,
                     hu_clip: Sequence[float] = (-1024.0, 3071.0)) -> MetaTensor:
    """Resamples a CT onto an axis-aligned RAS cube (trilinear; outside the scan is air).

    Args:
        volume: (1, S0, S1, S2) HU with any orientation.
        size: voxels per side.
        fov_mm: cube side in mm.
        center_mm: (3,) cube centre in world RAS mm.
        hu_clip: HU range kept.

    Returns:
        (1, size, size, size) MetaTensor whose affine is diagonal RAS with spacing ``fov_mm / size``.
    """
    aff = cube_affine(size, fov_mm, center_mm)
    src_inv = torch.linalg.inv(torch.as_tensor(volume.affine, dtype=torch.float64))
    world = voxel_world_coordinates(aff, (size, size, size))
    vox = world @ src_inv[:3, :3].T + src_inv[:3, 3]
    shape = torch.tensor(volume.shape[1:], dtype=torch.float64)
    grid = (vox / (shape - 1) * 2 - 1).flip(-1).float()[None]
    data = torch.as_tensor(volume).float()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    lo, hi = float(hu_clip[0]), float(hu_clip[1])
    shifted = (data.clamp(lo, hi) - lo)[None]  # zero padding == air at the clip floor
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0] + lo
    return MetaTensor(out.clamp(lo, hi), affine=aff)


def remove_table(volume: MetaTensor, threshold_hu: float = -500.0, margin_voxels: int = 2) -> MetaTensor:
    """Sets everything outside the patient's body to air (-1000 HU): the table, cushions, cables.

    The body is the largest 3D connected component above ``threshold_hu``, its holes (lungs, airways)
    filled slice by slice along every axis and dilated by ``margin_voxels`` to keep the skin.

    Args:
        volume: (1, S0, S1, S2) HU.
    """
    from scipy import ndimage

    arr = np.asarray(torch.as_tensor(volume).detach().cpu().float())[0]
    labels, n = ndimage.label(arr > threshold_hu)
    if n == 0:
        raise ValueError(f"no voxel above {threshold_hu} HU: nothing looks like a body, cannot remove the table")
    sizes = ndimage.sum_labels(np.ones_like(arr), labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    for axis in range(3):
        body = np.stack([ndimage.binary_fill_holes(s) for s in np.moveaxis(body, axis, 0)], axis)
    if margin_voxels > 0:
        body = ndimage.binary_dilation(body, iterations=int(margin_voxels))
    out = torch.as_tensor(np.where(body, arr, -1000.0).astype(np.float32))[None]
    return MetaTensor(out, affine=volume.affine, meta=dict(getattr(volume, "meta", {})))


def expand_inputs(patterns: str | Sequence[str]) -> list[Path]:
    """Files/folders from paths or glob patterns (sorted, de-duplicated)."""
    items = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    found: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) or ([str(item)] if Path(item).exists() else [])
        if not matches:
            raise FileNotFoundError(f"no CT matches {item!r}")
        found.extend(Path(m) for m in matches)
    return sorted(dict.fromkeys(found))


def _case_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def prepare_xray2ct(ct: str | Sequence[str], out: str | Path, views: int | str = 2,
                    sizes: Sequence[int] = (64, 128, 256), xray_size: int = 512, hu_clip: Sequence[float] = (-1024, 3071),
                    sid_mm: float = 1000.0, sdd_mm: float = 1200.0, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                    seed: int = 0, table_removal: bool = False) -> dict[str, Any]:
    """Builds the cascade_xray2ct dataset.

    For each CT: isotropic cubes at every size over one field of view (the larger of the in-plane extents,
    centred on the scan), HU clipped to ``hu_clip``, ``views`` radiographs rendered from the finest cube
    (2: AP + lateral; more: evenly spaced over 180 degrees), and ``geometry.json``.

    Writes ``OUT/cases/<id>/ct_<size>.nii.gz``, ``xray_<k>.nii.gz``, ``geometry.json``, ``OUT/datalist.json``
    (MONAI datalist with ``training``/``validation``/``test``) and ``OUT/report.json`` (skipped CTs with reasons).
    ``geometry.json`` also records the reconstruction grid (``reconstruction.fov_mm``/``center_mm``), which
    ``ctsynth reconstruct`` uses to place its output. ``table_removal`` blanks everything outside the body.
    """
    out = Path(out)
    sizes = sorted(int(s) for s in sizes)
    angles = parse_views(views if not isinstance(views, str) or not views.isdigit() else int(views))
    paths = expand_inputs(ct)
    entries, skipped = [], []
    for path in tqdm(paths, desc="prepare xray2ct", unit="ct"):
        case = _case_id(path)
        try:
            vol = load_volume(path)
            if table_removal:
                vol = remove_table(vol)
            extent = volume_extent_mm(vol.affine, vol.shape[1:])
            fov = max(extent[0], extent[1])
            center = volume_center(vol.affine, vol.shape[1:])
            case_dir = out / "cases" / case
            entry: dict[str, Any] = {"id": case, "source": str(path), "fov_mm": fov}
            cubes = {}
            for s in sizes:
                cubes[s] = resample_to_cube(vol, s, fov, center, hu_clip)
                save_nifti(cubes[s], case_dir / f"ct_{s}.nii.gz")
                entry[f"image_{s}"] = str(Path("cases") / case / f"ct_{s}.nii.gz")
            finest = cubes[sizes[-1]]
            pixel = fov * 1.15 * sdd_mm / sid_mm / xray_size
            geom = ProjectionGeometry(angles_deg=angles, sid_mm=sid_mm, sdd_mm=sdd_mm, detector_shape=(xray_size, xray_size),
                                      pixel_spacing_mm=pixel, isocenter_mm=center)
            with torch.no_grad():
                li = DRRProjector(geom)(finest[None], finest.affine)[0]
            entry["xrays"] = []
            for k in range(geom.num_views):
                save_projection_nifti(li[k], case_dir / f"xray_{k}.nii.gz", geom.pixel_spacing_mm.tolist())
                entry["xrays"].append(str(Path("cases") / case / f"xray_{k}.nii.gz"))
            geom.save_json(case_dir / "geometry.json",
                           extra={"reconstruction": {"fov_mm": float(fov), "center_mm": [float(c) for c in center]}})
            entry["geometry"] = str(Path("cases") / case / "geometry.json")
            entries.append(entry)
        except (VolumeReadError, ValueError, RuntimeError, OSError) as e:
            logger.warning("skipping %s: %s", path, e)
            skipped.append({"source": str(path), "reason": str(e)})
    if not entries:
        raise ValueError(f"none of the {len(paths)} CTs could be used; see the reasons:\n" +
                         "\n".join(f"  {s['source']}: {s['reason']}" for s in skipped))
    split = deterministic_split([e["id"] for e in entries], fractions, seed)
    datalist = {k: [e for e in entries if split[e["id"]] == k] for k in SPLITS}
    datalist["meta"] = {"sizes": sizes, "views_deg": angles, "xray_size": xray_size, "hu_clip": list(hu_clip),
                        "split_seed": seed, "fractions": list(fractions), "table_removal": table_removal}
    out.mkdir(parents=True, exist_ok=True)
    (out / "datalist.json").write_text(json.dumps(datalist, indent=2))
    report = {"prepared": len(entries), "skipped": skipped, "splits": {k: len(datalist[k]) for k in SPLITS}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


#: datalist keys holding paths (relative to the datalist's folder unless absolute).
_PATH_KEY_PREFIXES = ("image", "label", "xrays", "geometry", "thick", "thin", "ct")


def load_datalist(path: str | Path, split: str = "training", check_files: bool = True) -> list[dict[str, Any]]:
    """Entries of one split of a datalist written by ``ctsynth prepare``, with paths made absolute.

    Raises:
        FileNotFoundError / ValueError: missing datalist, unknown or empty split, missing files (named),
        each with the command that makes them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}. Make one with `ctsynth prepare ...` (see the bundle's "
                                "docs/README.md) or point --datalist at it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    splits = [k for k, v in data.items() if isinstance(v, list)]
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r}; it has {splits}")
    if not data[split]:
        raise ValueError(f"{path}: split {split!r} is empty; prepare more cases or change the split fractions")
    base = path.parent

    def resolve(v: Any) -> Any:
        if isinstance(v, list):
            return [resolve(x) for x in v]
        p = Path(v)
        return str(p if p.is_absolute() else base / p)

    out = []
    for entry in data[split]:
        e = dict(entry)
        for k, v in entry.items():
            if k.startswith(_PATH_KEY_PREFIXES) and isinstance(v, (str, list)):
                e[k] = resolve(v)
                if check_files:
                    for f in e[k] if isinstance(e[k], list) else [e[k]]:
                        if not Path(f).exists():
                            raise FileNotFoundError(f"{path}: case {entry.get('id', '?')!r} lists {f}, which does not "
                                                    "exist; re-run `ctsynth prepare` or fix the datalist")
        out.append(e)
    return out
