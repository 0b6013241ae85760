"""The MONAI Deploy applications, run as their users run them (``python -m ctsynth.deploy.<app> -i -o -m``):
DICOM thick series in -> DICOM thin series out in the same study; radiographs + geometry in -> CT out; bad input
ends the run with a non-zero status and the reader's message."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import torch

from conftest import run_python

from ctsynth.io import load_volume, save_dicom_series, save_nifti
from ctsynth.phantoms import thorax_phantom
from ctsynth.slices import interpolate_study

try:  # the SDK is an optional extra (pip install -e ".[deploy]"); CI installs it
    import monai.deploy.core  # noqa: F401

    HAS_SDK = True
except Exception:  # noqa: BLE001
    HAS_SDK = False

pytestmark = pytest.mark.skipif(not HAS_SDK, reason='MONAI Deploy App SDK not installed (pip install -e ".[deploy]")')


def _app(module: str, args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_python(["-m", f"ctsynth.deploy.{module}", *args], env=env, check=check)


@pytest.fixture(scope="module")
def thick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy_thick")
    vol, _ = thorax_phantom((40, 40, 24), 5.0, seed=11)
    save_dicom_series(vol, root / "thick", series_description="thick 5 mm")
    return root / "thick"


@pytest.mark.parametrize("env,spacing,method", [({}, 1.0, "cubic"),
                                                ({"CTSYNTH_SLICE_METHOD": "linear", "CTSYNTH_SPACING_MM": "2.5"},
                                                 2.5, "linear")])
def test_slice_interpolation_app_dicom_in_dicom_out(thick_study, tmp_path, env, spacing, method):
    out = tmp_path / "out"
    _app("slice_interp_app", ["-i", str(thick_study), "-o", str(out)], env)
    report = json.loads((out / "thin.json").read_text())
    thick = load_volume(thick_study)
    expected = interpolate_study(thick, spacing, method)
    assert report["method"] == method and report["spacing_mm"] == spacing
    assert report["slices"] == expected.shape[3] == report["dicom_files"] and report["input_slices"] == 24
    nifti = load_volume(out / "thin.nii.gz")
    assert torch.allclose(nifti.as_tensor(), expected.as_tensor(), atol=1e-3)
    # the DICOM series: same study and patient as the input, a new series, HU within the 16-bit storage step
    # (stored as HU + 1024 in 16 unsigned bits: cubic undershoot below -1024 HU is clipped)
    series = load_volume(out / "dicom")
    assert series.shape == expected.shape
    assert (series.as_tensor() - expected.as_tensor().clamp(-1024, 64511)).abs().max() <= 0.51
    ref = pydicom.dcmread(next(thick_study.iterdir()), stop_before_pixels=True)
    new = pydicom.dcmread(next((out / "dicom").iterdir()), stop_before_pixels=True)
    assert new.StudyInstanceUID == ref.StudyInstanceUID and new.PatientID == ref.PatientID
    assert new.SeriesInstanceUID != ref.SeriesInstanceUID and method in new.SeriesDescription


def test_slice_interpolation_app_takes_nifti(tmp_path):
    vol, _ = thorax_phantom((32, 32, 12), 5.0, seed=12)
    save_nifti(vol, tmp_path / "in" / "thick.nii.gz")
    _app("slice_interp_app", ["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")], {"CTSYNTH_SPACING_MM": "2"})
    report = json.loads((tmp_path / "out" / "thin.json").read_text())
    assert report["reference"] is None and report["slices"] == interpolate_study(vol, 2.0, "cubic").shape[3]


@pytest.mark.parametrize("setup,env,message", [
    ("corrupt", {}, "not a readable DICOM file"),
    ("two_niftis", {}, "holds 2 NIfTI files"),
    ("ok", {"CTSYNTH_SLICE_METHOD": "bicubic"}, "method must be one of"),
    ("ok", {"CTSYNTH_SPACING_MM": "thin"}, "CTSYNTH_SPACING_MM='thin': expected a float"),
])
def test_slice_interpolation_app_bad_input(thick_study, tmp_path, setup, env, message):
    src = tmp_path / "in"
    if setup == "corrupt":
        shutil.copytree(thick_study, src)
        (src / sorted(p.name for p in src.iterdir())[3]).write_bytes(b"not dicom")
    elif setup == "two_niftis":
        vol, _ = thorax_phantom((16, 16, 8), 5.0, seed=1)
        save_nifti(vol, src / "a.nii.gz")
        save_nifti(vol, src / "b.nii.gz")
    else:
        src = thick_study
    res = _app("slice_interp_app", ["-i", str(src), "-o", str(tmp_path / "out")], env, check=False)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr
    assert not (tmp_path / "out" / "thin.nii.gz").exists()


def test_settings_from_env():
    from ctsynth.deploy.apps import SLICE_ENV, settings_from_env

    assert settings_from_env(SLICE_ENV, {"CTSYNTH_SPACING_MM": "0.5", "CTSYNTH_INFERENCE_STEPS": "20",
                                         "CTSYNTH_SLICE_METHOD": "", "OTHER": "x"}) == {"spacing_mm": 0.5,
                                                                                       "inference_steps": 20}
    with pytest.raises(ValueError, match="CTSYNTH_SEED='one': expected a int"):
        settings_from_env(SLICE_ENV, {"CTSYNTH_SEED": "one"})


@pytest.fixture(scope="module")
def xray_study(tiny_cascade, tmp_path_factory):
    """The tiny stage-1 cascade, and one test study laid out as the app reads it (geometry.json + radiographs
    whose names sort in view order)."""
    root = tiny_cascade
    case = json.loads((root / "data" / "datalist.json").read_text())["test"][0]
    study = tmp_path_factory.mktemp("deploy_study") / "study"
    study.mkdir()
    for k, x in enumerate(case["xrays"]):
        shutil.copy(root / "data" / x, study / f"{k}_{Path(x).name}")
    shutil.copy(root / "data" / case["geometry"], study / "geometry.json")
    return root, study


def test_xray_to_ct_app(xray_study, tmp_path):
    root, study = xray_study
    out = tmp_path / "out"
    _app("xray2ct_app", ["-i", str(study), "-o", str(out), "-m", str(root / "models")])
    report = json.loads((out / "ct.json").read_text())
    ct = load_volume(out / "ct.nii.gz")
    assert ct.shape == (1, 16, 16, 16) and report["dicom_files"] == 16
    assert len(report["reprojection_psnr_db"]) == 2 and report["reference"] is None
    assert torch.allclose(load_volume(out / "dicom").as_tensor(), ct.as_tensor().clamp(-1024, 64511), atol=0.51)
    first = pydicom.dcmread(next((out / "dicom").iterdir()), stop_before_pixels=True)
    assert first.SeriesDescription == "ctsynth X-ray to CT" and first.Modality == "CT"


def test_xray_to_ct_app_refuses_a_missing_view_and_missing_weights(xray_study, tmp_path):
    root, study = xray_study
    one_view = tmp_path / "one"
    shutil.copytree(study, one_view)
    sorted(p for p in one_view.iterdir() if p.name != "geometry.json")[1].unlink()
    res = _app("xray2ct_app", ["-i", str(one_view), "-o", str(tmp_path / "o1"), "-m", str(root / "models")],
               check=False)
    assert res.returncode != 0 and "describes 2 views" in res.stdout + res.stderr
    empty = tmp_path / "empty_models"
    empty.mkdir()
    res = _app("xray2ct_app", ["-i", str(study), "-o", str(tmp_path / "o2"), "-m", str(empty)], check=False)
    assert res.returncode != 0 and "model.pt" in res.stdout + res.stderr
