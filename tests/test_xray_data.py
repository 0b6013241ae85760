"""Radiograph and geometry transforms, datalists, table removal and the back-projection baseline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from ctsynth.drr import DRRProjector, backprojection_reconstruction, hu_to_mu, mu_to_hu
from ctsynth.geometry import ProjectionGeometry, cube_affine
from ctsynth.io import VolumeReadError, save_projection_nifti
from ctsynth.phantoms import thorax_phantom
from ctsynth.prepare import load_datalist, remove_table
from ctsynth.transforms import (LoadGeometryd, LoadRadiographsd, NormalizeRadiograph, NormalizeRadiographd,
                                geometries_from_batch, normalize_radiograph)

GEOM = dict(angles_deg=[0.0, 90.0], sid_mm=1000.0, sdd_mm=1200.0, detector_shape=(24, 32), pixel_spacing_mm=12.0,
            isocenter_mm=[1.0, 2.0, 3.0])


def test_normalize_radiograph_maps_quantiles_and_is_affine_invariant():
    x = torch.rand(2, 40, 50) * 7
    y = normalize_radiograph(x)
    assert torch.allclose(torch.quantile(y.flatten(1), 0.995, dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(torch.quantile(y.flatten(1), 0.005, dim=1), torch.zeros(2), atol=1e-5)
    # a display image (linear window of the line integrals, 16-bit) normalises to the same picture
    assert torch.allclose(normalize_radiograph(x * 9000 + 300), y, atol=1e-4)
    with pytest.raises(ValueError, match="quantiles"):
        NormalizeRadiograph((0.9, 0.1))


def test_radiograph_and_geometry_loading_batches(tmp_path):
    g = ProjectionGeometry(**GEOM)
    g.save_json(tmp_path / "g.json")
    items = []
    for i in range(3):
        paths = []
        for v in range(2):
            img = torch.rand(24, 32) + i
            paths.append(str(save_projection_nifti(img, tmp_path / f"x{i}_{v}.nii.gz", [12.0, 12.0])))
        items.append({"xrays": paths, "geometry": str(tmp_path / "g.json")})
    t = Compose([LoadRadiographsd("xrays"), NormalizeRadiographd("xrays"), LoadGeometryd("geometry")])
    batch = next(iter(DataLoader(Dataset(items, t), batch_size=3)))
    assert batch["xrays"].shape == (3, 2, 24, 32)
    geoms = geometries_from_batch(batch["geometry"])
    assert len(geoms) == 3 and geoms[0] == g and geoms[0].detector_shape == (24, 32)


def test_radiograph_loading_errors(tmp_path):
    save_projection_nifti(torch.rand(24, 32), tmp_path / "a.nii.gz", [1.0, 1.0])
    save_projection_nifti(torch.rand(20, 32), tmp_path / "b.nii.gz", [1.0, 1.0])
    t = LoadRadiographsd("x")
    with pytest.raises(VolumeReadError, match="b.nii.gz.*a.nii.gz"):
        t({"x": [str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]})
    with pytest.raises(VolumeReadError, match="geometry expects 10x10"):
        LoadRadiographsd("x", expected_shape=(10, 10))({"x": [str(tmp_path / "a.nii.gz")]})
    (tmp_path / "g.json").write_text(json.dumps({"kind": "cone"}))
    with pytest.raises(ValueError, match="missing fields"):
        LoadGeometryd("g")({"g": str(tmp_path / "g.json")})


def test_load_datalist_resolves_paths_and_reports_problems(tmp_path, monkeypatch):
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "a.nii.gz").write_bytes(b"x")
    dl = {"training": [{"id": "a", "image_16": "cases/a.nii.gz", "xrays": ["cases/a.nii.gz"], "fov_mm": 3.0}],
          "validation": [], "test": [{"id": "b", "image_16": "cases/missing.nii.gz"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    entries = load_datalist(tmp_path / "datalist.json", "training")
    assert entries[0]["image_16"] == str(tmp_path / "cases" / "a.nii.gz") and entries[0]["fov_mm"] == 3.0
    # a relative datalist path still gives absolute paths (callers join and cache them: `--out demo_out` broke)
    monkeypatch.chdir(tmp_path.parent)
    entries = load_datalist(Path(tmp_path.name) / "datalist.json", "training")
    assert entries[0]["image_16"] == str((tmp_path / "cases" / "a.nii.gz").resolve())
    assert Path(entries[0]["image_16"]).is_absolute()
    with pytest.raises(ValueError, match="'validation' is empty"):
        load_datalist(tmp_path / "datalist.json", "validation")
    with pytest.raises(FileNotFoundError, match="case 'b' lists .*missing.nii.gz"):
        load_datalist(tmp_path / "datalist.json", "test")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_datalist(tmp_path / "datalist.json", "train")
    with pytest.raises(FileNotFoundError, match="ctsynth prepare"):
        load_datalist(tmp_path / "nope.json")


def test_remove_table_keeps_the_body_and_blanks_the_table():
    vol, _ = thorax_phantom((64, 64, 32), 8.0, seed=3)  # body spans y = 14..48 voxels
    with_table = vol.clone()
    with_table[0, 6:58, 2:5, :] = 300.0  # a table slab below the patient (posterior, y small), apart from the body
    cleaned = remove_table(with_table)
    assert float(cleaned[0, 6:58, 2:5, :].max()) == -1000.0
    body = vol[0] > -500
    assert torch.equal(cleaned[0][body], vol[0][body])  # the body, lungs included, is untouched
    assert torch.allclose(cleaned.affine, vol.affine)
    with pytest.raises(ValueError, match="nothing looks like a body"):
        remove_table(torch.full_like(vol, -1000.0))


@pytest.mark.parametrize("hu", [[-1000.0, -800.0, -100.0, 0.0, 40.0, 700.0, 1500.0]])
def test_mu_to_hu_inverts_hu_to_mu(hu):
    h = torch.tensor(hu)
    assert torch.allclose(mu_to_hu(hu_to_mu(h)), h, atol=1e-3)


def test_backprojection_of_a_uniform_box_is_uniform():
    """Water filling the whole box: every ray's mean attenuation is water's, so the smear is 0 HU inside."""
    n, fov = 24, 240.0
    aff = cube_affine(n, fov, [0.0, 0.0, 0.0])
    geom = ProjectionGeometry(angles_deg=[0.0, 90.0], sid_mm=1000.0, sdd_mm=1200.0, detector_shape=(64, 64),
                              pixel_spacing_mm=fov * 1.3 * 1.2 / 64, isocenter_mm=[0.0, 0.0, 0.0])
    water = torch.zeros(1, 1, n, n, n)
    li = DRRProjector(geom)(water, aff)[0]
    rec = backprojection_reconstruction(li, geom, aff, (n, n, n))
    assert rec.shape == (1, n, n, n)
    inner = rec[0, 3:-3, 3:-3, 3:-3]
    assert float(inner.abs().max()) < 30.0
    with pytest.raises(ValueError, match="line integrals"):
        backprojection_reconstruction(li[:1], geom, aff, (n, n, n))


def test_cube_affine_centres_the_grid():
    aff = cube_affine(4, 40.0, [10.0, 0.0, -5.0])
    centre = aff[:3, :3] @ torch.full((3,), 1.5, dtype=torch.float64) + aff[:3, 3]
    assert torch.allclose(centre, torch.tensor([10.0, 0.0, -5.0], dtype=torch.float64))
    assert np.isclose(float(aff[0, 0]), 10.0)
