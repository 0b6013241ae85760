import shutil
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from ctsynth.io import (VolumeReadError, find_dicom_series, load_projection, load_volume, safe_extract_zip,
                        save_dicom_series, save_nifti, save_projection_nifti)


def make_volume(shape=(12, 10, 8), spacing=(0.8, 0.9, 2.5), origin=(-5.0, 12.0, 300.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    data = (torch.rand(1, *shape, generator=g) * 2000 - 1000).round()
    aff = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    aff[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return MetaTensor(data, affine=aff)


@pytest.fixture
def series(tmp_path):
    vol = make_volume()
    save_dicom_series(vol, tmp_path / "ser")
    return vol, tmp_path / "ser"


def test_dicom_round_trip_and_tags(series):
    vol, folder = series
    back = load_volume(folder)
    assert back.shape == vol.shape
    assert torch.allclose(back.affine, vol.affine, atol=1e-4)
    assert torch.equal(back.as_tensor(), vol.as_tensor())
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.RescaleIntercept == -1024
    assert float(ds.SliceThickness) == pytest.approx(2.5)
    assert back.meta["slice_spacing_mm"] == pytest.approx(2.5)


def test_sorted_by_position_not_instance_number_and_rescale(series, tmp_path):
    vol, folder = series
    files = sorted(folder.iterdir())
    for i, f in enumerate(files):  # scramble instance numbers and names; change rescale on one slice
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = (i * 7) % len(files) + 1
        if i == 3:
            raw = ds.pixel_array.astype(np.int32)
            ds.RescaleSlope, ds.RescaleIntercept = 2, -2048
            ds.PixelData = ((raw + 1024) // 2).astype(np.uint16).tobytes()  # HU = 2 * stored - 2048
        ds.save_as(tmp_path / f"x{(i * 5) % len(files):03d}.dcm")
        f.unlink()
    for f in tmp_path.glob("x*.dcm"):
        shutil.move(f, folder / f.name)
    back = load_volume(folder)
    diff = (back.as_tensor() - vol.as_tensor()).abs()
    assert diff.max() <= 1.0  # slice 3 lost the odd HU to the slope of 2
    assert torch.allclose(back.affine, vol.affine, atol=1e-4)


def test_two_series_need_a_choice(tmp_path):
    a, b = make_volume(seed=1), make_volume(seed=2)
    save_dicom_series(a, tmp_path / "study" / "s1", series_description="thin")
    save_dicom_series(b, tmp_path / "study" / "s2", series_description="other")
    with pytest.raises(VolumeReadError, match=r"(?s)2 series found.*description='thin'"):
        load_volume(tmp_path / "study")
    chosen = load_volume(tmp_path / "study", series_description="THIN")
    assert torch.equal(chosen.as_tensor(), a.as_tensor())
    uid = [s for s in find_dicom_series(tmp_path / "study") if s.description == "other"][0].series_uid
    assert torch.equal(load_volume(tmp_path / "study", series_uid=uid).as_tensor(), b.as_tensor())
    with pytest.raises(VolumeReadError, match="no series matches"):
        load_volume(tmp_path / "study", series_uid="1.2.3")


def _edit(folder, index, fn):
    f = sorted(folder.iterdir())[index]
    ds = pydicom.dcmread(f)
    fn(ds)
    ds.save_as(f)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda folder: sorted(folder.iterdir())[4].unlink(), "missing slice"),
        (lambda folder: shutil.copy(sorted(folder.iterdir())[2], folder / "dup.dcm"), "duplicate slice position"),
        (lambda folder: _edit(folder, 5, lambda ds: setattr(ds, "ImagePositionPatient",
                                                            [*ds.ImagePositionPatient[:2], ds.ImagePositionPatient[2] + 0.7])),
         "non-uniform spacing"),
        (lambda folder: [_edit(folder, i, lambda ds, i=i: setattr(ds, "ImagePositionPatient",
                                                                 [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1] + 1.2 * i,
                                                                  ds.ImagePositionPatient[2]])) for i in range(8)],
         "gantry tilt"),
        (lambda folder: (folder / "slice_0003.dcm").write_bytes(b"DICM" * 10), "slice_0003.dcm: not a readable DICOM"),
        (lambda folder: _edit(folder, 1, lambda ds: setattr(ds, "Rows", 9)), "in-plane grid|corrupt"),
    ],
    ids=["gap", "duplicate", "nonuniform", "tilt", "corrupt", "mixed-grid"],
)
def test_bad_series(series, mutate, match):
    _, folder = series
    mutate(folder)
    with pytest.raises(VolumeReadError, match=match):
        load_volume(folder)


def test_resample_nonuniform(series):
    vol, folder = series
    sorted(folder.iterdir())[4].unlink()
    back = load_volume(folder, resample_nonuniform=True)
    assert back.shape == vol.shape
    expected = (vol[..., 3] + vol[..., 5]) / 2
    assert torch.allclose(back[..., 4], expected.as_tensor(), atol=1e-3)


def test_zip_reading_and_refusals(series, tmp_path):
    vol, folder = series
    good = tmp_path / "study.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"patient/series1/{f.name}")
    assert torch.equal(load_volume(good).as_tensor(), vol.as_tensor())
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.dcm", b"x")
    with pytest.raises(VolumeReadError, match="refusing entry '../escape.dcm'"):
        load_volume(evil)
    assert not (tmp_path / "escape.dcm").exists()
    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr("/etc/evil.dcm", b"x")
    with pytest.raises(VolumeReadError, match="absolute path"):
        safe_extract_zip(absolute, tmp_path / "out")
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(VolumeReadError, match="empty"):
        load_volume(empty)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (4 * 2**20))
    with pytest.raises(VolumeReadError, match="zip bomb"):
        safe_extract_zip(bomb, tmp_path / "out2")
    with pytest.raises(VolumeReadError, match="exceeds the limit"):
        safe_extract_zip(good, tmp_path / "out3", max_total_bytes=1000)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_nifti_round_trip_and_errors(tmp_path):
    vol = make_volume()
    p = save_nifti(vol, tmp_path / "v.nii.gz")
    back = load_volume(p)
    assert torch.equal(back.as_tensor(), vol.as_tensor()) and torch.allclose(back.affine, vol.affine)
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(VolumeReadError, match="nan.nii.gz: 1 NaN/Inf"):
        load_volume(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeReadError, match="expected a 3D volume"):
        load_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeReadError, match="unknown format"):
        load_volume(p.parent / "x.txt") if (p.parent / "x.txt").write_text("x") else None
    assert not list(tmp_path.glob(".tmp_*"))  # atomic writes leave no temporaries


def test_dicom_writer_copies_reference_tags(series, tmp_path):
    _, folder = series
    _edit(folder, 0, lambda ds: setattr(ds, "PatientID", "P-42"))
    ref = sorted(folder.iterdir())[0]
    files = save_dicom_series(make_volume(seed=3), tmp_path / "out", reference=ref)
    ds = pydicom.dcmread(files[0])
    assert ds.PatientID == "P-42"
    assert ds.StudyInstanceUID != pydicom.dcmread(ref).StudyInstanceUID
    with pytest.raises(FileExistsError):
        save_dicom_series(make_volume(), tmp_path / "out")


def test_projection_formats(tmp_path):
    from PIL import Image

    img = torch.arange(12.0).reshape(3, 4)
    save_projection_nifti(img, tmp_path / "p.nii.gz", (0.5, 0.7))
    back, info = load_projection(tmp_path / "p.nii.gz", expected_shape=(3, 4))
    assert torch.equal(back, img) and info["pixel_spacing_mm"] == pytest.approx([0.5, 0.7])
    Image.fromarray(np.array([[0, 65535], [1000, 2]], dtype=np.uint16)).save(tmp_path / "x16.png")
    a16, info = load_projection(tmp_path / "x16.png")
    assert info["bit_depth"] == 16 and a16[0, 1] == 65535
    with pytest.raises(VolumeReadError, match="expects 3x4"):
        load_projection(tmp_path / "x16.png", expected_shape=(3, 4))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(VolumeReadError, match="colour image"):
        load_projection(tmp_path / "rgb.png")
