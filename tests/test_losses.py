import pytest
import torch

from conftest import voxelised_ellipsoid
from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry
from ctsynth.losses import (VGG19_LAYERS, CompositeLoss, DRRReprojectionLoss, GradientMagnitudeLoss, MultiScaleSSIMLoss,
                            SSIMLoss, TriPlanarVGGLoss, VGG19Features)


def torchvision_layout_state_dict(seed: int = 0) -> dict:
    """A state dict with torchvision vgg19's exact key layout (features + classifier), small random values."""
    torch.manual_seed(seed)
    full = VGG19Features("relu5_4", random_init=True)
    sd = {f"features.{k.split('.', 1)[1]}": v.clone() for k, v in full.state_dict().items()}
    sd.update({"classifier.0.weight": torch.zeros(4, 7), "classifier.0.bias": torch.zeros(4),
               "classifier.3.weight": torch.zeros(4, 4), "classifier.3.bias": torch.zeros(4),
               "classifier.6.weight": torch.zeros(2, 4), "classifier.6.bias": torch.zeros(2)})
    return sd


def test_vgg19_layer_indices_match_torchvision():
    assert [VGG19_LAYERS[n] for n in ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")] == [3, 8, 17, 26, 35]
    keys = sorted({int(k.split(".")[1]) for k in torchvision_layout_state_dict()
                   if k.startswith("features.")})
    assert keys == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vgg19_loads_torchvision_state_dict(tmp_path, suffix):
    sd = torchvision_layout_state_dict()
    path = tmp_path / f"vgg19{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = VGG19Features("relu4_4", weights_path=path)
    assert torch.equal(model.features[0].weight, sd["features.0.weight"])
    assert torch.equal(model.features[25].bias, sd["features.25.bias"])
    assert not any(p.requires_grad for p in model.parameters())


def test_vgg19_weight_errors(tmp_path):
    with pytest.raises(ValueError, match="weights_path"):
        VGG19Features()
    with pytest.raises(FileNotFoundError, match="not found"):
        VGG19Features(weights_path=tmp_path / "missing.pth")
    sd = torchvision_layout_state_dict()
    del sd["features.34.weight"]
    sd["features.99.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing keys \['features.34.weight'\].*unexpected keys \['features.99.weight'\]"):
        VGG19Features(weights_path=tmp_path / "bad.pth")
    sd = torchvision_layout_state_dict()
    sd["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shapes do not match"):
        VGG19Features(weights_path=tmp_path / "shape.pth")


def test_triplanar_vgg_loss():
    loss = TriPlanarVGGLoss(random_init=True, layers=("relu1_2", "relu2_2"), slice_fraction=0.25, seed=0)
    a = torch.rand(1, 1, 24, 20, 16)
    assert float(loss(a, a)) == 0.0
    b = a.clone().requires_grad_(True)
    value = loss(b, (a + 0.2 * torch.randn_like(a)).clamp(0, 1))
    value.backward()
    assert value.item() > 0 and b.grad.abs().sum() > 0


def test_ssim_losses():
    a = torch.rand(2, 1, 32, 32, 32)
    assert float(SSIMLoss(1.0)(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(MultiScaleSSIMLoss(1.0)(a, a)) == pytest.approx(0.0, abs=1e-5)
    assert float(SSIMLoss(1.0)(a, torch.rand_like(a))) > 0.5


def test_gradient_loss_is_spacing_aware():
    ramp = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 1, 10, 6, 6).contiguous()
    m = GradientMagnitudeLoss(spacing=(2.0, 1.0, 1.0)).magnitude(ramp)
    assert torch.allclose(m, torch.full_like(m, 0.5), atol=1e-5)  # 1 HU per voxel over 2 mm
    assert float(GradientMagnitudeLoss()(ramp, torch.zeros_like(ramp))) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        GradientMagnitudeLoss(spacing=(1.0, 0.0, 1.0))


def test_drr_reprojection_loss():
    occ, aff = voxelised_ellipsoid(24, 4.0, (30.0, 25.0, 35.0))
    g = ProjectionGeometry.for_volume(aff, occ.shape, views="ap,lateral", detector_shape=(32, 32), pixel_spacing_mm=4)
    loss = DRRReprojectionLoss((-1000, 1000))
    target = (occ * 0.5 + 0.0)[None, None]  # [0,1]: 0 = air, 0.5 = water
    assert float(loss(target, target, aff, g)) == pytest.approx(0.0, abs=1e-7)
    pred = (target * 1.1).requires_grad_(True)
    value = loss(pred, target, aff, g)
    value.backward()
    assert value.item() == pytest.approx(0.1, rel=1e-3)  # 10% more attenuation everywhere
    assert pred.grad.abs().sum() > 0
    projections = DRRProjector(g)(target * 2000 - 1000, aff)
    assert float(loss(target, None, aff, g, projections)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="target volume or its projections"):
        loss(pred, None, aff, g)


def test_composite_loss_stage_presets():
    a = torch.rand(1, 1, 24, 24, 24)
    b = (a + 0.1).clamp(0, 1)
    s1 = CompositeLoss({"l1": 1.0, "ssim": 0.5})
    total = s1(a, b)
    assert set(s1.last_terms) == {"l1", "ssim"}
    assert float(total) == pytest.approx(s1.last_terms["l1"] + 0.5 * s1.last_terms["ssim"], rel=1e-6)
    s3 = CompositeLoss({"l1": 1, "ssim": 0.5, "vgg": 0.1, "grad": 0.2, "drr": 0.3}, vgg_random_init=True)
    assert s3.needs_geometry
    with pytest.raises(ValueError, match="geometry"):
        s3(a, b)
    _, aff = voxelised_ellipsoid(24, 4.0, (30.0, 25.0, 35.0))
    g = ProjectionGeometry.for_volume(aff, (24, 24, 24), views="ap", detector_shape=(16, 16), pixel_spacing_mm=8)
    s3(a, b, affine=aff, geometry=g)
    assert set(s3.last_terms) == {"l1", "ssim", "vgg", "grad", "drr"}
    assert "vgg" not in CompositeLoss({"l1": 1.0, "vgg": 0.0}).terms


@pytest.mark.parametrize("weights, match", [({"l2": 1.0}, "unknown"), ({"l1": 0.0}, "zero")])
def test_composite_loss_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        CompositeLoss(weights)


def test_vgg_chunking_and_checkpointing_keep_value_and_gradient():
    from ctsynth.losses import TriPlanarVGGLoss

    torch.manual_seed(0)
    pred = torch.rand(2, 1, 20, 18, 16, requires_grad=True)
    target = torch.rand(2, 1, 20, 18, 16)
    whole = TriPlanarVGGLoss(random_init=True, seed=3, slice_fraction=0.5, slice_chunk=1000, checkpoint=False)
    chunked = TriPlanarVGGLoss(random_init=True, seed=3, slice_fraction=0.5, slice_chunk=2, checkpoint=True)
    chunked.vgg.load_state_dict(whole.vgg.state_dict())
    a = whole(pred, target)
    (ga,) = torch.autograd.grad(a, pred)
    b = chunked(pred, target)
    (gb,) = torch.autograd.grad(b, pred)
    assert torch.allclose(a, b, rtol=1e-5) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="slice_chunk"):
        TriPlanarVGGLoss(random_init=True, slice_chunk=0)
