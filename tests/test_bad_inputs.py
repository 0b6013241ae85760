"""The bad-input matrix: every case fails with an error that names the offending file (or setting) and says what
to do, and leaves no half-written output behind. Fixtures are made in code."""

import errno
import json
import re
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from ctsynth.engine import atomic_torch_save, load_network_weights, read_checkpoint_meta
from ctsynth.io import OutputWriteError, VolumeReadError, load_projection, load_volume, save_dicom_series, save_nifti
from ctsynth.phantoms import grid_affine
from ctsynth.prepare import align_thick_thin, load_datalist
from ctsynth.transforms import LoadGeometry, load_radiographs

#: words a fix starts with; every message must contain one
FIX = r"(?i)(use|pass|choose|remove|replace|fix|train|resample|prepare|free|give|convert|re-run|re-export|move|pick|write|set|correct|lower|extract)"


def _volume(shape=(10, 9, 8), spacing=(1.0, 1.0, 2.5), z0=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    aff = grid_affine(shape, spacing)
    aff[2, 3] = z0
    return MetaTensor((torch.rand(1, *shape, generator=g) * 2000 - 1000).round(), affine=aff)


def _series(root: Path, **kw) -> Path:
    save_dicom_series(_volume(**kw), root / "series")
    return root / "series"


def _edit_slice(folder: Path, index: int, **tags) -> None:
    f = sorted(folder.iterdir())[index]
    ds = pydicom.dcmread(f)
    for k, v in tags.items():
        setattr(ds, k, v(ds) if callable(v) else v)
    ds.save_as(f)


# ----------------------------------------------------------------------------------------- each case
def corrupt_slice(tmp):
    s = _series(tmp)
    (s / "slice_0003.dcm").write_bytes(b"DICM" * 8)
    return lambda: load_volume(s), VolumeReadError, "slice_0003.dcm"


def missing_slice(tmp):
    s = _series(tmp)
    sorted(s.iterdir())[4].unlink()
    return lambda: load_volume(s), VolumeReadError, "missing slice"


def duplicate_position(tmp):
    s = _series(tmp)
    shutil.copy(sorted(s.iterdir())[2], s / "copy.dcm")
    return lambda: load_volume(s), VolumeReadError, "duplicate slice position"


def two_series_mixed(tmp):
    save_dicom_series(_volume(seed=1), tmp / "study" / "a", series_description="thin")
    save_dicom_series(_volume(seed=2), tmp / "study" / "b", series_description="thick")
    return lambda: load_volume(tmp / "study"), VolumeReadError, "2 series found"


def gantry_tilt(tmp):
    s = _series(tmp)
    for i in range(8):
        _edit_slice(s, i, ImagePositionPatient=lambda ds, i=i: [ds.ImagePositionPatient[0],
                                                                  ds.ImagePositionPatient[1] + 1.5 * i,
                                                                  ds.ImagePositionPatient[2]])
    return lambda: load_volume(s), VolumeReadError, "gantry tilt"


def nonuniform_spacing(tmp):
    s = _series(tmp)
    _edit_slice(s, 5, ImagePositionPatient=lambda ds: [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 0.7])
    return lambda: load_volume(s), VolumeReadError, "non-uniform spacing"


def empty_zip(tmp):
    zipfile.ZipFile(tmp / "empty.zip", "w").close()
    return lambda: load_volume(tmp / "empty.zip"), VolumeReadError, "empty.zip"


def zip_parent_path(tmp):
    with zipfile.ZipFile(tmp / "evil.zip", "w") as zf:
        zf.writestr("../escape.dcm", b"x")
    return lambda: load_volume(tmp / "evil.zip"), VolumeReadError, "evil.zip.*'../escape.dcm'"


def zip_absolute_path(tmp):
    with zipfile.ZipFile(tmp / "abs.zip", "w") as zf:
        zf.writestr("/etc/evil.dcm", b"x")
    return lambda: load_volume(tmp / "abs.zip"), VolumeReadError, "abs.zip.*absolute path"


def zip_bomb(tmp):
    with zipfile.ZipFile(tmp / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (4 * 2**20))
    return lambda: load_volume(tmp / "bomb.zip"), VolumeReadError, "bomb.zip.*zip bomb"


def nifti_nan(tmp):
    a = np.zeros((4, 4, 4), np.float32)
    a[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp / "nan.nii.gz")
    return lambda: load_volume(tmp / "nan.nii.gz"), VolumeReadError, "nan.nii.gz: 1 NaN/Inf"


def image_2d_for_3d(tmp):
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp / "flat.nii.gz")
    return lambda: load_volume(tmp / "flat.nii.gz"), VolumeReadError, "flat.nii.gz.*3D"


def xray_wrong_size(tmp):
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp / "ap.png")
    return lambda: load_projection(tmp / "ap.png", expected_shape=(64, 64)), VolumeReadError, "ap.png.*30x40.*64x64"


def xray_colour(tmp):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp / "rgb.png")
    return lambda: load_projection(tmp / "rgb.png"), VolumeReadError, "rgb.png: colour image"


def xray_views_differ(tmp):
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp / "ap.png")
    Image.fromarray(np.zeros((16, 12), np.uint16)).save(tmp / "lat.png")
    return lambda: load_radiographs([tmp / "ap.png", tmp / "lat.png"]), VolumeReadError, "lat.png.*ap.png"


def wrong_number_of_views(tmp):
    from ctsynth.bundles import bundle_module
    from ctsynth.geometry import ProjectionGeometry

    ProjectionGeometry(angles_deg=[0.0, 90.0], detector_shape=(16, 16), pixel_spacing_mm=2.0).save_json(tmp / "g.json")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp / "ap.png")
    inference = bundle_module("cascade_xray2ct", "inference")
    return (lambda: inference.check_views([str(tmp / "ap.png")], str(tmp / "g.json")), ValueError,
            "g.json describes 2 views.*1 radiograph")


def geometry_missing_fields(tmp):
    (tmp / "geometry.json").write_text(json.dumps({"kind": "cone"}))
    return lambda: LoadGeometry()(tmp / "geometry.json"), ValueError, "geometry.json.*missing fields"


def thick_thin_disjoint(tmp):
    thick, thin = _volume((8, 8, 6), (1.0, 1.0, 5.0), z0=0.0), _volume((8, 8, 30), (1.0, 1.0, 1.0), z0=500.0)
    return lambda: align_thick_thin(thick, thin), ValueError, r"thick slices .* mm and thin slices .* mm"


def maisi_wrong_keys(tmp):
    from ctsynth.maisi import load_maisi_autoencoder

    torch.save({"encoder.nope.weight": torch.zeros(1)}, tmp / "autoencoder.pt")
    return lambda: load_maisi_autoencoder(tmp / "autoencoder.pt"), ValueError, "autoencoder.pt.*missing keys"


def vgg_wrong_shapes(tmp):
    from ctsynth.losses import VGG19Features

    torch.save({"features.0.weight": torch.zeros(1)}, tmp / "vgg19.pth")
    return lambda: VGG19Features(weights_path=tmp / "vgg19.pth"), ValueError, "vgg19.pth: not a torchvision vgg19"


def checkpoint_from_another_bundle(tmp):
    from ctsynth.bundles import bundle_module

    atomic_torch_save({"network": {}, "meta": {"scale_factor": 1.0, "conditioning": "latent"}}, tmp / "model.pt")
    generate = bundle_module("xray2ctpa_vqgan", "generate")
    return (lambda: generate.CTPAGenerator(torch.nn.Linear(1, 1), tmp / "model.pt", tmp / "vqgan.pt", None),
            ValueError, "model.pt: not an xray2ctpa_vqgan stage-2 checkpoint.*train_diffusion.json")


def checkpoint_not_a_checkpoint(tmp):
    (tmp / "weights.pt").write_bytes(b"not a pickle")
    return lambda: read_checkpoint_meta(tmp / "weights.pt"), ValueError, "weights.pt: not a readable PyTorch checkpoint"


def weights_file_missing(tmp):
    return (lambda: load_network_weights(torch.nn.Linear(1, 1), tmp / "missing.pt"), FileNotFoundError,
            "missing.pt. Train")


def target_depth_unreachable(tmp):
    from ctsynth.slices import slice_positions

    thick = _volume((8, 8, 6), (1.0, 1.0, 5.0))
    return lambda: slice_positions(thick, spacing_mm=1.0, count=500), ValueError, "500 slices at 1 mm.*beyond"


def datalist_missing_file(tmp):
    (tmp / "datalist.json").write_text(json.dumps({"training": [{"id": "a", "image": "cases/a.nii.gz"}]}))
    return lambda: load_datalist(tmp / "datalist.json"), FileNotFoundError, "datalist.json: case 'a' lists .*a.nii.gz"


CASES = [corrupt_slice, missing_slice, duplicate_position, two_series_mixed, gantry_tilt, nonuniform_spacing,
         empty_zip, zip_parent_path, zip_absolute_path, zip_bomb, nifti_nan, image_2d_for_3d, xray_wrong_size,
         xray_colour, xray_views_differ, wrong_number_of_views, geometry_missing_fields, thick_thin_disjoint,
         maisi_wrong_keys, vgg_wrong_shapes, checkpoint_from_another_bundle, checkpoint_not_a_checkpoint,
         weights_file_missing, target_depth_unreachable, datalist_missing_file]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_named_with_its_fix_and_nothing_is_written(case, tmp_path):
    call, error, match = case(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(error, match=match) as info:
        call()
    assert re.search(FIX, str(info.value)), f"no fix in: {info.value}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing (half) written


# ------------------------------------------------------------------------------------ disk full (simulated)
def _disk_full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["nifti", "dicom", "checkpoint"])
def test_disk_full_leaves_the_previous_output_and_names_it(writer, tmp_path, monkeypatch):
    vol = _volume()
    target = {"nifti": tmp_path / "ct.nii.gz", "dicom": tmp_path / "dcm", "checkpoint": tmp_path / "model.pt"}[writer]
    write = {"nifti": lambda: save_nifti(vol, target), "dicom": lambda: save_dicom_series(vol, target),
             "checkpoint": lambda: atomic_torch_save({"w": torch.ones(3)}, target)}[writer]
    write()
    if writer == "dicom":  # series go to a new folder each time
        target = tmp_path / "dcm2"
    snapshot = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    patch = {"nifti": ("nibabel.save", _disk_full), "dicom": ("pydicom.dataset.Dataset.save_as", _disk_full),
             "checkpoint": ("torch.save", _disk_full)}[writer]
    monkeypatch.setattr(*patch)
    with pytest.raises(OutputWriteError, match=f"{target.name}: could not be written \\(No space left on device\\).*"
                                               "Free disk space") as info:
        write()
    assert info.value.errno == errno.ENOSPC
    assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == snapshot
