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

from ctsynth.atomic import atomic_write_json, atomic_write_text
from ctsynth.drr import DRRProjector
from ctsynth.geometry import (ProjectionGeometry, cube_affine, parse_views, radiograph_geometry, volume_center,
                              volume_extent_mm, voxel_world_coordinates)
from ctsynth.io import (VolumeReadError, check_outputs, is_nifti, load_projection, load_volume, save_nifti,
                        save_projection_nifti)

__all__ = ["deterministic_split", "resample_to_cube", "remove_table", "expand_inputs", "prepare_xray2ct", "load_datalist",
           "slice_spacing_mm", "resample_to_grid", "align_thick_thin", "pick_thick_thin", "prepare_slice_interp",
           "prepare_phantom_pairs", "resample_to_shape", "prepare_ctpa", "write_phantom_ctpa_studies"]

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
    lo, hi = float(hu_clip[0]), float(hu_clip[1])
    clipped = MetaTensor(torch.as_tensor(volume).float().clamp(lo, hi), affine=volume.affine)
    out = resample_to_grid(clipped, cube_affine(size, fov_mm, center_mm), (size, size, size), fill_hu=lo)
    return MetaTensor(out.as_tensor().clamp(lo, hi), affine=out.affine)


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


def _finish_dataset(out: Path, entries: list[dict[str, Any]], skipped: list[dict[str, Any]], n_inputs: int, noun: str,
                    fractions: Sequence[float], seed: int, strata: Sequence[str] | None, meta: dict[str, Any],
                    report_extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The end every ``prepare_*`` shares: refuse when nothing could be used (listing why), split
    deterministically, write ``datalist.json`` (with ``meta``) and ``report.json``; returns both."""
    if not entries:
        raise ValueError(f"none of the {n_inputs} {noun} could be used:\n" +
                         "\n".join(f"  {s['source']}: {s['reason']}" for s in skipped))
    split = deterministic_split([e["id"] for e in entries], fractions, seed, strata=strata)
    datalist: dict[str, Any] = {k: [e for e in entries if split[e["id"]] == k] for k in SPLITS}
    datalist["meta"] = {"fractions": list(fractions), "split_seed": seed, **meta}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(datalist, out / "datalist.json")
    report = {"prepared": len(entries), "skipped": skipped, "splits": {k: len(datalist[k]) for k in SPLITS},
              **(report_extra or {})}
    atomic_write_json(report, out / "report.json")
    return datalist, report


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
    check_outputs(files=[out / "datalist.json"])  # an output path that is a file stops here, before any work
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
    meta = {"sizes": sizes, "views_deg": angles, "xray_size": xray_size, "hu_clip": list(hu_clip),
            "table_removal": table_removal}
    return _finish_dataset(out, entries, skipped, len(paths), "CTs", fractions, seed, None, meta)[1]


#: datalist keys holding paths (relative to the datalist's folder unless absolute).
_PATH_KEY_PREFIXES = ("image", "label", "xrays", "geometry", "thick", "thin", "ct")
_PATH_KEYS = ("xray",)  # exact names (``xray_source`` is not a path)


def load_datalist(path: str | Path, split: str = "training", check_files: bool = True,
                  require: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Entries of one split of a datalist written by ``ctsynth prepare``, with paths made absolute; with
    ``require``, only the entries that have every one of those keys (e.g. ``label``).

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
    base = path.resolve().parent  # absolute even for a relative datalist path: callers join and cache these paths

    def resolve(v: Any) -> Any:
        if isinstance(v, list):
            return [resolve(x) for x in v]
        p = Path(v)
        return str(p if p.is_absolute() else base / p)

    out = []
    for entry in data[split]:
        e = dict(entry)
        for k, v in entry.items():
            if (k.startswith(_PATH_KEY_PREFIXES) or k in _PATH_KEYS) and isinstance(v, (str, list)):
                e[k] = resolve(v)
                if check_files:
                    for f in e[k] if isinstance(e[k], list) else [e[k]]:
                        if not Path(f).exists():
                            raise FileNotFoundError(f"{path}: case {entry.get('id', '?')!r} lists {f}, which does not "
                                                    "exist; re-run `ctsynth prepare` or fix the datalist")
        out.append(e)
    if require:
        kept = [e for e in out if all(k in e for k in require)]
        if not kept:
            raise ValueError(f"{path}: no case of split {split!r} has {list(require)}; give them when preparing (e.g. "
                             "`ctsynth prepare ctpa --labels labels.csv`)")
        if len(kept) < len(out):
            logger.info("%s: %d of %d %s cases have %s", path, len(kept), len(out), split, list(require))
        out = kept
    return out


# ------------------------------------------------------------------------------------- slice interpolation
def slice_spacing_mm(volume: MetaTensor) -> float:
    """Distance (mm) between consecutive slices (the third voxel axis) from the affine."""
    return float(torch.linalg.norm(torch.as_tensor(volume.affine, dtype=torch.float64)[:3, 2]))


def resample_to_grid(volume: MetaTensor, affine: torch.Tensor, shape: Sequence[int], fill_hu: float = -1024.0) -> MetaTensor:
    """Trilinear resampling of a (1, S0, S1, S2) HU volume onto another grid (world RAS mm); outside is ``fill_hu``."""
    aff = torch.as_tensor(affine, dtype=torch.float64)
    src_inv = torch.linalg.inv(torch.as_tensor(volume.affine, dtype=torch.float64))
    world = voxel_world_coordinates(aff, shape)
    vox = world @ src_inv[:3, :3].T + src_inv[:3, 3]
    size = torch.tensor(volume.shape[1:], dtype=torch.float64)
    grid = (vox / (size - 1).clamp_min(1) * 2 - 1).flip(-1).float()[None]
    data = torch.as_tensor(volume).float()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    out = F.grid_sample((data - fill_hu)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    return MetaTensor(out + fill_hu, affine=aff)


def align_thick_thin(thick: MetaTensor, thin: MetaTensor, tolerance_mm: float = 0.05) -> tuple[MetaTensor, MetaTensor]:
    """Puts a thick and a thin series of one study on a shared in-plane grid and crops both to their overlap.

    The thin series' in-plane grid wins (the thick one is resampled onto it when grids differ by more than
    ``tolerance_mm``). Both are cropped along the slice axis to the world range they share: the thin series to
    the span between the first and last thick slice centres that lie inside the thin coverage.

    Raises:
        ValueError: slice axes not parallel, or no overlap (with both ranges).
    """
    at, an = (torch.as_tensor(v.affine, dtype=torch.float64) for v in (thick, thin))
    dt, dn = at[:3, 2] / at[:3, 2].norm(), an[:3, 2] / an[:3, 2].norm()
    if float(torch.dot(dt, dn)) < 0.999:
        raise ValueError("thick and thin series are not stacked along the same direction (different orientation)")
    # positions of slice centres along the slice direction
    pos_t = float(torch.dot(at[:3, 3], dn)) + torch.arange(thick.shape[3], dtype=torch.float64) * float(torch.dot(at[:3, 2], dn))
    pos_n = float(torch.dot(an[:3, 3], dn)) + torch.arange(thin.shape[3], dtype=torch.float64) * float(torch.dot(an[:3, 2], dn))
    lo, hi = max(float(pos_t.min()), float(pos_n.min())), min(float(pos_t.max()), float(pos_n.max()))
    eps = 1e-3
    keep_t = torch.nonzero((pos_t >= lo - eps) & (pos_t <= hi + eps)).flatten()
    if len(keep_t) < 2:
        raise ValueError(f"thick slices {float(pos_t.min()):.1f}..{float(pos_t.max()):.1f} mm and thin slices "
                         f"{float(pos_n.min()):.1f}..{float(pos_n.max()):.1f} mm overlap by fewer than 2 thick slices; pick a "
                         "thick and a thin series of the same study that cover a common range")
    t0, t1 = int(keep_t.min()), int(keep_t.max())
    zlo, zhi = float(pos_t[t0]), float(pos_t[t1])
    keep_n = torch.nonzero((pos_n >= zlo - eps) & (pos_n <= zhi + eps)).flatten()
    n0, n1 = int(keep_n.min()), int(keep_n.max())
    thin_c = MetaTensor(thin.as_tensor()[..., n0:n1 + 1], affine=an.clone())
    thin_c.affine[:3, 3] = an[:3, 3] + n0 * an[:3, 2]
    thick_c = MetaTensor(thick.as_tensor()[..., t0:t1 + 1], affine=at.clone())
    thick_c.affine[:3, 3] = at[:3, 3] + t0 * at[:3, 2]
    in_plane_same = (tuple(thick.shape[1:3]) == tuple(thin.shape[1:3])
                     and torch.allclose(at[:3, :2], an[:3, :2], atol=1e-4)
                     and float((at[:3, 3] - an[:3, 3] - torch.dot(at[:3, 3] - an[:3, 3], dn) * dn).norm()) <= tolerance_mm)
    if not in_plane_same:
        target = torch.as_tensor(thick_c.affine, dtype=torch.float64).clone()
        target[:3, :2] = an[:3, :2]
        shift = thick_c.affine[:3, 3] - an[:3, 3]
        target[:3, 3] = an[:3, 3] + torch.dot(shift, dn) * dn  # thin in-plane origin, thick slice positions
        logger.info("resampling the thick series onto the thin series' in-plane grid")
        thick_c = resample_to_grid(thick_c, target, (thin.shape[1], thin.shape[2], thick_c.shape[3]))
    return thick_c, thin_c


def _study_series(study: Path) -> list[tuple[Any, MetaTensor]]:
    """Every readable CT series of one study (folder or zip) with its volume; unreadable ones are logged."""
    import tempfile

    from ctsynth.io import find_dicom_series, read_dicom_series, safe_extract_zip

    def read_all(root: Path) -> list[tuple[Any, MetaTensor]]:
        out = []
        for info in find_dicom_series(root):
            if info.modality and info.modality.upper() != "CT":
                continue
            try:
                out.append((info, read_dicom_series(info.files)))
            except VolumeReadError as e:
                logger.warning("%s: series %s unusable: %s", study, info.summary(), e)
        return out

    if study.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix="ctsynth_study_") as tmp:
            safe_extract_zip(study, tmp)
            return read_all(Path(tmp))
    return read_all(study)


def pick_thick_thin(series: Sequence[tuple[Any, MetaTensor]], min_ratio: float = 1.5,
                    min_slices: int = 4) -> tuple[MetaTensor, MetaTensor]:
    """The thickest and the thinnest series by computed slice spacing (never by name or SliceThickness).

    Raises:
        ValueError: fewer than two usable series, or spacings too close to call one thick (ratio < ``min_ratio``).
    """
    usable = [(i, v) for i, v in series if v.shape[3] >= min_slices]
    if len(usable) < 2:
        raise ValueError(f"needs two CT series (thick and thin) with >= {min_slices} slices, found {len(usable)}")
    ranked = sorted(usable, key=lambda iv: slice_spacing_mm(iv[1]))
    thin, thick = ranked[0][1], ranked[-1][1]
    st, sn = slice_spacing_mm(thick), slice_spacing_mm(thin)
    if st / sn < min_ratio:
        raise ValueError(f"slice spacings {sorted(round(slice_spacing_mm(v), 3) for _, v in usable)} mm: no series is "
                         f"at least {min_ratio}x thicker than another")
    return thick, thin


def prepare_slice_interp(studies: str | Path, out: str | Path, fractions: Sequence[float] = (0.75, 0.15, 0.10),
                         seed: int = 0) -> dict[str, Any]:
    """Builds the slice_interp_ldm dataset from ``STUDIES/<category>/<patient>(.zip)``.

    For each patient: every CT series is read, the thickest and thinnest (by computed spacing) are paired,
    put on the thin in-plane grid, cropped to their shared z range and written as
    ``OUT/cases/<category>/<patient>/thick.nii.gz`` and ``thin.nii.gz``; ``OUT/datalist.json`` holds a
    deterministic split stratified by category, ``OUT/report.json`` every skipped study with its reason.
    """
    studies, out = Path(studies), Path(out)
    if not studies.is_dir():
        raise FileNotFoundError(f"{studies}: expected a folder of category folders (e.g. APE/, non-APE/) holding one "
                                "zip or folder per patient")
    items = [(cat.name, p) for cat in sorted(studies.iterdir()) if cat.is_dir()
             for p in sorted(cat.iterdir()) if p.is_dir() or p.suffix.lower() == ".zip"]
    if not items:
        raise FileNotFoundError(f"{studies}: no <category>/<patient> folders or zips found")
    entries, skipped = [], []
    for category, study in tqdm(items, desc="prepare slice-interp", unit="study"):
        pid = _case_id(study)
        try:
            thick, thin = pick_thick_thin(_study_series(study))
            thick, thin = align_thick_thin(thick, thin)
            case_dir = out / "cases" / category / pid
            save_nifti(thick, case_dir / "thick.nii.gz")
            save_nifti(thin, case_dir / "thin.nii.gz")
            entries.append({"id": f"{category}/{pid}", "category": category, "source": str(study),
                            "thick": str(Path("cases") / category / pid / "thick.nii.gz"),
                            "thin": str(Path("cases") / category / pid / "thin.nii.gz"),
                            "thick_spacing_mm": slice_spacing_mm(thick), "thin_spacing_mm": slice_spacing_mm(thin),
                            "thin_slices": int(thin.shape[3])})
        except (VolumeReadError, ValueError, RuntimeError, OSError) as e:
            logger.warning("skipping %s: %s", study, e)
            skipped.append({"source": str(study), "category": category, "reason": str(e)})
    categories = sorted({e["category"] for e in entries})
    return _finish_dataset(out, entries, skipped, len(items), "studies", fractions, seed,
                           [e["category"] for e in entries], {"stratified_by": "category", "categories": categories},
                           {"per_category": {c: sum(e["category"] == c for e in entries) for c in categories}})[1]


def prepare_phantom_pairs(out: str | Path, n: int = 12, shape: Sequence[int] = (64, 64, 84), spacing_mm: float = 2.0,
                          factor: int = 5, fractions: Sequence[float] = (0.75, 0.15, 0.10), seed: int = 0,
                          detail: float = 0.0, keep_proportions: bool = True, realism: float = 0.0) -> dict[str, Any]:
    """The slice_interp_ldm dataset from phantoms: thin phantoms and their ``factor``-times thicker slab averages,
    laid out and listed exactly as :func:`prepare_slice_interp` writes real studies (categories ``contrast`` /
    ``non-contrast``, stratified split). ``detail``, ``keep_proportions`` and ``realism`` (partial volume, texture
    and CT noise in the thin series, which the slab averages then carry as a scanner's thick series would): see
    :func:`ctsynth.phantoms.thorax_phantom`; the anatomy keeps its proportions by default here, since through-plane
    structure is what slice interpolation restores."""
    from ctsynth.phantoms import slab_average, thorax_phantom

    out = Path(out)
    check_outputs(files=[out / "datalist.json"])  # an output path that is a file stops here, before any work
    entries = []
    for i in tqdm(range(int(n)), desc="phantom pairs", unit="case"):
        contrast = i % 2 == 1
        category = "contrast" if contrast else "non-contrast"
        pid = f"phantom_{i:03d}"
        thin, _ = thorax_phantom(tuple(shape), spacing_mm, seed=seed + 2000 + i, contrast=contrast, emboli=0.3,
                                 detail=detail, keep_proportions=keep_proportions, realism=realism)
        thick, thin = align_thick_thin(slab_average(thin, int(factor)), thin)
        case_dir = out / "cases" / category / pid
        save_nifti(thick, case_dir / "thick.nii.gz")
        save_nifti(thin, case_dir / "thin.nii.gz")
        entries.append({"id": f"{category}/{pid}", "category": category, "source": "ctsynth.phantoms.thorax_phantom",
                        "thick": str(Path("cases") / category / pid / "thick.nii.gz"),
                        "thin": str(Path("cases") / category / pid / "thin.nii.gz"),
                        "thick_spacing_mm": slice_spacing_mm(thick), "thin_spacing_mm": slice_spacing_mm(thin),
                        "thin_slices": int(thin.shape[3])})
    meta = {"stratified_by": "category", "categories": sorted({e["category"] for e in entries}), "slab_factor": int(factor)}
    return _finish_dataset(out, entries, [], len(entries), "phantoms", fractions, seed, [e["category"] for e in entries],
                           meta)[1]


# ------------------------------------------------------------------------------------------------- CTPA
def _read_labels(path: str | Path | None) -> dict[str, int]:
    """``id,label`` CSV (header required; label 0/1 for PE absent/present) -> {id: label}."""
    if path is None:
        return {}
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "label"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns 'id' and 'label' (0/1), got {list(rows[0]) if rows else 'no rows'}")
    out = {}
    for r in rows:
        if r["label"].strip() not in ("0", "1"):
            raise ValueError(f"{path}: label of {r['id']!r} is {r['label']!r}; use 0 (no PE) or 1 (PE)")
        out[r["id"].strip()] = int(r["label"])
    return out


def _find_xray(folder: Path | None, case: str) -> Path | None:
    if folder is None:
        return None
    for suffix in (".png", ".dcm", ".nii.gz", ".nii", ".tif", ".tiff", ".jpg", ".jpeg"):
        if (folder / f"{case}{suffix}").is_file():
            return folder / f"{case}{suffix}"
    return None


def resample_to_shape(volume: MetaTensor, shape: Sequence[int]) -> MetaTensor:
    """Trilinear resampling of a (1, X, Y, Z) volume onto ``shape`` voxels over the same extent (voxel corners
    aligned: the outer faces stay where they were), with the matching affine."""
    data = torch.as_tensor(volume).float()
    data = data.as_tensor() if isinstance(data, MetaTensor) else data
    out = F.interpolate(data[None], size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0]
    aff = torch.as_tensor(volume.affine, dtype=torch.float64).clone()
    scale = torch.tensor([volume.shape[1 + i] / int(shape[i]) for i in range(3)], dtype=torch.float64)
    new = aff.clone()
    new[:3, :3] = aff[:3, :3] * scale
    new[:3, 3] = aff[:3, 3] + aff[:3, :3] @ ((scale - 1) / 2)  # first voxel centre moves by half a new voxel
    return MetaTensor(out, affine=new)


def prepare_ctpa(studies: str | Path, out: str | Path, shape: Sequence[int] | None = (256, 256, 64),
                 window: Sequence[float] = (-1024.0, 3071.0), xrays: str | Path | None = None,
                 labels: str | Path | None = None, xray_size: int = 256, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> dict[str, Any]:
    """Builds the xray2ctpa_vqgan dataset from ``STUDIES/<patient>`` (a DICOM folder, a zip, or a NIfTI file each).

    Per patient: the CTPA oriented to RAS, clipped to ``window`` (HU) and resampled to ``shape`` voxels over its
    whole extent (None: native grid, e.g. 512 x 512 x N), written as ``cases/<id>/ctpa.nii.gz``; the paired
    chest X-ray from ``xrays/<id>.(png|dcm|nii.gz|...)`` when given (converted to NIfTI), otherwise an AP DRR
    rendered from the CTPA with ctsynth's projector (``xray.nii.gz`` + ``geometry.json``); the PE label from the
    ``labels`` CSV (``id,label``). ``datalist.json`` records kVp, reconstruction kernel and slice spacing per
    case (scanners differ) and a deterministic split, stratified by label when labels are given;
    ``report.json`` lists every skipped study with its reason.
    """
    studies, out = Path(studies), Path(out)
    if not studies.is_dir():
        raise FileNotFoundError(f"{studies}: expected a folder with one DICOM folder, zip or NIfTI per patient")
    items = sorted(p for p in studies.iterdir() if p.is_dir() or p.suffix.lower() == ".zip" or is_nifti(p))
    if not items:
        raise FileNotFoundError(f"{studies}: no patient folders, zips or NIfTI files found")
    label_of = _read_labels(labels)
    xray_dir = Path(xrays) if xrays else None
    if xray_dir is not None and not xray_dir.is_dir():
        raise FileNotFoundError(f"X-ray folder not found: {xray_dir}")
    entries, skipped = [], []
    for study in tqdm(items, desc="prepare ctpa", unit="study"):
        case = _case_id(study)
        try:
            vol = load_volume(study)
            meta = dict(getattr(vol, "meta", {}) or {})
            if not torch.isfinite(vol.as_tensor()).all():
                raise ValueError("NaN/Inf voxels")
            native_spacing = [float(torch.as_tensor(vol.affine, dtype=torch.float64)[:3, i].norm()) for i in range(3)]
            vol = MetaTensor(vol.as_tensor().clamp(float(window[0]), float(window[1])), affine=vol.affine)
            if shape is not None:
                vol = resample_to_shape(vol, shape)
            case_dir = out / "cases" / case
            save_nifti(vol, case_dir / "ctpa.nii.gz")
            scanner = {"kvp": meta.get("kvp"), "convolution_kernel": meta.get("convolution_kernel") or None,
                       "slice_thickness_tag_mm": meta.get("slice_thickness_tag")}
            entry: dict[str, Any] = {
                "id": case, "source": str(study), "image": str(Path("cases") / case / "ctpa.nii.gz"),
                "shape": [int(s) for s in vol.shape[1:]], "native_spacing_mm": native_spacing,
                **{k: v for k, v in scanner.items() if v is not None},  # what the files record (loaders reject None)
            }
            if case in label_of:
                entry["label"] = label_of[case]
            paired = _find_xray(xray_dir, case)
            if paired is not None:
                img, info = load_projection(paired)
                save_projection_nifti(img, case_dir / "xray.nii.gz", info.get("pixel_spacing_mm") or [1.0, 1.0])
                entry.update(xray_source="paired", xray_file=str(paired))
            else:
                geom = radiograph_geometry(volume_extent_mm(vol.affine, vol.shape[1:]), xray_size,
                                           volume_center(vol.affine, vol.shape[1:]))
                with torch.no_grad():
                    li = DRRProjector(geom)(vol[None], vol.affine)[0]
                save_projection_nifti(li[0], case_dir / "xray.nii.gz", geom.pixel_spacing_mm.tolist())
                geom.save_json(case_dir / "geometry.json")
                entry.update(xray_source="drr", geometry=str(Path("cases") / case / "geometry.json"))
            entry["xray"] = str(Path("cases") / case / "xray.nii.gz")
            entries.append(entry)
        except (VolumeReadError, ValueError, RuntimeError, OSError) as e:
            logger.warning("skipping %s: %s", study, e)
            skipped.append({"source": str(study), "reason": str(e)})
    strata = [str(e.get("label", "unlabelled")) for e in entries] if label_of else None
    meta = {"shape": list(shape) if shape is not None else None, "window_hu": [float(w) for w in window],
            "stratified_by": "label" if label_of else None}
    extra = {"labelled": sum("label" in e for e in entries),
             "xrays": {src: sum(e.get("xray_source") == src for e in entries) for src in ("paired", "drr")}}
    return _finish_dataset(out, entries, skipped, len(items), "studies", fractions, seed, strata, meta, extra)[1]


def write_phantom_ctpa_studies(out: str | Path, n: int = 8, shape: Sequence[int] = (64, 64, 48), spacing_mm: float = 5.0,
                               emboli: float = 0.5, seed: int = 0, emboli_sites: str = "central") -> Path:
    """CTPA-like phantoms (iodine contrast in the pulmonary arteries, emboli in about ``emboli`` of them, lodged at
    ``emboli_sites``: see :func:`ctsynth.phantoms.thorax_phantom`; ``central`` ones are visible at 5 mm) as
    ``OUT/studies/<id>.nii.gz`` with ``OUT/labels.csv`` (PE present or not): the input :func:`prepare_ctpa` takes."""
    from ctsynth.phantoms import thorax_phantom

    out = Path(out)
    check_outputs(files=[out / "datalist.json"])  # an output path that is a file stops here, before any work
    rows = ["id,label"]
    for i in range(int(n)):
        vol, info = thorax_phantom(tuple(shape), spacing_mm, seed=seed + 3000 + i, contrast=True, emboli=emboli,
                                   emboli_sites=emboli_sites)
        save_nifti(vol, out / "studies" / f"ctpa_{i:03d}.nii.gz")
        rows.append(f"ctpa_{i:03d},{int(bool(info.emboli))}")
    atomic_write_text("\n".join(rows) + "\n", out / "labels.csv")
    return out
