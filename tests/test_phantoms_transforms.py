import pytest
import torch

from ctsynth.phantoms import TISSUE_HU, grid_affine, slab_average, thorax_phantom
from ctsynth.transforms import RenderDRRd, ScaleHU, ScaleHUd, SlabAveraged, scale_hu, unscale_hu
from ctsynth.geometry import ProjectionGeometry


def test_phantom_is_deterministic_and_anatomical():
    a, info = thorax_phantom((48, 48, 40), 6.0, seed=5)
    b, _ = thorax_phantom((48, 48, 40), 6.0, seed=5)
    c, _ = thorax_phantom((48, 48, 40), 6.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 48, 48, 40) and a.dtype == torch.float32
    assert torch.allclose(a.affine, grid_affine((48, 48, 40), 6.0))
    vals = a.flatten()
    frac = lambda lo, hi: float(((vals >= lo) & (vals < hi)).float().mean())  # noqa: E731
    assert frac(-1001, -990) > 0.05  # air outside the body
    assert frac(-900, -780) > 0.05  # lungs, distinct from air
    assert frac(-150, 100) > 0.1  # soft tissue
    assert frac(200, 2000) > 0.002  # bone
    assert float(a.max()) < 1200 and float(a.min()) >= -1000.01


def test_contrast_and_emboli():
    plain, _ = thorax_phantom((64, 64, 48), 5.0, seed=1)
    ctpa, info = thorax_phantom((64, 64, 48), 5.0, seed=1, contrast=True, emboli=1.0)
    assert info.contrast and info.emboli >= 1
    assert float((ctpa > 250).float().sum()) > float((plain > 250).float().sum()) + 50
    _, none = thorax_phantom((32, 32, 32), 8.0, seed=1, contrast=True, emboli=0.0)
    assert none.emboli == 0
    with pytest.raises(ValueError, match="probability"):
        thorax_phantom((32, 32, 32), 8.0, emboli=2.0)


def _filling_defect_voxels(seed, sites):
    """Voxels the emboli darken by more than 100 HU (the same patient with and without them), 64^3 at 5 mm."""
    with_pe, info = thorax_phantom((64, 64, 64), 5.0, seed=seed, contrast=True, emboli=1.0, emboli_sites=sites)
    without, _ = thorax_phantom((64, 64, 64), 5.0, seed=seed, contrast=True, emboli=0.0, emboli_sites=sites)
    defect = (without.as_tensor() - with_pe.as_tensor()) > 100
    return info.emboli, int(defect.sum()), defect


@pytest.mark.parametrize("seed, lobar, central", [(0, 5, 28), (1, 3, 26), (2, 7, 14), (4, 5, 9)])
def test_central_emboli_are_visible_filling_defects_at_5mm(seed, lobar, central):
    """Pinned counts: central emboli (one in a main pulmonary artery) darken more contrast-filled voxels than the
    default lobar ones."""
    n_lobar, v_lobar, _ = _filling_defect_voxels(seed, "lobar")
    n_central, v_central, defect = _filling_defect_voxels(seed, "central")
    assert (v_lobar, v_central) == (lobar, central) and n_lobar == n_central >= 1
    x = defect.nonzero()[:, 1].float()  # a main artery runs beside the mediastinum: defect voxels near the midline
    assert float((x - 31.5).abs().min()) < 8
    with pytest.raises(ValueError, match="emboli_sites must be one of"):
        thorax_phantom((32, 32, 32), 8.0, emboli_sites="peripheral")


def test_noise_and_partial_volume():
    clean, _ = thorax_phantom((40, 40, 32), 6.0, seed=0)
    noisy, _ = thorax_phantom((40, 40, 32), 6.0, seed=0, noise_hu=20.0)
    assert float((noisy - clean).std()) == pytest.approx(20.0, rel=0.05)
    # anti-aliased edges: intermediate values exist between lung and soft tissue
    mid = ((clean > -700) & (clean < -200)).float().mean()
    assert float(mid) > 0.002


def test_fine_detail_keeps_the_large_anatomy_and_adds_isotropic_structure():
    base, _ = thorax_phantom((48, 48, 48), 4.0, seed=3)
    fine, _ = thorax_phantom((48, 48, 48), 4.0, seed=3, detail=1.0)
    again, _ = thorax_phantom((48, 48, 48), 4.0, seed=3, detail=1.0)
    assert torch.equal(fine, again)
    lung = (base > -900) & (base < -800)  # lung parenchyma of the plain phantom
    # more vessels in the lungs; outside them only the ~20 HU texture differs; air stays air
    assert float((fine[lung] > -500).float().mean()) > float((base[lung] > -500).float().mean()) + 0.01
    soft = (base > -50) & (base < 100)
    assert float((fine - base)[soft].std()) == pytest.approx(20.0, rel=0.35)
    assert torch.equal(fine[base < -999], base[base < -999])

    def step_energy(v, axis):
        return float(v[0].diff(dim=axis).pow(2).mean())

    # fine detail has no preferred direction: it raises the through-plane (z) step energy relative to in-plane
    ratio = lambda v: step_energy(v, 2) / step_energy(v, 0)  # noqa: E731
    assert ratio(fine) > ratio(base)
    with pytest.raises(ValueError, match="detail must be >= 0"):
        thorax_phantom((32, 32, 32), 8.0, detail=-1.0)


def test_slab_average_positions_and_values():
    vol, _ = thorax_phantom((16, 16, 20), (1.0, 1.0, 1.0), seed=0)
    thick = slab_average(vol, 5)
    assert thick.shape == (1, 16, 16, 4)
    assert torch.allclose(thick[..., 1], vol[..., 5:10].mean(-1))
    # thick slice j sits at the mean position of its thin slices
    thin_z = (vol.affine @ torch.tensor([0.0, 0, 7, 1], dtype=torch.float64))[2]
    thick_z = (thick.affine @ torch.tensor([0.0, 0, 1, 1], dtype=torch.float64))[2]
    assert float(thick_z) == pytest.approx(float(thin_z))
    assert float(thick.affine[2, 2]) == 5.0
    overlapping = slab_average(vol, 5, stride=2)
    assert overlapping.shape[-1] == 8 and float(overlapping.affine[2, 2]) == 2.0
    with pytest.raises(ValueError, match="cannot average"):
        slab_average(vol, 30)


def test_scale_hu_round_trip_and_dict():
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    assert scale_hu(hu).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert torch.allclose(unscale_hu(scale_hu(hu, clip=False)), hu)
    t = ScaleHU((-1000, 3000))
    assert torch.allclose(t.inverse(t(hu)), hu.clamp(-1000, 3000))
    d = ScaleHUd(["a"])({"a": hu, "b": hu})
    assert d["a"].tolist() == scale_hu(hu).tolist() and d["b"] is hu
    with pytest.raises(ValueError, match="window"):
        ScaleHU((10, 0))


def test_dict_transforms_render_and_slab():
    vol, _ = thorax_phantom((24, 24, 20), 8.0, seed=0)
    g = ProjectionGeometry.for_volume(vol.affine, vol.shape[1:], detector_shape=(16, 16), pixel_spacing_mm=16)
    d = RenderDRRd("ct", "xray", g)({"ct": vol})
    assert d["xray"].shape == (2, 16, 16) and float(d["xray"].max()) > 1.0
    d = SlabAveraged("ct", "thick", factor=4)(d)
    assert d["thick"].shape == (1, 24, 24, 5)
    assert set(TISSUE_HU) >= {"lung", "cortical_bone", "iodine_artery"}


def test_realism_adds_ct_noise_texture_and_partial_volume_to_the_same_anatomy():
    import numpy as np

    from ctsynth.phantoms import scanner_appearance

    plain, _ = thorax_phantom((48, 48, 40), 3.0, seed=5, keep_proportions=True)
    real, _ = thorax_phantom((48, 48, 40), 3.0, seed=5, keep_proportions=True, realism=1.0)
    again, _ = thorax_phantom((48, 48, 40), 3.0, seed=5, keep_proportions=True, realism=1.0)
    assert torch.equal(real, again)  # deterministic
    diff = (real - plain).as_tensor()
    assert 15.0 < float(diff.std()) < 80.0 and abs(float(diff.mean())) < 5.0  # the anatomy itself is unchanged

    rng = np.random.default_rng(0)
    air = scanner_appearance(np.full((64, 64, 16), -1000.0, np.float32), 1.0, rng) + 1000.0  # noise alone
    assert float(air.std()) == pytest.approx(20.0, rel=1e-3)
    power = (np.abs(np.fft.fft2(air, axes=(0, 1))) ** 2).mean(-1)
    f = np.sqrt(np.fft.fftfreq(64)[:, None] ** 2 + np.fft.fftfreq(64)[None, :] ** 2)
    low, mid, high = (float(power[(f > a) & (f < b)].mean()) for a, b in ((0.0, 0.05), (0.15, 0.25), (0.45, 0.71)))
    assert low < 0.2 * mid and high < 0.2 * mid  # CT's noise power: a ramp rolled off by the kernel
    z_corr = float(np.corrcoef(air[..., :-1].ravel(), air[..., 1:].ravel())[0, 1])
    assert 0.1 < z_corr < 0.9  # neighbouring slices share some noise

    edge = np.full((16, 16, 16), -1000.0, np.float32)
    edge[8:] = 40.0
    smooth = scanner_appearance(edge, 1.0, np.random.default_rng(1)) - scanner_appearance(
        np.full_like(edge, -1000.0), 1.0, np.random.default_rng(1)) - 1000.0  # the same noise removed
    assert -1000.0 < float(smooth[7].mean()) < -500.0 and -500.0 < float(smooth[8].mean()) < 40.0  # partial volume
    with pytest.raises(ValueError, match="realism must be in"):
        thorax_phantom((16, 16, 16), 3.0, realism=-1)
