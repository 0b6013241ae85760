"""cascade_xray2ct network: shapes per stage and view count, geometry-aligned back-projection, freezing."""

import pytest
import torch

from ctsynth.bundles import bundle_module
from ctsynth.geometry import ProjectionGeometry
from ctsynth.phantoms import grid_affine

_network = bundle_module("cascade_xray2ct", "network")
ProgressiveCascade, backproject_features, rescale_affine = (_network.ProgressiveCascade, _network.backproject_features,
                                                            _network.rescale_affine)

TINY = dict(encoder_channels=(4, 8, 8), hidden=16, depth=1, heads=2, stem_channels=4, xray_token_grid=2)


def tiny_cascade(sizes=(8, 16, 32)):
    return ProgressiveCascade(sizes=sizes, patch=(4, 8, 16), **TINY)


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_stage_shapes_for_any_view_count(views):
    torch.manual_seed(0)
    net = tiny_cascade()
    aff = grid_affine((8, 8, 8), 40.0)
    g = ProjectionGeometry.for_volume(aff, (8, 8, 8), views=views, detector_shape=(32, 32), pixel_spacing_mm=12)
    out = net(torch.rand(2, views, 32, 32), [g, g], aff)
    assert [tuple(o.shape) for o in out] == [(2, 1, 8, 8, 8), (2, 1, 16, 16, 16), (2, 1, 32, 32, 32)]
    assert len(net(torch.rand(1, views, 32, 32), [g], aff, up_to_stage=0)) == 1


def test_seed_sized_cascade_builds_with_the_seed_depths():
    net = ProgressiveCascade()
    assert [len(s.blocks) for s in net.stages] == [4, 6, 8]
    assert [s.blocks[0].attn.num_heads for s in net.stages] == [4, 8, 8]
    assert [s.size for s in net.stages] == [64, 128, 256]
    assert net.stages[2].detail is not None and net.stages[2].use_checkpoint


def test_backprojection_puts_features_at_the_projection():
    # a single bright detector column must light the voxels whose rays hit it, in every stage grid
    aff = grid_affine((16, 16, 16), 10.0)
    g = ProjectionGeometry.for_volume(aff, (16, 16, 16), views="ap", detector_shape=(32, 32), pixel_spacing_mm=6,
                                      kind="parallel")
    feats = torch.zeros(1, 1, 1, 32, 32)
    feats[..., :, 20] = 1.0  # column 20 -> x = (20 - 15.5) * 6 = 27 mm
    bp = backproject_features(feats, [g], aff[None], (16, 16, 16))
    assert bp.shape == (1, 2, 16, 16, 16)
    x_mm = (torch.arange(16) - 7.5) * 10
    lit = bp[0, 0].mean(dim=(1, 2))
    assert x_mm[lit.argmax()].item() == pytest.approx(25.0)  # nearest voxel centre to 27 mm
    assert torch.allclose(bp[0, 0], bp[0, 1])  # one view: mean == max


def test_rescale_affine_keeps_the_field_of_view():
    a = grid_affine((64, 64, 64), 4.0)
    b = rescale_affine(a, (64,) * 3, (256,) * 3)
    corner = lambda aff, n: (aff @ torch.tensor([-0.5, -0.5, -0.5, 1.0], dtype=torch.float64))[:3]  # noqa: E731
    assert torch.allclose(corner(a, 64), corner(b, 256))
    assert torch.allclose(b.diagonal()[:3], torch.full((3,), 1.0, dtype=torch.float64))


def test_freezing_trains_only_the_current_stage():
    net = tiny_cascade()
    net.freeze_stages(1)
    assert not any(p.requires_grad for p in net.encoder.parameters())
    assert not any(p.requires_grad for p in net.stages[0].parameters())
    assert all(p.requires_grad for p in net.stages[1].parameters())
    net.train()
    assert not net.stages[0].training and net.stages[1].training
    aff = grid_affine((8, 8, 8), 40.0)
    g = ProjectionGeometry.for_volume(aff, (8, 8, 8), detector_shape=(32, 32), pixel_spacing_mm=12)
    out = net(torch.rand(1, 2, 32, 32), [g], aff, up_to_stage=1)
    out[-1].mean().backward()
    assert net.stages[0].embed.weight.grad is None and net.stages[1].embed.weight.grad is not None
    with pytest.raises(ValueError, match="trainable_stage"):
        net.freeze_stages(3)


def test_network_input_errors():
    net = tiny_cascade((8, 16))
    aff = grid_affine((8, 8, 8), 40.0)
    g = ProjectionGeometry.for_volume(aff, (8, 8, 8), views=3, detector_shape=(32, 32), pixel_spacing_mm=12)
    with pytest.raises(ValueError, match="3 views, the radiographs have 2"):
        net(torch.rand(1, 2, 32, 32), [g], aff)
    with pytest.raises(ValueError, match=r"\(B, V, H, W\)"):
        net(torch.rand(2, 32, 32), [g], aff)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ProgressiveCascade(sizes=(10,), patch=4, **TINY)


def test_refining_stage_starts_as_identity_on_the_previous_output():
    from ctsynth.geometry import ProjectionGeometry

    torch.manual_seed(0)
    net = ProgressiveCascade(sizes=(8, 16, 32), encoder_channels=(4, 4, 4), hidden=16, depth=1, heads=2, patch=(4, 8, 16),
                             stem_channels=4, xray_token_grid=2)
    g = ProjectionGeometry(angles_deg=[0.0, 90.0], sid_mm=1000.0, sdd_mm=1200.0, detector_shape=(16, 16),
                           pixel_spacing_mm=20.0, isocenter_mm=[0.0, 0.0, 0.0])
    aff = torch.diag(torch.tensor([30.0, 30.0, 30.0, 1.0], dtype=torch.float64))
    aff[:3, 3] = -105.0
    with torch.no_grad():
        outs = net(torch.rand(1, 2, 16, 16), [g], aff)
    for k in (1, 2):
        up = torch.nn.functional.interpolate(outs[k - 1], size=outs[k].shape[-3:], mode="trilinear", align_corners=False)
        assert torch.allclose(outs[k], up, atol=1e-6)


@pytest.mark.parametrize("patch, direct", [(4, True), (6, True), (8, True), (12, True), (16, False), (32, False)])
def test_patch_embedding_shapes_and_cost(patch, direct):
    emb, unemb = _network.patch_embedding(16, 128, patch), _network.patch_unembedding(128, 16, patch)
    x = torch.rand(1, 16, 2 * patch, 2 * patch, 2 * patch)
    tok = emb(x)
    assert tok.shape == (1, 128, 2, 2, 2) and unemb(tok).shape == x.shape
    params = sum(p.numel() for p in emb.parameters()) + sum(p.numel() for p in unemb.parameters())
    assert isinstance(emb, torch.nn.Conv3d) == direct
    if patch <= 8 or not direct:
        assert params < 2_500_000  # a direct 32^3 kernel would cost 134 M
