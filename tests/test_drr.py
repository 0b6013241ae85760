import pytest
import torch

from conftest import voxelised_ellipsoid
from ctsynth.drr import (DRRProjector, display_image, hu_to_mu, line_integral_to_intensity, mu_water)
from ctsynth.geometry import ProjectionGeometry


def analytic_chords(g: ProjectionGeometry, radii, mu: float) -> torch.Tensor:
    """Exact mu * chord length of every ray through an ellipsoid centred on the origin."""
    o, d = g.rays()
    r = torch.tensor(radii, dtype=torch.float64)
    os_, ds = o / r, d / r
    a = (ds * ds).sum(-1)
    b = 2 * (os_ * ds).sum(-1)
    c = (os_ * os_).sum(-1) - 1
    disc = (b * b - 4 * a * c).clamp_min(0)
    dt = disc.sqrt() / a
    return dt * d.norm(dim=-1) * mu, disc / (b * b).clamp_min(1e-12)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("radii", [(40.0, 40.0, 40.0), (45.0, 30.0, 36.0)], ids=["sphere", "ellipsoid"])
@pytest.mark.parametrize("backend", ["joseph", "raymarch"])
def test_line_integral_matches_analytic_chord(kind, radii, backend):
    occ, aff = voxelised_ellipsoid(100, 1.0, radii, supersample=4)
    mu = mu_water(70.0)
    g = ProjectionGeometry.for_volume(aff, occ.shape, views="ap,lateral,30", detector_shape=(100, 100),
                                      pixel_spacing_mm=1.6, sid_mm=800, sdd_mm=1000, kind=kind)
    li = DRRProjector(g, backend=backend, input_kind="mu")(occ[None, None] * mu, aff)[0].double()
    chord, _ = analytic_chords(g, radii, mu)
    # inner 90% of the shadow: rays whose chord is at least that at 0.9 of the radius (sqrt(1-0.81))
    inner = chord >= chord.amax(dim=(-1, -2), keepdim=True) * (1 - 0.9**2) ** 0.5
    rel = ((li - chord).abs() / chord)[inner]
    assert inner.sum() > 500
    assert rel.max() < 0.01


def test_magnification_of_an_off_axis_bead_matches_geometry():
    n, sp = 64, 1.0
    occ, aff = voxelised_ellipsoid(n, sp, (3.0, 3.0, 3.0), center=(15.0, 20.0, -10.0))
    g = ProjectionGeometry.for_volume(aff, occ.shape, views="ap", detector_shape=(128, 128), pixel_spacing_mm=1.0,
                                      sid_mm=300, sdd_mm=600)
    li = DRRProjector(g, input_kind="mu")(occ[None, None], aff)[0, 0].double()
    rows, cols = torch.meshgrid(torch.arange(128.0, dtype=torch.float64), torch.arange(128.0, dtype=torch.float64),
                                indexing="ij")
    centroid = torch.stack([(li * rows).sum() / li.sum(), (li * cols).sum() / li.sum()])
    expected = g.project_points(torch.tensor([[15.0, 20.0, -10.0]]) + g.isocenter_mm.double())[0, 0]
    assert torch.allclose(centroid, expected, atol=0.05)
    # the bead is 20 mm towards the source: magnification 600 / 280
    assert (expected[1] - 63.5).item() == pytest.approx(15.0 * 600 / 280 / 1.0, rel=1e-9)


def test_backends_agree_on_a_phantom():
    from ctsynth.phantoms import thorax_phantom

    vol, _ = thorax_phantom((48, 48, 40), 5.0, seed=2)
    g = ProjectionGeometry.for_volume(vol.affine, vol.shape[1:], views="ap,lateral", detector_shape=(48, 48),
                                      pixel_spacing_mm=6.0)
    a = DRRProjector(g, backend="joseph")(vol[None], vol.affine)
    b = DRRProjector(g, backend="raymarch", samples_per_voxel=4)(vol[None], vol.affine)
    assert (a - b).abs().max() / a.max() < 0.02


def test_differentiable_gradcheck():
    torch.manual_seed(0)
    aff = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    g = ProjectionGeometry.for_volume(aff, (5, 6, 4), views="ap,lateral", detector_shape=(4, 5), pixel_spacing_mm=3.0,
                                      sid_mm=50, sdd_mm=80)
    for backend in ("joseph", "raymarch"):
        proj = DRRProjector(g, backend=backend, input_kind="mu")
        x = torch.rand(1, 1, 5, 6, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: proj(v, aff), (x,), eps=1e-6, atol=1e-5)
    hu = (torch.rand(1, 1, 5, 6, 4, dtype=torch.float64) * 1800 - 900).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: DRRProjector(g)(v, aff), (hu,), eps=1e-3, atol=1e-6)


def test_batch_with_per_sample_geometry():
    occ, aff = voxelised_ellipsoid(32, 2.0, (20.0, 20.0, 20.0))
    g1 = ProjectionGeometry.for_volume(aff, occ.shape, views="ap,lateral", detector_shape=(40, 40), pixel_spacing_mm=2)
    g2 = ProjectionGeometry.for_volume(aff, occ.shape, views="pa,45", detector_shape=(40, 40), pixel_spacing_mm=2)
    vol = torch.stack([occ, occ * 2])[:, None]
    out = DRRProjector(input_kind="mu")(vol, aff, [g1, g2])
    assert out.shape == (2, 2, 40, 40)
    single = DRRProjector(g2, input_kind="mu")(occ[None, None] * 2, aff)
    assert torch.allclose(out[1:], single)


def test_hu_to_mu_pinned():
    hu = torch.tensor([-2000.0, -1000.0, -800.0, 0.0, 1000.0])
    mu = hu_to_mu(hu, 70.0)
    w = mu_water(70.0)
    assert w == pytest.approx(0.019369, rel=1e-4)  # NIST water, log-log between 60 and 80 keV
    assert mu[0].item() == pytest.approx(0.0, abs=1e-9) and mu[1].item() == pytest.approx(0.0, abs=1e-9)
    assert mu[2].item() == pytest.approx(0.2 * w)  # lung stays distinct from air
    assert mu[3].item() == pytest.approx(w)
    assert mu[4].item() == pytest.approx(2 * w, rel=1e-6)  # same energy: the HU definition
    # a softer beam raises bone contrast more than water's
    lo = hu_to_mu(torch.tensor([0.0, 1000.0]), energy_kev=40.0, ct_energy_kev=70.0)
    assert lo[1] / lo[0] > 2.0


def test_intensity_and_display():
    li = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert torch.allclose(line_integral_to_intensity(li, i0=2.0), 2.0 * torch.exp(-li))
    g = torch.Generator().manual_seed(0)
    noisy = line_integral_to_intensity(li.expand(64, 2, 2), poisson=True, photons=1e4, generator=g)
    assert (noisy.mean(0) - torch.exp(-li)).abs().max() < 0.01
    img = display_image(li, window=(0.0, 3.0))
    assert torch.allclose(img, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: p(torch.zeros(1, 2, 4, 4, 4), torch.eye(4)), "B, 1, S0"),
        (lambda p: p(torch.zeros(1, 1, 4, 4, 4)), "no affine"),
        (lambda p: p(torch.zeros(2, 1, 4, 4, 4), torch.eye(4), [ProjectionGeometry()]), "2 geometries|1 geometries"),
    ],
)
def test_projector_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(DRRProjector(ProjectionGeometry()))


def test_projector_option_errors():
    with pytest.raises(ValueError, match="backend"):
        DRRProjector(backend="siddon")
    with pytest.raises(ValueError, match="energy"):
        DRRProjector(energy_kev=500)
