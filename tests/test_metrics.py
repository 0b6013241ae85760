import json
import math

import pytest
import torch
from skimage.metrics import structural_similarity

from ctsynth.metrics import compute_image_metrics, ms_ssim, ms_ssim_weights, psnr, ssim, ssim_window


@pytest.mark.parametrize("shape", [(1, 1, 40, 36, 32), (1, 1, 48, 40), (2, 1, 24, 24, 24)])
@pytest.mark.parametrize("data_range", [1.0, 2000.0])
def test_ssim_matches_skimage(shape, data_range):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(shape, generator=g, dtype=torch.float64) * data_range
    b = (a + 0.3 * data_range * torch.rand(shape, generator=g, dtype=torch.float64)).clamp(0, data_range)
    ours = ssim(a, b, data_range, spatial_dims=len(shape) - 2)
    for i in range(shape[0]):
        ref = structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=data_range, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False)
        assert abs(float(ours[i]) - ref) < 1e-3


@pytest.mark.parametrize("shape, n", [((64, 64, 64), 3), ((176, 176, 176), 5), ((160, 200, 200), 4), ((11, 30, 30), 1),
                                      ((32, 32, 32), 2)])
def test_ms_ssim_scale_rule(shape, n):
    w = ms_ssim_weights(shape)
    assert len(w) == n
    assert sum(w) == pytest.approx(1.0)


def test_ms_ssim_on_64_cube_and_identity():
    a = torch.rand(1, 1, 64, 64, 64)
    assert float(ms_ssim(a, a, 1.0)) == pytest.approx(1.0, abs=1e-5)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    v = float(ms_ssim(a, b, 1.0))
    assert 0.0 < v < 1.0
    with pytest.raises(ValueError, match="win_size"):
        ms_ssim_weights((8, 64, 64))


def test_psnr_pinned():
    t = torch.zeros(1, 1, 4, 4, 4)
    p = torch.full_like(t, 0.1)
    assert float(psnr(p, t, 1.0)) == pytest.approx(20.0, abs=1e-4)
    assert float(psnr(t, t, 1.0)) == 100.0


def test_compute_image_metrics_window_and_report():
    target = torch.full((20, 20, 20), -1000.0)
    target[5:15, 5:15, 5:15] = 40.0
    pred = target.clone()
    pred[5:15, 5:15, 5:15] = 140.0  # +100 HU in 1000 voxels of 8000
    res = compute_image_metrics(pred, target, window=(-1000, 1000))
    assert res["mae"] == pytest.approx(100.0 * 1000 / 8000, rel=1e-5)
    assert res["psnr"] == pytest.approx(10 * math.log10(2000**2 / (100.0**2 * 1000 / 8000)), rel=1e-5)
    assert res["window"] == [-1000.0, 1000.0] and res["data_range"] == 2000.0 and res["mode"] == "3d"
    # values outside the window are clipped: a narrower window changes PSNR by its range
    narrow = compute_image_metrics(pred, target, window=(-1000, 1500))
    assert narrow["psnr"] == pytest.approx(res["psnr"] + 20 * math.log10(2500 / 2000), rel=1e-5)


def test_per_slice_and_mask():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(16, 16, 8, generator=g) * 2000 - 1000
    p = t + 50 * torch.randn(16, 16, 8, generator=g)
    r3 = compute_image_metrics(p, t)
    rs = compute_image_metrics(p, t, mode="per-slice", slice_axis=-1)
    assert rs["mode"] == "per-slice" and rs["n"] == 1
    assert rs["psnr"] != pytest.approx(r3["psnr"], abs=1e-6)
    mask = torch.zeros(16, 16, 8, dtype=torch.bool)
    mask[4:12, 4:12] = True
    rm = compute_image_metrics(p, t, mask=mask)
    err = (p.clamp(-1000, 1000) - t.clamp(-1000, 1000)).abs()
    assert rm["masked"] and rm["mae"] == pytest.approx(float(err[mask].mean()), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(window=(1, 0)), "window"), (dict(mode="2.5d"), "mode")],
)
def test_metric_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_image_metrics(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), **kwargs)


def test_nan_and_shape_errors():
    with pytest.raises(ValueError, match="NaN"):
        compute_image_metrics(torch.full((8, 8, 8), float("nan")), torch.zeros(8, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        compute_image_metrics(torch.zeros(8, 8, 8), torch.zeros(8, 8, 9))
    with pytest.raises(ValueError, match=">= 3"):
        ssim_window((2, 10, 10))


def _tissue_phantom():
    """A (20, 20, 10) volume: lung at -900 HU with 25 % emphysema at -980 HU, soft tissue 40 HU, bone 800 HU."""
    t = torch.full((20, 20, 10), 40.0, dtype=torch.float64)
    t[:10] = -900.0
    t[:10, :5] = -980.0  # a quarter of the lung below -950 HU
    t[15:] = 800.0
    return t


@pytest.mark.parametrize("shift, expected", [
    ({"lung": 20.0}, {"lung_shift_hu": 20.0, "soft_tissue_shift_hu": 0.0, "bone_shift_hu": 0.0,
                      "laa950_pct": 25.0, "laa950_diff_pct": 0.0}),  # emphysema at -980 + 20 = -960: still below
    ({"lung": 40.0}, {"lung_shift_hu": 40.0, "laa950_pct": 0.0, "laa950_diff_pct": -25.0}),
    ({"lung": -60.0}, {"lung_shift_hu": -60.0, "laa950_pct": 100.0, "laa950_diff_pct": 75.0}),
    ({"soft_tissue": 5.0, "bone": -100.0}, {"lung_shift_hu": 0.0, "soft_tissue_shift_hu": 5.0, "bone_shift_hu": -100.0,
                                            "laa950_pct": 25.0, "laa950_diff_pct": 0.0}),
])
def test_hu_fidelity_recovers_a_known_shift(shift, expected):
    from ctsynth.metrics import HU_REGIONS, hu_fidelity

    t = _tissue_phantom()
    p = t.clone()
    for region, hu in shift.items():
        lo, hi = HU_REGIONS[region]
        p[(t >= lo) & (t < hi)] += hu
    r = hu_fidelity(p[None], t[None])
    for k, v in expected.items():
        assert r[k] == pytest.approx(v), k
    assert r["laa950_target_pct"] == pytest.approx(25.0)
    assert r["lung_voxels"] == 2000 and r["soft_tissue_voxels"] == 1000 and r["bone_voxels"] == 1000
    assert r["regions"]["lung"] == [None, -500.0] and json.dumps(r)  # plain JSON (no Infinity)


def test_hu_fidelity_empty_region_and_summary():
    from ctsynth.metrics import hu_fidelity, summarise_hu_fidelity

    t = torch.full((4, 4, 4), 40.0)
    r = hu_fidelity(t + 3, t)
    assert r["lung_shift_hu"] is None and r["laa950_pct"] is None and r["soft_tissue_shift_hu"] == pytest.approx(3.0)
    s = summarise_hu_fidelity([r, hu_fidelity(t - 1, t)])
    assert s["soft_tissue_shift_hu"] == pytest.approx(1.0) and s["lung_shift_hu"] is None
    with pytest.raises(ValueError, match="differ in size"):
        hu_fidelity(t, t[:2])


@pytest.mark.parametrize("scores, labels, auc, se", [
    # 3 positives, 2 negatives: 5 of the 6 pairs ordered; V10 = (1, 1, 1/2), V01 = (2/3, 1):
    # var = var(V10) / 3 + var(V01) / 2 = (1/12) / 3 + (1/18) / 2 = 1/18
    ([0.9, 0.8, 0.4, 0.7, 0.3], [1, 1, 1, 0, 0], 5 / 6, (1 / 18) ** 0.5),
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75, None),
    ([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1], 0.0, 0.0),
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5, 0.0),  # ties count one half
])
def test_roc_auc_ci_on_constructed_cases(scores, labels, auc, se):
    from ctsynth.metrics import roc_auc_ci

    r = roc_auc_ci(scores, labels)
    assert r["auc"] == pytest.approx(auc) and r["n"] == len(labels) and r["positives"] == sum(labels)
    if se is not None:
        assert r["se"] == pytest.approx(se)
    assert r["ci_low"] == pytest.approx(max(0.0, r["auc"] - 1.959964 * r["se"]), abs=1e-6)
    assert r["ci_high"] == pytest.approx(min(1.0, r["auc"] + 1.959964 * r["se"]), abs=1e-6)


def test_roc_auc_ci_matches_the_pairwise_definition_and_monai():
    from monai.metrics import compute_roc_auc

    from ctsynth.metrics import roc_auc_ci

    g = torch.Generator().manual_seed(0)
    s = torch.rand(60, generator=g).round(decimals=1)  # with ties
    y = (torch.rand(60, generator=g) < s).long()
    r = roc_auc_ci(s.tolist(), y.tolist())
    pos, neg = s[y == 1].double(), s[y == 0].double()
    psi = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()  # m x n
    v10, v01 = psi.mean(1), psi.mean(0)
    var = float(v10.var() / len(pos) + v01.var() / len(neg))
    assert r["auc"] == pytest.approx(float(psi.mean())) == pytest.approx(float(compute_roc_auc(s.double(), y)))
    assert r["se"] == pytest.approx(var ** 0.5)
    boot = roc_auc_ci(s.tolist(), y.tolist(), method="bootstrap", n_bootstrap=300, seed=1)
    assert boot == roc_auc_ci(s.tolist(), y.tolist(), method="bootstrap", n_bootstrap=300, seed=1)  # seeded
    assert boot["ci_low"] < r["auc"] < boot["ci_high"] and boot["ci_high"] - boot["ci_low"] == pytest.approx(
        r["ci_high"] - r["ci_low"], rel=0.3)  # both near 2 x 1.96 se
    wide = roc_auc_ci(s.tolist(), y.tolist(), level=0.99)
    assert wide["ci_low"] < r["ci_low"] and wide["ci_high"] > r["ci_high"]


@pytest.mark.parametrize("kwargs, match", [
    ({"scores": [0.1, 0.2], "labels": [0, 1, 1]}, "2 scores for 3 labels"),
    ({"scores": [0.1, 0.2], "labels": [0, 2]}, "labels must be 0 or 1"),
    ({"scores": [0.1, float("nan")], "labels": [0, 1]}, "finite"),
    ({"scores": [0.1, 0.2], "labels": [0, 1], "level": 1.0}, "level must be in"),
    ({"scores": [0.1, 0.2], "labels": [0, 1], "method": "hanley"}, "method must be one of"),
])
def test_roc_auc_ci_refuses_bad_input(kwargs, match):
    from ctsynth.metrics import roc_auc_ci

    with pytest.raises(ValueError, match=match):
        roc_auc_ci(**kwargs)
    assert roc_auc_ci([0.2, 0.3], [1, 1]) is None  # one class: undefined



@pytest.mark.parametrize("step, expected", [(0.0, 2.0), (1.0, 242.0)])
def test_seam_ratio_pinned(step, expected):
    """A ramp along z (each z face steps 0.1; x and y faces 0) with a jump of ``step`` at z = 8: the border's
    squared step (0.1 + step)^2 over the mean of the other 28 faces (14 z faces of 0.01, 14 x/y faces of 0)."""
    from ctsynth.metrics import seam_ratio

    v = torch.arange(16.0).mul(0.1).expand(8, 8, 16).clone()
    v[..., 8:] += step
    assert seam_ratio(v, [[], [], [8]]) == pytest.approx(expected, rel=1e-4)
    assert seam_ratio(v, [[], [], []]) == 1.0  # no borders: one window


def test_seam_ratio_rejects_borders_outside_the_volume():
    from ctsynth.metrics import seam_ratio

    with pytest.raises(ValueError, match="outside"):
        seam_ratio(torch.rand(4, 4, 4), [[], [], [4]])
    with pytest.raises(ValueError, match="3 axes"):
        seam_ratio(torch.rand(4, 4, 4), [[2]])


def _cube_acquisition():
    from ctsynth.drr import DRRProjector
    from ctsynth.geometry import ProjectionGeometry
    from ctsynth.phantoms import grid_affine

    aff = grid_affine((16, 16, 16), (4.0, 4.0, 4.0))
    cube = torch.zeros(1, 16, 16, 16)
    cube[:, 4:12, 5:11, 3:13] = 1.0
    geom = ProjectionGeometry.for_volume(aff, (16, 16, 16), views="ap,lateral", detector_shape=(24, 24),
                                         pixel_spacing_mm=4.0)
    chord = DRRProjector(geom, input_kind="mu")(cube[None], aff)[0]  # mm of cube along each ray
    return aff, cube, geom, chord


@pytest.mark.parametrize("inside_hu,window,seen_hu", [
    (-400.0, None, -400.0),            # the volume as it is
    (-400.0, (-1000.0, -450.0), -450.0),  # clipped to the window before projecting
    (-500.0, None, -500.0),            # the truth itself: identical DRRs, PSNR at its cap
])
def test_reprojection_psnr_follows_the_attenuation_along_each_ray(inside_hu, window, seen_hu):
    from ctsynth.drr import DRRProjector, hu_to_mu
    from ctsynth.metrics import reprojection_psnr

    aff, cube, geom, chord = _cube_acquisition()
    truth = -1000.0 + 500.0 * cube  # a -500 HU cube in air
    li = DRRProjector(geom)(truth[None], aff)[0]
    pred = -1000.0 + (inside_hu + 1000.0) * cube
    # the DRRs differ by the cube's chord times its change in attenuation (air projects to zero either way)
    d_mu = float(hu_to_mu(torch.tensor(seen_hu)) - hu_to_mu(torch.tensor(-500.0)))
    mse = float((d_mu * chord).pow(2).mean())
    expected = 100.0 if mse == 0 else 10 * math.log10(float(li.max()) ** 2 / mse)
    assert reprojection_psnr(pred, aff, geom, li, window) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_reprojection_psnr_rejects_mismatched_inputs():
    from ctsynth.metrics import reprojection_psnr

    aff, cube, geom, _ = _cube_acquisition()
    with pytest.raises(ValueError, match="\\(2, rows, cols\\) line integrals"):
        reprojection_psnr(cube, aff, geom, torch.ones(3, 24, 24))
    with pytest.raises(ValueError, match="must be the acquisition's"):
        reprojection_psnr(cube, aff, geom, torch.ones(2, 20, 24))
    with pytest.raises(ValueError, match="all zero"):
        reprojection_psnr(cube, aff, geom, torch.zeros(2, 24, 24))
    with pytest.raises(ValueError, match="\\(1, S0, S1, S2\\)"):
        reprojection_psnr(torch.zeros(2, 2, 4, 4, 4), aff, geom, torch.ones(2, 24, 24))
