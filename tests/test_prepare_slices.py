"""ctsynth prepare slice-interp: thick/thin pairing by computed spacing, alignment, stratified split, report."""

import json
import shutil
import zipfile

import pytest
import torch
from monai.data import MetaTensor

from conftest import refused

from ctsynth.cli import main
from ctsynth.io import load_volume, save_dicom_series
from ctsynth.phantoms import slab_average, thorax_phantom
from ctsynth.prepare import align_thick_thin, pick_thick_thin, resample_to_grid, slice_spacing_mm


def _thin(seed=0, slices=50):
    vol, _ = thorax_phantom((32, 32, slices), (8.0, 8.0, 1.0), seed=seed)
    return vol


def _crop_z(vol, a, b):
    out = MetaTensor(vol.as_tensor()[..., a:b], affine=torch.as_tensor(vol.affine).clone())
    out.affine[:3, 3] = vol.affine[:3, 3] + a * vol.affine[:3, 2]
    return out


def _z0(v):
    return float(v.affine[2, 3])


def test_pick_by_computed_spacing_not_order():
    thin = _thin()
    thick = slab_average(thin, 5)
    assert slice_spacing_mm(thick) == pytest.approx(5.0)
    t, n = pick_thick_thin([("a", thin), ("b", thick)])
    assert slice_spacing_mm(t) == pytest.approx(5.0) and slice_spacing_mm(n) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no series is at least 1.5x thicker"):
        pick_thick_thin([("a", thin), ("b", thin)])
    with pytest.raises(ValueError, match="needs two CT series"):
        pick_thick_thin([("a", thin)])


def test_alignment_crops_shifted_series_to_their_overlap():
    thin = _thin()
    thick = slab_average(thin, 5)  # 10 slices centred on thin slices 2, 7, ..., 47
    shifted_thin = _crop_z(thin, 9, 50)  # the thin series starts 9 mm later
    t, n = align_thick_thin(thick, shifted_thin)
    assert _z0(t) == pytest.approx(_z0(n), abs=1e-4)  # both start at the first shared thick centre
    assert n.shape[3] == (t.shape[3] - 1) * 5 + 1 and t.shape[3] == 8  # thick slices 12 .. 47
    # the thick slices still are the slab means of the thin slices around them
    assert torch.allclose(t.as_tensor()[..., 0], thin.as_tensor()[..., 10:15].mean(-1), atol=1e-3)
    with pytest.raises(ValueError, match="overlap by fewer than 2"):
        align_thick_thin(thick, _crop_z(thin, 45, 50))


def test_alignment_resamples_a_different_in_plane_grid():
    thin = _thin()
    thick = slab_average(thin, 5)
    aff = torch.as_tensor(thick.affine, dtype=torch.float64).clone()
    aff[0, 0] = aff[1, 1] = 10.0
    coarse = resample_to_grid(thick, aff, (26, 26, thick.shape[3]))
    t, n = align_thick_thin(coarse, thin)
    assert t.shape[1:3] == n.shape[1:3] == (32, 32)
    assert torch.allclose(torch.as_tensor(t.affine)[:3, :2], torch.as_tensor(n.affine)[:3, :2])


def _study(root, category, name, seed, zip_it=False, shift=0, only_thin=False):
    thin = _thin(seed)
    thick = slab_average(thin, 5)
    d = root / category / name
    save_dicom_series(_crop_z(thin, shift, 50), d / "series_thin", series_description="thin 1mm")
    if not only_thin:
        save_dicom_series(thick, d / "series_a", series_description="Series 3")  # the name says nothing
    if zip_it:
        with zipfile.ZipFile(root / category / f"{name}.zip", "w") as z:
            for f in sorted(d.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(d))
        shutil.rmtree(d)


def test_prepare_slice_interp_cli(tmp_path, capsys):
    studies = tmp_path / "studies"
    for i in range(3):
        _study(studies, "APE", f"pe{i}", seed=i, zip_it=(i == 0), shift=3 * i)
        _study(studies, "non-APE", f"ctrl{i}", seed=10 + i)
    _study(studies, "non-APE", "only_thin", seed=20, only_thin=True)
    capsys.readouterr()
    main(["prepare", "slice-interp", "--studies", str(studies), "--out", str(tmp_path / "data")])
    report = json.loads(capsys.readouterr().out)
    assert report["prepared"] == 6 and report["per_category"] == {"APE": 3, "non-APE": 3}
    assert report["skipped"][0]["source"].endswith("only_thin") and "two CT series" in report["skipped"][0]["reason"]
    dl = json.loads((tmp_path / "data" / "datalist.json").read_text())
    for split in ("training", "validation", "test"):  # stratified: every split has both categories
        assert sorted(e["category"] for e in dl[split]) == ["APE", "non-APE"]
    e = next(x for x in dl["training"] + dl["validation"] + dl["test"] if x["id"] == "APE/pe0")
    thick = load_volume(tmp_path / "data" / e["thick"])
    thin = load_volume(tmp_path / "data" / e["thin"])
    assert e["thick_spacing_mm"] == pytest.approx(5.0, abs=1e-3) and e["thin_spacing_mm"] == pytest.approx(1.0, abs=1e-3)
    assert thin.shape[3] == (thick.shape[3] - 1) * 5 + 1
    refused(capsys, ["prepare", "slice-interp", "--studies", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "category folders")


def test_phantom_pairs_follow_the_prepared_layout(tmp_path, capsys):
    from ctsynth.cli import main

    main(["prepare", "phantom-pairs", "--out", str(tmp_path / "d"), "--n", "4", "--shape", "16", "16", "30",
          "--spacing", "2.0"])
    assert json.loads(capsys.readouterr().out)["prepared"] == 4
    data = json.loads((tmp_path / "d" / "datalist.json").read_text())
    assert data["meta"]["categories"] == ["contrast", "non-contrast"] and data["meta"]["slab_factor"] == 5
    for e in data["training"] + data["validation"] + data["test"]:
        thick, thin = load_volume(tmp_path / "d" / e["thick"]), load_volume(tmp_path / "d" / e["thin"])
        assert e["thick_spacing_mm"] == pytest.approx(10.0) and e["thin_spacing_mm"] == pytest.approx(2.0)
        # the thin series is cropped to the thick slice centres: first and last slices coincide in z
        assert float(thin.affine[2, 3]) == pytest.approx(float(thick.affine[2, 3]))
        assert thin.shape[3] == (thick.shape[3] - 1) * 5 + 1
