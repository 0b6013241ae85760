import json

import pytest
import torch

from ctsynth.geometry import NAMED_VIEWS, ProjectionGeometry, parse_views, volume_center


@pytest.mark.parametrize(
    "views, expected",
    [
        ("ap,lateral", [0.0, 90.0]),
        ("pa", [180.0]),
        (["ap", 45], [0.0, 45.0]),
        (4, [0.0, 45.0, 90.0, 135.0]),
        (2, [0.0, 90.0]),
        ("30, 60", [30.0, 60.0]),
    ],
)
def test_parse_views(views, expected):
    assert parse_views(views) == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["oblique", 0, [], "ap,,"])
def test_parse_views_errors(bad):
    with pytest.raises(ValueError):
        parse_views(bad)


def test_named_views_directions():
    g = ProjectionGeometry(angles_deg=[NAMED_VIEWS["ap"], NAMED_VIEWS["lateral"], NAMED_VIEWS["pa"]])
    src = g.source_directions
    assert torch.allclose(src[0], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12)  # anterior
    assert torch.allclose(src[1], torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12)  # patient right
    assert torch.allclose(src[2], torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), atol=1e-12)  # posterior
    # detector sits sdd from the source, on the far side
    d = (g.source_positions - g.detector_centers).norm(dim=-1)
    assert torch.allclose(d, torch.full((3,), 1200.0, dtype=torch.float64))


def test_json_round_trip(tmp_path):
    aff = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64))
    g = ProjectionGeometry.for_volume(aff, (100, 100, 50), views=4, detector_shape=(64, 80), pixel_spacing_mm=(1.5, 2.0),
                                      sid_mm=900, sdd_mm=1100)
    path = g.save_json(tmp_path / "g.json")
    g2 = ProjectionGeometry.load_json(path)
    assert g2 == g
    assert g2.to_dict()["isocenter_mm"] == pytest.approx([39.6, 39.6, 49.0])
    assert torch.equal(g2.pixel_positions(), g.pixel_positions())


def test_missing_fields_error(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"kind": "cone", "angles_deg": [0]}))
    with pytest.raises(ValueError, match=r"missing fields \['sid_mm'"):
        ProjectionGeometry.load_json(p)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="fan"), dict(sid_mm=1200, sdd_mm=1000), dict(detector_shape=(0, 10)), dict(pixel_spacing_mm=-1),
     dict(isocenter_mm=(0, 0)), dict(angles_deg=[])],
)
def test_invalid_geometry(kwargs):
    with pytest.raises(ValueError):
        ProjectionGeometry(**kwargs)


def test_cone_magnification_of_points():
    g = ProjectionGeometry(angles_deg=[0.0], sid_mm=1000, sdd_mm=1500, detector_shape=(101, 101), pixel_spacing_mm=1.0)
    # a point 20 mm towards patient left at the isocentre plane lands 20 * 1.5 mm from the centre
    rc = g.project_points(torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 10.0], [20.0, 100.0, 0.0]]))[0]
    assert rc[0].tolist() == pytest.approx([50.0, 50.0 + 30.0])
    assert rc[1].tolist() == pytest.approx([50.0 - 15.0, 50.0])  # superior is up (smaller row)
    # closer to the source (y=+100 for AP): magnification 1500 / 900
    assert rc[2, 1].item() == pytest.approx(50.0 + 20.0 * 1500 / 900)
    assert g.magnification == pytest.approx(1.5)


def test_parallel_projection_has_no_magnification():
    g = ProjectionGeometry(angles_deg=[90.0], kind="parallel", detector_shape=(11, 11), pixel_spacing_mm=2.0)
    rc = g.project_points(torch.tensor([[300.0, 8.0, -4.0]]))[0, 0]
    assert rc.tolist() == pytest.approx([5 + 2.0, 5 + 4.0])
    assert g.magnification == 1.0


def test_volume_center():
    aff = torch.eye(4, dtype=torch.float64)
    aff[:3, 3] = torch.tensor([-10.0, 5.0, 100.0])
    assert volume_center(aff, (11, 21, 3)).tolist() == pytest.approx([-5.0, 15.0, 101.0])


def test_voxel_world_coordinates():
    from ctsynth.geometry import voxel_world_coordinates

    aff = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    aff[:3, 3] = torch.tensor([-1.0, 5.0, 10.0])
    w = voxel_world_coordinates(aff, (3, 4, 5))
    assert w.shape == (3, 4, 5, 3)
    assert w[2, 3, 4].tolist() == pytest.approx([3.0, 14.0, 26.0])
    assert w[0, 0, 0].tolist() == pytest.approx([-1.0, 5.0, 10.0])


def test_backprojection_in_slabs_equals_one_pass():
    from ctsynth.geometry import backproject_features

    torch.manual_seed(0)
    g = ProjectionGeometry(angles_deg=[0.0, 90.0], sid_mm=1000.0, sdd_mm=1200.0, detector_shape=(24, 20),
                           pixel_spacing_mm=8.0, isocenter_mm=[1.0, -2.0, 3.0])
    aff = torch.diag(torch.tensor([6.0, 5.0, 4.0, 1.0], dtype=torch.float64))
    aff[:3, 3] = torch.tensor([-50.0, -40.0, -30.0], dtype=torch.float64)
    feats = torch.rand(1, 2, 3, 24, 20, requires_grad=True)
    one = backproject_features(feats, [g], aff[None], (17, 12, 9), max_voxels=10**9)
    slabs = backproject_features(feats, [g], aff[None], (17, 12, 9), max_voxels=12 * 9 * 4)  # 4 planes a slab
    assert one.shape == (1, 6, 17, 12, 9) and torch.allclose(one, slabs, atol=1e-6)
    (ga,) = torch.autograd.grad(one.sum(), feats)
    (gb,) = torch.autograd.grad(slabs.sum(), feats)
    assert torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_one_bright_detector_pixel_lights_exactly_the_voxels_on_its_ray(kind):
    """Each voxel receives the features of the detector point it projects to: a radiograph whose only non-zero
    pixel is (row 7, column 11) lights the voxels whose projection falls within one pixel of it (bilinear
    sampling), with weight (1 - |dr|)(1 - |dc|), and no other voxel."""
    from ctsynth.geometry import backproject_features, voxel_world_coordinates

    g = ProjectionGeometry(angles_deg=[0.0], sid_mm=1000.0, sdd_mm=1200.0, detector_shape=(16, 20),
                           pixel_spacing_mm=6.0, kind=kind)
    aff = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    aff[:3, 3] = -30.0
    feats = torch.zeros(1, 1, 1, 16, 20, dtype=torch.float64)
    feats[0, 0, 0, 7, 11] = 1.0
    lit = backproject_features(feats, [g], aff[None], (16, 16, 16))[0, 0]  # mean over the one view
    rc = g.project_points(voxel_world_coordinates(aff, (16, 16, 16)).reshape(-1, 3))[0].reshape(16, 16, 16, 2)
    dr, dc = (rc[..., 0] - 7).abs(), (rc[..., 1] - 11).abs()
    expected = ((1 - dr).clamp_min(0) * (1 - dc).clamp_min(0)).to(lit.dtype)
    assert int((expected > 0).sum()) >= 16  # the ray crosses the grid
    assert torch.allclose(lit, expected, atol=1e-6)
    assert float(lit[expected == 0].abs().max()) == 0.0  # nothing off the ray


@pytest.mark.parametrize("extent, size, pixel", [((320.0, 240.0, 300.0), 64, 6.5), ((200.0, 200.0, 400.0), 100, 5.2)])
def test_radiograph_geometry_covers_the_field_of_view(extent, size, pixel):
    """The detector side is 1.3x the larger of the left-right and superior-inferior extents; the isocentre is the
    centre given (default the origin)."""
    from ctsynth.geometry import radiograph_geometry

    g = radiograph_geometry(extent, size)
    assert g.detector_shape == (size, size) and g.angles_deg.tolist() == [0.0]
    assert g.pixel_spacing_mm.tolist() == pytest.approx([pixel, pixel])
    assert g.isocenter_mm.tolist() == [0.0, 0.0, 0.0]
    assert radiograph_geometry(extent, size, center_mm=[1.0, 2.0, 3.0], views="ap,lateral").num_views == 2
    with pytest.raises(ValueError, match="3 positive sizes"):
        radiograph_geometry((10.0, 0.0, 10.0), size)


def test_detector_sampling_grid_maps_the_isocentre_to_the_detector_centre():
    """grid_sample coordinates: the isocentre lands at (0, 0); a voxel to the patient's left moves to +x (columns),
    one superior to -y (row 0 is superior); off-detector voxels fall outside [-1, 1]."""
    from ctsynth.geometry import detector_sampling_grid
    from ctsynth.phantoms import grid_affine

    g = ProjectionGeometry(angles_deg=[0.0], detector_shape=(32, 32), pixel_spacing_mm=10.0, kind="parallel")
    grid = detector_sampling_grid(g, grid_affine((3, 3, 3), 100.0), (3, 3, 3))[0]  # voxels at -100, 0, 100 mm
    assert grid.shape == (3, 3, 3, 2) and grid[1, 1, 1].abs().max() < 1e-6
    assert grid[2, 1, 1, 0] > 0 and grid[1, 1, 2, 1] < 0 and grid[1, 1, 1].tolist() == pytest.approx(grid[1, 0, 1].tolist())
    assert grid[2, 1, 1, 0] == pytest.approx(100.0 / 160.0)  # 100 mm of a 320 mm wide detector's half-width 160
    far = detector_sampling_grid(g, grid_affine((3, 3, 3), 300.0), (3, 3, 3))[0]
    assert far[2, 1, 1, 0] > 1
