"""Reading and writing CT volumes: NIfTI, DICOM series (folders or zipped studies).

Every reader returns a channel-first ``MetaTensor`` of shape (1, S0, S1, S2), float32 in HU, whose
``affine`` maps voxel indices to world RAS millimetres (the MONAI convention). DICOM series are
assembled from geometry, not from file order: slices are sorted by ImagePositionPatient projected on the
slice normal, the spacing comes from those positions (never SliceThickness), and rescale
slope/intercept are applied per slice. Every writer is atomic: it writes to a temporary name beside the
target and renames, so an interrupted write never leaves a half file under the final name.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from ctsynth.atomic import OutputWriteError, atomic_write, output_write_error

__all__ = [
    "CT_IMAGE_STORAGE",
    "DicomSeriesInfo",
    "VolumeReadError",
    "OutputWriteError",
    "output_write_error",
    "safe_extract_zip",
    "zip_limits",
    "find_dicom_series",
    "read_dicom_series",
    "load_volume",
    "save_nifti",
    "save_dicom_series",
    "check_dicom_output",
    "check_outputs",
    "check_affine",
    "is_nifti",
    "save_projection_nifti",
    "load_projection",
]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NON_DICOM_SUFFIXES = {".txt", ".json", ".md", ".csv", ".xml", ".png", ".jpg", ".jpeg", ".pdf", ".nii", ".gz", ".zip",
                       ".html", ".log", ".ini", ".db"}
#: zip limits: one entry's expansion; the whole archive's expansion (times its size) and that limit's floor
_DEFAULT_ZIP_RATIO = 1000.0
_DEFAULT_ZIP_TOTAL_RATIO, _ZIP_RELATIVE_FLOOR = 50.0, 256 * 2**20
#: compression methods Python's zipfile reads: stored, deflate, bzip2, lzma
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


class VolumeReadError(ValueError):
    """A volume could not be read; the message names the file and the fix."""


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# ---------------------------------------------------------------------------------------------- zip
def zip_limits(archive: str | Path, dest: str | Path, max_total_bytes: int | None = None,
               max_total_ratio: float | None = None) -> int:
    """The most bytes :func:`safe_extract_zip` may write for ``archive`` into ``dest``: the smallest of
    ``max_total_bytes`` (default ``$CTSYNTH_ZIP_MAX_GIB`` GiB, else 64 GiB), ``max_total_ratio`` times the
    archive's size (default ``$CTSYNTH_ZIP_MAX_RATIO``, else 50; at least 256 MiB) and the free space at ``dest``
    less 1 GiB."""
    env_gib, env_ratio = os.environ.get("CTSYNTH_ZIP_MAX_GIB"), os.environ.get("CTSYNTH_ZIP_MAX_RATIO")
    cap = int(max_total_bytes if max_total_bytes is not None else float(env_gib or 64) * 2**30)
    ratio = float(max_total_ratio if max_total_ratio is not None else env_ratio or _DEFAULT_ZIP_TOTAL_RATIO)
    relative = max(int(ratio * Path(archive).stat().st_size), _ZIP_RELATIVE_FLOOR)
    probe = Path(dest)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free - 2**30
    return max(0, min(cap, relative, free))


def safe_extract_zip(
    archive: str | Path,
    dest: str | Path,
    max_total_bytes: int | None = None,
    max_ratio: float = _DEFAULT_ZIP_RATIO,
    max_total_ratio: float | None = None,
) -> list[Path]:
    """Extracts a zip archive without ever writing outside ``dest``.

    Refuses, before writing anything, archives with absolute paths, ``..`` components, symbolic links, entries
    that expand more than ``max_ratio`` times (zip bombs), and archives whose total uncompressed size exceeds
    :func:`zip_limits` (an absolute cap, a multiple of the archive's size, the free space). Encrypted entries,
    unsupported compression methods (e.g. Deflate64) and corrupt data (bad CRC) are refused with the archive's
    and the entry's name; a failed extraction removes what it wrote.

    Returns:
        The extracted regular files.

    Raises:
        VolumeReadError: naming the archive, the offending entry and the fix.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError) as e:
        raise VolumeReadError(f"{archive}: not a readable zip archive ({e}); re-create it with `zip -r`") from None
    with zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            name = info.filename
            parts = Path(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise VolumeReadError(
                    f"{archive}: refusing entry {name!r} (absolute path or '..' would write outside the target); "
                    "re-create the archive with relative paths"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise VolumeReadError(f"{archive}: refusing symbolic link entry {name!r}; re-create the archive "
                                      "without links")
            if info.flag_bits & 0x1:
                raise VolumeReadError(f"{archive}: entry {name!r} is encrypted; extract it yourself with the password "
                                      "and pass the folder")
            if info.compress_type not in _ZIP_METHODS:
                raise VolumeReadError(f"{archive}: entry {name!r} uses compression method {info.compress_type} "
                                      "(e.g. Deflate64), which Python cannot read; re-create the archive with plain "
                                      "deflate (`zip -r`), or extract it yourself and pass the folder")
            total += info.file_size
            if info.compress_size > 0 and info.file_size / info.compress_size > max_ratio and info.file_size > 2**20:
                raise VolumeReadError(
                    f"{archive}: entry {name!r} expands {info.file_size / info.compress_size:.0f}x "
                    f"(limit {max_ratio:.0f}x); this looks like a zip bomb. If you trust the file, extract it yourself "
                    "and pass the folder"
                )
        limit = zip_limits(archive, dest, max_total_bytes, max_total_ratio)
        if total > limit:
            raise VolumeReadError(
                f"{archive}: {total / 2**30:.2f} GiB uncompressed exceeds the limit of {limit / 2**30:.2f} GiB (the "
                "smallest of CTSYNTH_ZIP_MAX_GIB, CTSYNTH_ZIP_MAX_RATIO times the archive's size, and the free space); "
                "free space, raise those limits if the archive is trusted, or extract it yourself and pass the folder"
            )
        files = [i for i in infos if not i.is_dir()]
        if not files:
            raise VolumeReadError(f"{archive}: the zip archive is empty; expected DICOM files of one or more series: "
                                  "re-export the study, or pass the DICOM folder instead")
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VolumeReadError(f"{archive}: cannot extract into {dest} ({e.strerror or e}); free space or set "
                                  "TMPDIR to a writable folder") from None
        root = dest.resolve()
        out: list[Path] = []
        target = root
        try:
            for info in files:
                target = (dest / info.filename).resolve()
                if root not in target.parents:
                    raise VolumeReadError(f"{archive}: entry {info.filename!r} resolves outside the target")
                target.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(target, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        written += len(block)
                        if written > info.file_size:  # the header lied about the size
                            raise VolumeReadError(f"{archive}: entry {info.filename!r} expands beyond the size it "
                                                  "declares; the archive is corrupt or hostile: re-create it")
                        dst.write(block)
                out.append(target)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as e:
            _remove([*out, target])
            raise VolumeReadError(f"{archive}: entry {info.filename!r} cannot be read ({e}); the archive is damaged: "
                                  "re-create it, or drop the study") from None
        except OSError as e:
            _remove([*out, target])
            raise VolumeReadError(f"{archive}: extracting {info.filename!r} into {dest} failed ({e.strerror or e}); "
                                  "free space or set TMPDIR to a writable folder") from None
        except BaseException:
            _remove([*out, target])
            raise
    return out


def _remove(files: Sequence[Path]) -> None:
    """Deletes the files a failed extraction wrote (folders are left: the caller's temporary folder holds them)."""
    for f in files:
        if f.is_file():
            f.unlink()


# ---------------------------------------------------------------------------------------------- DICOM
@dataclass
class DicomSeriesInfo:
    """One DICOM series found on disk."""

    series_uid: str
    description: str
    files: list[Path] = field(default_factory=list)
    study_uid: str = ""
    modality: str = ""

    def summary(self) -> str:
        return f"uid={self.series_uid} description={self.description!r} files={len(self.files)}"


def _looks_non_dicom(path: Path) -> bool:
    return path.name.upper() == "DICOMDIR" or path.suffix.lower() in _NON_DICOM_SUFFIXES or path.name.startswith(".")


def find_dicom_series(root: str | Path) -> list[DicomSeriesInfo]:
    """Groups the DICOM files below ``root`` by SeriesInstanceUID (headers only).

    Raises:
        VolumeReadError: a file that should be DICOM cannot be parsed (names the file), or none found.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    series: dict[str, DicomSeriesInfo] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if _looks_non_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as e:
            raise VolumeReadError(
                f"{path}: not a readable DICOM file ({type(e).__name__}: {e}); remove or replace this file "
                "(the rest of its series is untouched)"
            ) from None
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if not uid:
            raise VolumeReadError(f"{path}: DICOM file without SeriesInstanceUID; cannot group it into a series")
        if uid not in series:
            series[uid] = DicomSeriesInfo(
                series_uid=uid,
                description=str(getattr(ds, "SeriesDescription", "") or ""),
                study_uid=str(getattr(ds, "StudyInstanceUID", "") or ""),
                modality=str(getattr(ds, "Modality", "") or ""),
            )
        series[uid].files.append(path)
    if not series:
        raise VolumeReadError(f"{root}: no DICOM files found; expected a folder (or zip) holding one or more series")
    return list(series.values())


def _select_series(
    found: list[DicomSeriesInfo], where: Path, series_uid: str | None, series_description: str | None
) -> DicomSeriesInfo:
    if series_uid is not None:
        match = [s for s in found if s.series_uid == series_uid]
    elif series_description is not None:
        match = [s for s in found if s.description.lower() == series_description.lower()]
    else:
        match = found
    if len(match) == 1:
        return match[0]
    listing = "\n  ".join(s.summary() for s in found)
    if not match:
        raise VolumeReadError(
            f"{where}: no series matches uid={series_uid!r} description={series_description!r}; found:\n  {listing}"
        )
    raise VolumeReadError(
        f"{where}: {len(match)} series found; choose one with series_uid=... (CLI: --series-uid) or "
        f"series_description=...:\n  {listing}"
    )


def read_dicom_series(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    series_description: str | None = None,
    resample_nonuniform: bool = False,
    spacing_tolerance: float = 0.01,
) -> MetaTensor:
    """Reads one DICOM series into a (1, columns, rows, slices) HU volume with a RAS affine.

    Args:
        source: a folder (searched recursively), a ``.zip``, or a list of files of one series.
        series_uid: choose this SeriesInstanceUID when several series are present.
        series_description: or choose by SeriesDescription (case-insensitive).
        resample_nonuniform: resample unevenly spaced slices onto a uniform grid (linear) instead of
            failing; the new spacing is the median gap.
        spacing_tolerance: relative deviation of slice gaps tolerated as uniform.

    Raises:
        VolumeReadError: corrupt files, several series without a choice, duplicate positions, missing
            slices, non-uniform spacing, gantry tilt, inconsistent in-plane geometry.
    """
    import pydicom

    if isinstance(source, (str, Path)):
        src = Path(source)
        if src.suffix.lower() == ".zip":
            with tempfile.TemporaryDirectory(prefix="ctsynth_zip_") as tmp:
                safe_extract_zip(src, tmp)
                vol = read_dicom_series(Path(tmp), series_uid, series_description, resample_nonuniform, spacing_tolerance)
                vol.meta["filename_or_obj"] = str(src)
                return vol
        if not src.exists():
            raise VolumeReadError(f"{src}: no such file or folder")
        chosen = _select_series(find_dicom_series(src), src, series_uid, series_description)
        files, where = chosen.files, src
    else:
        files = [Path(f) for f in source]
        where = files[0].parent if files else Path(".")
    if len(files) < 2:
        raise VolumeReadError(f"{where}: a series needs at least 2 slices, found {len(files)}")

    slices, warnings = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
        except Exception as e:  # pydicom raises many types for broken pixel data
            raise VolumeReadError(
                f"{f}: corrupt DICOM slice ({type(e).__name__}: {e}); replace the file or drop the series"
            ) from None
        if pixels.ndim != 2:
            raise VolumeReadError(f"{f}: multi-frame DICOM ({pixels.shape}) is not supported; export single-frame slices")
        ipp, iop, spacing = _slice_geometry(ds, f)
        slope, intercept = _rescale(ds, f, pixels, warnings)
        slices.append(
            {
                "file": f,
                "ipp": ipp,
                "iop": iop,
                "spacing": spacing,
                "shape": pixels.shape,
                "hu": pixels.astype(np.float32) * slope + intercept,
                "ds": ds,
            }
        )
    ref = slices[0]
    for s in slices[1:]:
        if s["shape"] != ref["shape"] or not np.allclose(s["spacing"], ref["spacing"], rtol=1e-3):
            raise VolumeReadError(
                f"{s['file']}: in-plane grid {s['shape']} @ {s['spacing'].tolist()} mm differs from {ref['file'].name} "
                f"{ref['shape']} @ {ref['spacing'].tolist()} mm; the folder mixes series, split it"
            )
        if not np.allclose(s["iop"], ref["iop"], atol=1e-3):
            raise VolumeReadError(
                f"{s['file']}: ImageOrientationPatient differs from {ref['file'].name}; the folder mixes series, split it"
            )
    row_dir, col_dir = ref["iop"][:3], ref["iop"][3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([s["ipp"] @ normal for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    pos = pos[order]
    gaps = np.diff(pos)
    dup = np.where(np.abs(gaps) < 1e-3)[0]
    if dup.size:
        a, b = slices[dup[0]]["file"], slices[dup[0] + 1]["file"]
        raise VolumeReadError(
            f"{where}: duplicate slice position {pos[dup[0]]:.3f} mm in {a.name} and {b.name}; remove one of them "
            "(or the folder holds two acquisitions: split it)"
        )
    step = np.median(gaps)
    # gantry tilt: slices must stack along the normal
    span = slices[-1]["ipp"] - slices[0]["ipp"]
    off_axis = np.linalg.norm(span - (span @ normal) * normal)
    if off_axis > 0.01 * max(abs(span @ normal), 1.0) + 1e-3:
        tilt = np.degrees(np.arctan2(off_axis, abs(span @ normal)))
        raise VolumeReadError(
            f"{where}: gantry tilt of {tilt:.1f} degrees (slice origins drift off the slice normal); "
            "correct it first (e.g. reslice to an untilted grid in your PACS or with ITK)"
        )
    nonuniform = np.abs(gaps - step) > spacing_tolerance * step + 1e-4
    stack = np.stack([s["hu"] for s in slices], axis=0)  # slices, rows, cols
    if nonuniform.any():
        i = int(np.where(nonuniform)[0][0])
        ratio = gaps[i] / step
        kind = "missing slice(s)" if abs(ratio - round(ratio)) < 0.05 and ratio > 1.5 else "non-uniform spacing"
        if not resample_nonuniform:
            raise VolumeReadError(
                f"{where}: {kind}: gap of {gaps[i]:.3f} mm between {slices[i]['file'].name} and "
                f"{slices[i + 1]['file'].name}, expected {step:.3f} mm; pass resample_nonuniform=True "
                "(CLI: --resample) to interpolate onto a uniform grid"
            )
        n_new = int(round((pos[-1] - pos[0]) / step)) + 1
        new_pos = pos[0] + step * np.arange(n_new)
        idx = np.clip(np.searchsorted(pos, new_pos, side="right") - 1, 0, len(pos) - 2)
        w = ((new_pos - pos[idx]) / (pos[idx + 1] - pos[idx])).astype(np.float32)[:, None, None]
        stack = stack[idx] * (1 - w) + stack[idx + 1] * w
        logger.warning("%s: %s resampled onto %d slices of %.3f mm", where, kind, n_new, step)
    dr, dc = ref["spacing"]  # DICOM PixelSpacing = (row spacing, column spacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc  # index i runs along a row (increasing column)
    lps[:3, 1] = col_dir * dr  # index j runs down the columns (increasing row)
    lps[:3, 2] = normal * step
    lps[:3, 3] = slices[0]["ipp"]
    data = np.ascontiguousarray(stack.transpose(2, 1, 0))  # cols, rows, slices
    first = slices[0]["ds"]
    meta: dict[str, Any] = {
        "filename_or_obj": str(where),
        "series_uid": str(getattr(first, "SeriesInstanceUID", "")),
        "series_description": str(getattr(first, "SeriesDescription", "")),
        "study_uid": str(getattr(first, "StudyInstanceUID", "")),
        "kvp": float(first.KVP) if "KVP" in first and first.KVP not in (None, "") else None,
        "convolution_kernel": str(getattr(first, "ConvolutionKernel", "") or ""),
        "slice_thickness_tag": float(first.SliceThickness) if getattr(first, "SliceThickness", None) else None,
        "slice_spacing_mm": float(step),
        "warnings": sorted(set(warnings)),
    }
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(_LPS_TO_RAS @ lps), meta=meta)


def _numbers(ds: Any, tag: str, n: int, f: Path) -> np.ndarray:
    """Tag ``tag`` of ``ds`` as ``n`` finite numbers, or a VolumeReadError naming the file and the tag."""
    if tag not in ds or ds.data_element(tag).value in (None, ""):
        raise VolumeReadError(f"{f}: missing {tag}; cannot place the slice in space. Re-export the series with its "
                              "geometry tags")
    raw = ds.data_element(tag).value
    values = list(raw) if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") and not isinstance(raw, str) else [raw]
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeReadError(f"{f}: {tag} {values!r} is not numeric; correct the tag or re-export the series") from None
    if arr.size != n:
        raise VolumeReadError(f"{f}: {tag} has {arr.size} values, expected {n}; correct the tag or re-export the series")
    if not np.isfinite(arr).all():
        raise VolumeReadError(f"{f}: {tag} holds NaN/Inf ({arr.tolist()}); correct the tag or re-export the series")
    return arr


def _slice_geometry(ds: Any, f: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of a slice, each checked: finite, the
    orientation two unit vectors at right angles, the spacing positive."""
    ipp = _numbers(ds, "ImagePositionPatient", 3, f)
    iop = _numbers(ds, "ImageOrientationPatient", 6, f)
    spacing = _numbers(ds, "PixelSpacing", 2, f)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise VolumeReadError(f"{f}: ImageOrientationPatient {iop.tolist()} is not two unit vectors at right angles; "
                              "correct the tag or re-export the series")
    if (spacing <= 0).any():
        raise VolumeReadError(f"{f}: PixelSpacing {spacing.tolist()} must be positive (mm); correct the tag or re-export "
                              "the series")
    return ipp, iop, spacing


def _rescale(ds: Any, f: Path, pixels: np.ndarray, warnings: list[str]) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a slice; a CT slice without them is read as stored, with a warning
    (once a series) that says whether the values look like HU."""
    missing = [t for t in ("RescaleSlope", "RescaleIntercept") if t not in ds or ds.data_element(t).value in (None, "")]
    if missing and str(getattr(ds, "Modality", "CT")).upper() == "CT":
        looks_raw = pixels.size and float(pixels.min()) >= 0
        warnings.append(f"{f.parent}: CT slices lack {' and '.join(missing)}; values were read as stored"
                        + (" and are all >= 0, so they are probably not HU (stored values usually need an intercept "
                           "of -1024): check the output or add the tags" if looks_raw else " (taken as HU)"))
        logger.warning(warnings[-1])
    slope = float(ds.RescaleSlope) if "RescaleSlope" not in missing else 1.0
    intercept = float(ds.RescaleIntercept) if "RescaleIntercept" not in missing else 0.0
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise VolumeReadError(f"{f}: RescaleSlope {slope} / RescaleIntercept {intercept} must be finite and the slope "
                              "non-zero; correct the tags")
    return slope, intercept


def check_affine(affine: Any, source: str | Path, orthogonal: bool = False) -> np.ndarray:
    """``affine`` as a (4, 4) float64 array after checking it places voxels in space: finite, every voxel
    spacing > 0 (and, with ``orthogonal``, the axes at right angles, as DICOM's orientation vectors must be).

    Raises:
        VolumeReadError: naming ``source`` and the fix.
    """
    aff = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise VolumeReadError(f"{source}: its affine is not a finite 4x4 matrix; fix the file's header (qform/sform)")
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if (spacing < 1e-6).any():
        raise VolumeReadError(f"{source}: voxel spacing {spacing.round(6).tolist()} mm has a zero axis; fix the "
                              "file's header (pixdim / sform) so that every spacing is positive")
    if orthogonal:
        axes = aff[:3, :3] / spacing
        off = np.abs(axes.T @ axes - np.eye(3)).max()
        if off > 1e-3:
            raise VolumeReadError(f"{source}: its voxel axes are sheared (not at right angles), which a DICOM series "
                                  "cannot represent; resample it onto an orthogonal grid first (e.g. with ITK or "
                                  "`monai.transforms.Spacing`), or write NIfTI instead")
    return aff


# ---------------------------------------------------------------------------------------------- NIfTI / dispatch
def _read_nifti(path: Path) -> MetaTensor:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeReadError(
            f"{path}: expected a 3D volume, got shape {data.shape}; select one channel/time point or pass a 3D image"
        )
    bad = ~np.isfinite(data)
    if bad.any():
        raise VolumeReadError(
            f"{path}: {int(bad.sum())} NaN/Inf voxels; fix the file (e.g. replace them with -1000 HU) before using it"
        )
    _check_nifti_pixdim(path, img)
    affine = check_affine(img.affine, path)
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(affine),
                      meta={"filename_or_obj": str(path)})


def _check_nifti_pixdim(path: Path, img: Any) -> None:
    """Refuses a NIfTI whose voxel spacing comes from ``pixdim`` (no sform) with a zero or non-finite entry:
    nibabel would silently read such a spacing as 1 mm."""
    if int(img.header["sform_code"]) > 0:
        return  # the sform places the voxels; check_affine checks it
    with nib.openers.ImageOpener(str(path)) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if not np.isfinite(pixdim).all() or (pixdim == 0).any():
        raise VolumeReadError(f"{path}: voxel spacing (pixdim) {pixdim.tolist()} mm has a zero or non-finite axis; fix "
                              "the file's header so that every spacing is positive")


def load_volume(
    path: str | Path,
    series_uid: str | None = None,
    series_description: str | None = None,
    resample_nonuniform: bool = False,
) -> MetaTensor:
    """Loads a CT volume from NIfTI, a DICOM folder or a zip of DICOM studies.

    Returns:
        (1, S0, S1, S2) float32 MetaTensor in HU with a RAS affine.

    Raises:
        VolumeReadError: with the file and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: no such file or folder")
    if is_nifti(path):
        return _read_nifti(path)
    if path.is_dir() or path.suffix.lower() in (".zip", ".dcm"):
        src = path.parent if path.suffix.lower() == ".dcm" else path
        return read_dicom_series(src, series_uid, series_description, resample_nonuniform)
    raise VolumeReadError(f"{path}: unknown format; expected .nii/.nii.gz, a DICOM folder or a .zip of DICOM files")


# ---------------------------------------------------------------------------------------------- writers
def _affine_of(volume: torch.Tensor, affine: Any) -> np.ndarray:
    if affine is None:
        affine = getattr(volume, "affine", None)
    if affine is None:
        raise ValueError("no affine: pass affine=... or a MetaTensor")
    return np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu())


def _as_3d(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a (1, S0, S1, S2) or (S0, S1, S2) volume, got shape {arr.shape}")
    return arr


def save_nifti(volume: torch.Tensor | np.ndarray, path: str | Path, affine: Any = None) -> Path:
    """Writes a volume as NIfTI (atomically), keeping its affine.

    Args:
        volume: (1, S0, S1, S2) or (S0, S1, S2).
        path: ``.nii`` or ``.nii.gz``.
        affine: (4, 4) RAS affine; taken from a MetaTensor when omitted.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: NIfTI outputs end in .nii or .nii.gz")
    arr = _as_3d(volume)
    aff = _affine_of(volume, affine)
    img = nib.Nifti1Image(arr, aff)
    img.header.set_xyzt_units("mm", "sec")
    # compressed by the name, in any case (OUT.NII.GZ too): nibabel goes by the lower-case temporary name
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    return atomic_write(lambda tmp: nib.save(img, str(tmp)), path, suffix)


_PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
)


def check_outputs(nifti: Sequence[str | Path | None] = (), dicom: str | Path | None = None,
                  files: Sequence[str | Path | None] = ()) -> None:
    """Checks, before any work, that every output of a command can be written, so that a run never replaces one
    output and then fails on the next: ``nifti`` paths end in ``.nii`` / ``.nii.gz`` (any case), ``dicom`` is a new
    or empty folder, and no output (``files``: reports, previews) is an existing folder or lies below a file.
    ``None`` entries are skipped.

    Raises:
        ValueError / FileExistsError: naming the output and the fix.
    """
    for path in [p for p in nifti if p is not None]:
        if not is_nifti(path):
            raise ValueError(f"{path}: NIfTI outputs end in .nii or .nii.gz; name the output e.g. out.nii.gz")
    for path in [Path(p) for p in [*nifti, *files] if p is not None]:
        if path.is_dir():
            raise FileExistsError(f"{path}: is a folder; give a file name for this output")
        blocking = next((q for q in path.parents if q.exists() and not q.is_dir()), None)
        if blocking is not None:
            raise FileExistsError(f"{path}: cannot be written because {blocking} is a file, not a folder; choose "
                                  "another output path")
    if dicom is not None:
        check_dicom_output(dicom)


def check_dicom_output(out_dir: str | Path) -> Path:
    """``out_dir`` after checking a DICOM series can be written there: a new or empty folder, not a file.

    Raises:
        FileExistsError: naming the folder and the fix.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: is a file, not a folder; choose a new folder for the DICOM series")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output folder is not empty; choose a new folder (nothing was written)")
    return out_dir


def save_dicom_series(
    volume: torch.Tensor | np.ndarray,
    out_dir: str | Path,
    affine: Any = None,
    reference: str | Path | None = None,
    series_description: str = "ctsynth synthetic CT",
    series_number: int = 900,
    same_study: bool = False,
) -> list[Path]:
    """Writes a volume as a DICOM CT Image Storage series, one file per slice (atomically, as a folder).

    New Study/Series/SOP Instance UIDs are generated (``same_study`` keeps the reference's study UID).
    ImagePositionPatient / ImageOrientationPatient / PixelSpacing / SliceThickness follow the affine; pixels
    are stored as unsigned 16-bit ``HU + 1024`` with RescaleIntercept -1024 and RescaleSlope 1.

    Args:
        volume: (1, S0, S1, S2) HU, index 2 being the slice axis.
        out_dir: folder to create (must not exist or be empty).
        affine: RAS affine; taken from a MetaTensor when omitted.
        reference: a DICOM file or series folder whose patient and study tags are copied.
        series_description: SeriesDescription of the new series.
        series_number: SeriesNumber.
        same_study: put the series into the reference's study.

    Returns:
        The written files, in slice order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = _as_3d(volume)
    source = getattr(volume, "meta", {}).get("filename_or_obj") or out_dir
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ check_affine(_affine_of(volume, affine), source, orthogonal=True)
    out_dir = check_dicom_output(out_dir)
    ref_ds = None
    if reference is not None:
        ref = Path(reference)
        ref_file = ref if ref.is_file() else find_dicom_series(ref)[0].files[0]
        ref_ds = pydicom.dcmread(ref_file, stop_before_pixels=True)
    dc, dr, dz = (float(np.linalg.norm(lps[:3, i])) for i in range(3))
    row_dir, col_dir = lps[:3, 0] / dc, lps[:3, 1] / dr
    study_uid = str(ref_ds.StudyInstanceUID) if (same_study and ref_ds is not None) else generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    stored = np.clip(np.rint(arr + 1024.0), 0, 65535).astype(np.uint16)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp_dicom_", dir=parent))
    files: list[Path] = []
    try:
        for k in range(arr.shape[2]):
            sop_uid = generate_uid()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = sop_uid
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            if ref_ds is not None:
                for tag in _PATIENT_STUDY_TAGS:
                    if tag in ref_ds:
                        setattr(ds, tag, getattr(ref_ds, tag))
            ds.PatientName = ds.get("PatientName", "ctsynth^synthetic")
            ds.PatientID = ds.get("PatientID", "ctsynth")
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.Modality = "CT"
            ds.SeriesDescription = series_description
            ds.SeriesNumber = series_number
            ds.InstanceNumber = k + 1
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.ImagePositionPatient = [float(x) for x in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]]
            ds.ImageOrientationPatient = [float(x) for x in np.concatenate([row_dir, col_dir])]
            ds.PixelSpacing = [dr, dc]
            ds.SliceThickness = dz
            ds.SpacingBetweenSlices = dz
            ds.Rows, ds.Columns = arr.shape[1], arr.shape[0]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            name = f"slice_{k:04d}.dcm"
            ds.save_as(tmp_dir / name, enforce_file_format=True)
            files.append(out_dir / name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp_dir, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
            raise output_write_error(out_dir, e) from None
        raise
    return files


# ---------------------------------------------------------------------------------------------- radiographs
_XRAY_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".dcm")


def save_projection_nifti(image: torch.Tensor | np.ndarray, path: str | Path, pixel_spacing_mm: Sequence[float]) -> Path:
    """Writes one radiograph (rows, cols) as NIfTI: x = detector column, y = detector row, spacing in mm."""
    a = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a (rows, cols) radiograph, got shape {a.shape}")
    sr, sc = (float(s) for s in pixel_spacing_mm)
    return save_nifti(a.T[:, :, None], path, affine=np.diag([sc, sr, 1.0, 1.0]))


def load_projection(path: str | Path, expected_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Reads one radiograph as a float32 (rows, cols) tensor.

    NIfTI (as written by :func:`save_projection_nifti`, line integrals), 8/16-bit PNG or TIFF, JPEG, or a
    single-frame DICOM (rescale applied). Returns ``(image, info)`` with ``info`` holding ``format``,
    ``bit_depth`` and ``pixel_spacing_mm`` when known.

    Raises:
        VolumeReadError: unreadable file, not 2D, colour image, or shape differing from ``expected_shape``.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path}: radiograph not found")
    info: dict[str, Any] = {"path": str(path)}
    name = path.name.lower()
    try:
        if is_nifti(path):
            img = nib.load(str(path))
            a = np.asarray(img.dataobj, dtype=np.float32)
            a = a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a
            if a.ndim != 2:
                raise VolumeReadError(f"{path}: expected a 2D radiograph, got shape {a.shape}")
            a = a.T
            info.update(format="nifti", bit_depth=32,
                        pixel_spacing_mm=[float(abs(img.affine[1, 1])), float(abs(img.affine[0, 0]))])
        elif name.endswith(".dcm"):
            import pydicom

            ds = pydicom.dcmread(path)
            a = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
                getattr(ds, "RescaleIntercept", 0) or 0)
            if a.ndim != 2:
                raise VolumeReadError(f"{path}: expected a single-frame grayscale radiograph, got shape {a.shape}")
            if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
                a = a.max() - a
            sp = getattr(ds, "ImagerPixelSpacing", None) or getattr(ds, "PixelSpacing", None)
            info.update(format="dicom", bit_depth=int(ds.BitsStored),
                        pixel_spacing_mm=[float(s) for s in sp] if sp else None)
        elif name.endswith(_XRAY_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                mode = im.mode
                if mode in ("RGB", "RGBA", "P", "CMYK"):
                    raise VolumeReadError(
                        f"{path}: colour image ({mode}); radiographs must be grayscale (8- or 16-bit), convert it first"
                    )
                a = np.asarray(im, dtype=np.float32)
            depth = {"1": 1, "L": 8, "I;16": 16, "I;16B": 16, "I": 32, "F": 32}.get(mode, 0)
            if depth == 0:
                raise VolumeReadError(f"{path}: unsupported image mode {mode}; save as 8/16-bit grayscale PNG or TIFF")
            info.update(format=path.suffix.lower().lstrip("."), bit_depth=depth, pixel_spacing_mm=None)
        else:
            raise VolumeReadError(f"{path}: unknown radiograph format; expected NIfTI, PNG, TIFF, JPEG or DICOM")
    except VolumeReadError:
        raise
    except Exception as e:
        raise VolumeReadError(f"{path}: cannot read radiograph ({type(e).__name__}: {e})") from None
    if not np.isfinite(a).all():
        raise VolumeReadError(f"{path}: NaN/Inf pixels in the radiograph")
    if expected_shape is not None and tuple(a.shape) != tuple(expected_shape):
        raise VolumeReadError(
            f"{path}: radiograph is {a.shape[0]}x{a.shape[1]} pixels, the geometry expects "
            f"{expected_shape[0]}x{expected_shape[1]}; resample it or use the matching geometry.json"
        )
    return torch.from_numpy(np.ascontiguousarray(a)), info
