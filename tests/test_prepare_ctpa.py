"""`ctsynth prepare ctpa`: CTPA studies (NIfTI, DICOM) -> resampled NIfTI, paired X-ray or DRR, PE labels, datalist."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from ctsynth.cli import main
from ctsynth.io import load_projection, load_volume, save_dicom_series, save_nifti
from ctsynth.phantoms import grid_affine, thorax_phantom
from ctsynth.prepare import load_datalist, prepare_ctpa, resample_to_shape


def test_resample_to_shape_keeps_the_extent():
    vol = MetaTensor(torch.zeros(1, 40, 30, 20), affine=grid_affine((40, 30, 20), (1.0, 2.0, 3.0)))
    out = resample_to_shape(vol, (20, 15, 10))
    a, b = torch.as_tensor(vol.affine, dtype=torch.float64), torch.as_tensor(out.affine, dtype=torch.float64)
    assert out.shape == (1, 20, 15, 10) and torch.allclose(torch.diag(b)[:3], 2 * torch.diag(a)[:3])
    # the outer faces stay put: first voxel's low face and last voxel's high face
    for i, n_old, n_new in ((0, 40, 20), (1, 30, 15), (2, 20, 10)):
        lo_old = a[i, 3] - 0.5 * a[i, i]
        lo_new = b[i, 3] - 0.5 * b[i, i]
        assert float(lo_new) == pytest.approx(float(lo_old))
        assert float(lo_new + n_new * b[i, i]) == pytest.approx(float(lo_old + n_old * a[i, i]))


def test_prepare_ctpa_from_phantoms_dicom_and_a_bad_study(tmp_path, capsys):
    main(["prepare", "phantom-ctpa", "--out", str(tmp_path / "src"), "--n", "4", "--shape", "32", "32", "24",
          "--spacing", "8.0", "--emboli", "0.5"])
    made = json.loads(capsys.readouterr().out)
    studies = tmp_path / "src" / "studies"
    vol, _ = thorax_phantom((32, 32, 24), 8.0, seed=77, contrast=True)
    save_dicom_series(vol, studies / "dicom_case")
    (studies / "broken").mkdir()
    (studies / "broken" / "x.dcm").write_bytes(b"not dicom")
    xrays = tmp_path / "xr"
    xrays.mkdir()
    Image.fromarray((np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 20)).save(xrays / "ctpa_001.png")

    main(["prepare", "ctpa", "--studies", str(studies), "--out", str(tmp_path / "data"), "--labels", made["labels"],
          "--xrays", str(xrays), "--shape", "16", "16", "12", "--xray-size", "32"])
    report = json.loads(capsys.readouterr().out)
    assert report["prepared"] == 5 and [s["source"].endswith("broken") for s in report["skipped"]] == [True]
    assert report["labelled"] == 4 and report["xrays"] == {"paired": 1, "drr": 4}
    data = json.loads((tmp_path / "data" / "datalist.json").read_text())
    entries = data["training"] + data["validation"] + data["test"]
    assert sorted(e["id"] for e in entries) == ["ctpa_000", "ctpa_001", "ctpa_002", "ctpa_003", "dicom_case"]
    assert data["meta"]["stratified_by"] == "label" and data["meta"]["window_hu"] == [-1024.0, 3071.0]
    for e in entries:
        img = load_volume(tmp_path / "data" / e["image"])
        assert img.shape == (1, 16, 16, 12) and float(img.min()) >= -1024 and float(img.max()) <= 3071
        xray, _ = load_projection(tmp_path / "data" / e["xray"])
        assert xray.shape == ((40, 50) if e["id"] == "ctpa_001" else (32, 32))
    dicom = next(e for e in entries if e["id"] == "dicom_case")
    assert dicom["native_spacing_mm"] == pytest.approx([8.0, 8.0, 8.0]) and "label" not in dicom
    # the X-ray path is resolved (its source tag is not a path); require= keeps the labelled cases
    split = next(k for k in ("training", "validation", "test") if any(e["id"] == "dicom_case" for e in data[k]))
    loaded = load_datalist(tmp_path / "data" / "datalist.json", split)
    assert all(Path(e["xray"]).is_absolute() and e["xray_source"] in ("paired", "drr") for e in loaded)
    labelled = load_datalist(tmp_path / "data" / "datalist.json", split, require=["label"])
    assert [e["id"] for e in labelled] == [e["id"] for e in loaded if e["id"] != "dicom_case"]
    # deterministic: the same call gives the same split
    again = prepare_ctpa(studies, tmp_path / "data2", shape=(16, 16, 12), labels=made["labels"], xray_size=32)
    data2 = json.loads((tmp_path / "data2" / "datalist.json").read_text())
    assert again["splits"] == report["splits"]
    assert {k: [e["id"] for e in data2[k]] for k in ("training", "validation", "test")} == \
        {k: [e["id"] for e in data[k]] for k in ("training", "validation", "test")}


def test_prepare_ctpa_errors(tmp_path):
    (tmp_path / "studies").mkdir()
    with pytest.raises(FileNotFoundError, match="no patient folders"):
        prepare_ctpa(tmp_path / "studies", tmp_path / "out")
    vol, _ = thorax_phantom((16, 16, 8), 10.0, seed=1)
    save_nifti(vol, tmp_path / "studies" / "a.nii.gz")
    (tmp_path / "labels.csv").write_text("id,label\na,yes\n")
    with pytest.raises(ValueError, match="use 0 \\(no PE\\) or 1 \\(PE\\)"):
        prepare_ctpa(tmp_path / "studies", tmp_path / "out", labels=tmp_path / "labels.csv")
    save_nifti(vol, tmp_path / "studies" / "b.nii.gz")
    prepare_ctpa(tmp_path / "studies", tmp_path / "unlabelled", shape=(8, 8, 4), xray_size=8, fractions=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="has \\['label'\\].*--labels"):
        load_datalist(tmp_path / "unlabelled" / "datalist.json", "training", require=["label"])
    (tmp_path / "bad.csv").write_text("patient,pe\na,1\n")
    with pytest.raises(ValueError, match="columns 'id' and 'label'"):
        prepare_ctpa(tmp_path / "studies", tmp_path / "out", labels=tmp_path / "bad.csv")
