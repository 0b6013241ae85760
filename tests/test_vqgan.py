"""xray2ctpa_vqgan network pieces: the 3D VQ-GAN generator and the patch-wise (sliding-window) path."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

_path = Path(__file__).resolve().parents[1] / "bundles" / "xray2ctpa_vqgan" / "scripts" / "vqgan.py"
_spec = importlib.util.spec_from_file_location("xray2ctpa_vqgan_vqgan", _path)
vqgan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vqgan)

TINY = dict(channels=(8, 16, 16, 16), num_res_blocks=1, num_embeddings=32, embedding_dim=8, norm_groups=4)


def test_seed_widths_give_about_36m_parameters():
    model = vqgan.VQGAN3D()
    assert model.downsample == 8
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(34.5e6, rel=0.01)


@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 16), (2, 1, 32, 16, 24)])
def test_shapes_codes_and_straight_through_gradients(shape):
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY)
    x = torch.rand(shape)
    recon, loss, idx = model(x)
    assert recon.shape == x.shape and idx.shape == (shape[0], *(s // 8 for s in shape[2:]))
    (torch.nn.functional.l1_loss(recon, x) + loss).backward()
    assert model.encoder[0].weight.grad is not None and model.encoder[0].weight.grad.abs().sum() > 0
    stats = model.codebook_stats(idx)
    assert 0 < stats["codebook_usage_pct"] <= 100 and 1 <= stats["perplexity"] <= 32
    assert torch.equal(model.decode_indices(idx), model.decode(model.quantizer.embed(idx)))


@pytest.mark.parametrize("r, shape", [(2, (2, 3, 4, 6, 8)), (3, (1, 1, 6, 9, 3))])
def test_space_to_depth_is_a_lossless_rearrangement(r, shape):
    x = torch.arange(float(torch.tensor(shape).prod())).reshape(shape)
    cells = vqgan.SpaceToDepth3D(r)(x)
    assert cells.shape == (shape[0], shape[1] * r ** 3, *(s // r for s in shape[2:]))
    # channel k of cell (i, j, l) holds voxel (r*i + a, r*j + b, r*l + c) of the input channel k // r^3
    a, b, c = 1, 0, r - 1
    k = (a * r + b) * r + c
    assert torch.equal(cells[:, k, 1, 0, 0], x[:, 0, r + a, b, c])
    assert torch.equal(vqgan.DepthToSpace3D(r)(cells), x)


@pytest.mark.parametrize("stem_stride, channels, downsample", [(1, (8, 16), 2), (2, (8, 16), 4), (2, (8, 16, 16), 8)])
def test_stem_stride_sets_the_downsampling_and_no_layer_runs_at_full_resolution(stem_stride, channels, downsample):
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(channels=channels, num_res_blocks=1, num_embeddings=16, embedding_dim=4, norm_groups=4,
                          stem_stride=stem_stride)
    assert model.downsample == downsample and model.config["stem_stride"] == stem_stride
    x = torch.rand(2, 1, 16, 8, 24)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-3:]))
             for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    recon, loss, idx = model(x)
    for h in hooks:
        h.remove()
    assert recon.shape == x.shape and idx.shape == (2, 16 // downsample, 8 // downsample, 24 // downsample)
    assert (max(s[0] for s in sizes) == 16) == (stem_stride == 1)  # the largest feature map any convolution makes
    (torch.nn.functional.l1_loss(recon, x) + loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    with pytest.raises(ValueError, match="stem_stride must be a positive integer"):
        vqgan.VQGAN3D(channels=channels, stem_stride=0)


def test_bfloat16_autocast_stays_finite():
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY)
    x = torch.rand(1, 1, 16, 16, 16) * 3000 - 1000  # unnormalised HU-like values stress the statistics
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, loss, _ = model(x)
    assert torch.isfinite(recon.float()).all() and torch.isfinite(loss)


def test_input_errors():
    model = vqgan.VQGAN3D(**TINY)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.rand(1, 1, 12, 16, 16))
    with pytest.raises(ValueError, match="at least two widths"):
        vqgan.VQGAN3D(channels=(8,))


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_window_stitching_of_a_linear_function_is_exact(mode):
    # any blending of windows that each return their input exactly must return the input: a linear ramp
    # checks the weights are normalised and the windows land where they were cut
    x, y, z = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), torch.arange(50.0), indexing="ij")
    volume = (0.5 * x - 2.0 * y + 3.0 * z + 7.0)[None, None]
    out = vqgan.PatchwiseVQGAN(lambda w: w.clone(), roi_size=(16, 16, 24), overlap=0.25, mode=mode)(volume)
    assert out.device.type == "cpu" and out.shape == volume.shape
    assert torch.allclose(out, volume, atol=1e-3)


def test_patchwise_equals_whole_volume_when_one_window_covers_it_and_checks_windows():
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY).eval()
    volume = torch.rand(1, 1, 16, 16, 24)
    with torch.no_grad():
        whole = model(volume)[0]
    assert torch.allclose(vqgan.PatchwiseVQGAN(model, roi_size=(16, 16, 24))(volume), whole, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by the model's downsampling"):
        vqgan.PatchwiseVQGAN(model, roi_size=(12, 16, 24))(volume)
    with pytest.raises(ValueError, match="mode must be one of"):
        vqgan.PatchwiseVQGAN(model, mode="cosine")


def test_seam_ratio_flags_windows_that_disagree():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 48, 48, 48, generator=g), 5, 1, 2, count_include_pad=False)
    patchwise = vqgan.PatchwiseVQGAN(lambda w: w.clone(), roi_size=(16, 16, 16), overlap=0.25, mode="constant")
    assert patchwise.window_borders((48, 48, 48))[0] == [12, 16, 24, 28, 32, 40]  # starts 0 12 24 32, size 16
    clean = patchwise(smooth)
    assert 0.8 < patchwise.seam_ratio(clean) < 1.25  # a faithful model leaves no seams

    def offset_per_window(w):  # a model whose windows disagree by a constant: steps where they meet
        return w + 0.05 * torch.randn(w.shape[0], 1, 1, 1, 1, generator=g)

    seamy = vqgan.PatchwiseVQGAN(offset_per_window, roi_size=(16, 16, 16), overlap=0.25, mode="constant")(smooth)
    assert patchwise.seam_ratio(seamy) > 2.0
    assert vqgan.PatchwiseVQGAN(lambda w: w, roi_size=(64, 64, 64)).seam_ratio(smooth) == 1.0


def test_gaussian_blending_keeps_window_border_artefacts_out():
    # windows whose outer two voxels are wrong (as zero padding makes a network's border): with MONAI's floored
    # Gaussian map the corners' equal weights let them through; the unfloored weights keep them out but where
    # every covering window is far off-centre (measured: mean error 0.018 vs 0.44, max 0.35 vs 5.2)
    x, y, z = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), torch.arange(64.0), indexing="ij")
    volume = ((x - 2 * y + z) / 64.0)[None, None]

    def bad_borders(w):
        out = w.clone()
        for axis in range(2, 5):
            out.narrow(axis, 0, 2).fill_(5.0)
            out.narrow(axis, w.shape[axis] - 2, 2).fill_(5.0)
        return out

    patchwise = vqgan.PatchwiseVQGAN(bad_borders, roi_size=(32, 32, 32), overlap=0.25)
    weights = patchwise.blend_weights((32, 32, 32))
    assert weights.shape == (1, 1, 32, 32, 32) and float(weights.min()) == 1.0
    from monai.data.utils import compute_importance_map

    monai_map = compute_importance_map((32, 32, 32), mode="gaussian", sigma_scale=0.125)
    above_floor = monai_map > 1.01e-3  # the same Gaussian wherever MONAI does not clamp it
    assert torch.allclose((weights / weights.max())[0, 0][above_floor], (monai_map / monai_map.max())[above_floor],
                          rtol=1e-3)
    assert float((~above_floor).float().mean()) > 0.5  # MONAI clamps most of a 3D window (58 % of this one)
    assert vqgan.PatchwiseVQGAN(bad_borders, mode="constant").blend_weights((32, 32, 32)) is None
    inner = (..., slice(2, -2), slice(2, -2), slice(2, -2))  # the volume's own border has one window only
    err = (patchwise(volume) - volume)[inner].abs()
    from monai.inferers import sliding_window_inference

    floored = (sliding_window_inference(volume, (32, 32, 32), 1, bad_borders, overlap=0.25, mode="gaussian")
               - volume)[inner].abs()
    assert float(err.mean()) < 0.025 and float(err.max()) < 0.4
    assert float(floored.mean()) > 0.4 and float(floored.max()) > 5.0


def _engine_module():
    spec = importlib.util.spec_from_file_location("xray2ctpa_vqgan_engine", _path.with_name("engine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_with_perceptual_adversarial_terms_and_codebook_monitor(tmp_path):
    from monai.engines import SupervisedTrainer
    from monai.networks.nets import PatchDiscriminator

    from ctsynth.adversarial import AdversarialTerms
    from ctsynth.engine import TrainingHistory
    from ctsynth.losses import TriPlanarVGGLoss

    eng = _engine_module()
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY)
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=4, in_channels=1, out_channels=1)
    d_opt = torch.optim.Adam(disc.parameters(), 1e-3)
    adversarial = AdversarialTerms(disc, d_opt, criterion="hinge", adversarial_weight=0.1, feature_matching_weight=1.0,
                                   start=4)
    iteration = eng.VQGANIteration(perceptual=TriPlanarVGGLoss(random_init=True, layers=("relu1_2",)),
                                   perceptual_weight=0.1, adversarial=adversarial)
    data = [{"image": torch.rand(2, 1, 16, 16, 16)} for _ in range(3)]
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=model,
                                optimizer=opt, loss_function=torch.nn.L1Loss(), iteration_update=iteration,
                                train_handlers=[eng.CodebookMonitor(), TrainingHistory(tmp_path)], decollate=False)
    before = [p.detach().clone() for p in disc.parameters()]
    trainer.run()
    rows = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["codebook_usage_pct"] <= 100 and 1 <= r["perplexity"] <= 32
        assert {"loss_l1", "loss_commitment", "loss_perceptual"} <= set(r)
    assert "loss_adv" in rows[1] and "loss_d_loss" in rows[1]  # adversarial terms from iteration 4 on
    assert any(not torch.equal(b, p) for b, p in zip(before, disc.parameters()))
    out = iteration(trainer, data[0])
    assert out["indices"].shape == (2, 2, 2, 2)


@pytest.mark.parametrize("norm, local", [("batch", True), ("group", False)])
def test_batch_norm_treats_a_window_as_the_whole_volume_does(norm, local):
    # a window's voxels are normalised as inside the whole volume only when the statistics do not span the
    # input: BatchNorm's running statistics at inference, not GroupNorm's
    torch.manual_seed(0)
    layer = vqgan._norm(norm, 8, 4)
    layer.train()(torch.randn(2, 8, 6, 6, 6) * 3 + 1)  # BatchNorm learns running statistics
    layer.eval()
    x = torch.randn(1, 8, 12, 12, 12) * torch.linspace(0.5, 4.0, 12)  # statistics vary along z
    same = torch.allclose(layer(x)[..., :6], layer(x[..., :6]), atol=1e-5)
    assert same is local


def test_pixel_loss_mse_is_the_squared_error_and_options_are_checked():
    from monai.engines import SupervisedTrainer

    eng = _engine_module()
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY)
    x = torch.rand(2, 1, 16, 16, 16)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": x}],
                                network=model, optimizer=torch.optim.SGD(model.parameters(), 0.0),
                                loss_function=torch.nn.MSELoss(), decollate=False)
    trainer.state.iteration = trainer.state.epoch = 1
    reference = copy.deepcopy(model)  # the same state: the training forward updates the EMA codebook
    torch.manual_seed(1)
    out = eng.VQGANIteration(pixel_loss="mse")(trainer, {"image": x})
    torch.manual_seed(1)
    with torch.no_grad():
        recon = reference(x)[0]
    assert set(out["terms"]) == {"mse", "commitment"}
    assert out["terms"]["mse"] == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="pixel_loss must be one of"):
        eng.VQGANIteration(pixel_loss="huber")


@pytest.mark.parametrize("cpu_bf16, amp, dtype", [(True, True, torch.bfloat16), (True, False, torch.float32),
                                                   (False, True, torch.float32)])
def test_amp_runs_the_vqgan_in_bfloat16_on_cpu_and_only_where_declared_safe(cpu_bf16, amp, dtype):
    from monai.engines import SupervisedTrainer

    eng = _engine_module()
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(**TINY)
    seen = []
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(2, 1, 16, 16, 16)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[{"image": x}],
                                network=model, optimizer=torch.optim.Adam(model.parameters(), 1e-3),
                                loss_function=torch.nn.MSELoss(), decollate=False)
    trainer.state.iteration = trainer.state.epoch = 1
    iteration = eng.VQGANIteration(amp=amp, pixel_loss="mse")
    iteration.cpu_bf16 = cpu_bf16  # the base class's default (False) is what the cascade and slice iterations see
    before = [p.detach().clone() for p in model.parameters()]
    out = iteration(trainer, {"image": x})
    assert seen == [dtype] and out["pred"].dtype == torch.float32 and out["grad_norm"] is not None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # float32 master weights, updated
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert trainer.ctsynth_amp == (dtype == torch.bfloat16, dtype, None)


def test_unknown_norm_is_named():
    with pytest.raises(ValueError, match="norm must be one of"):
        vqgan.VQGAN3D(**TINY, norm="instance")


def test_volume_statistics_bring_windows_to_the_whole_volume_pass():
    # a receptive field smaller than the windows, so what is left after calibration is the missing context
    torch.manual_seed(0)
    model = vqgan.VQGAN3D(channels=(8, 16), num_res_blocks=1, num_embeddings=32, embedding_dim=8, norm_groups=4).eval()
    g = torch.Generator().manual_seed(3)
    volume = torch.rand(1, 1, 48, 48, 48, generator=g) * torch.linspace(0.2, 1.0, 48)  # statistics vary along z
    with torch.no_grad():
        whole = model(volume)[0]
    err = {}
    for stats in vqgan.PatchwiseVQGAN.NORM_STATS:
        out = vqgan.PatchwiseVQGAN(model, roi_size=(32, 32, 32), overlap=0.25, norm_stats=stats)(volume)
        err[stats] = float((out - whole).abs().mean())
    assert err["volume"] < 0.5 * err["window"]  # measured 0.056 vs 0.170 (output mean magnitude 0.24)
    with pytest.raises(ValueError, match="norm_stats must be one of"):
        vqgan.PatchwiseVQGAN(model, norm_stats="batch")
