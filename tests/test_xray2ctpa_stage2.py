"""xray2ctpa_vqgan stages 2-3: X-ray encoder and conditioned denoiser, classifier-free guidance, LoRA, the
latent grid, AUC, and the whole chain on tiny phantoms (VQ-GAN -> diffusion through `monai.bundle run` ->
PE classifier -> judged generation -> `ctsynth generate` -> LoRA fine-tuning)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler
from PIL import Image

from conftest import refused, monai_bundle_run, served_and_written

from ctsynth.bundles import bundle_module, checkpoint_config, checkpoint_settings, run_bundle
from ctsynth.cli import main as cli_main
from ctsynth.engine import read_checkpoint_meta
from ctsynth.io import load_projection, load_volume
from ctsynth.prepare import load_datalist, prepare_ctpa, write_phantom_ctpa_studies
from ctsynth.transforms import normalize_radiograph

_cond = bundle_module("xray2ctpa_vqgan", "conditioning")
_lora = bundle_module("xray2ctpa_vqgan", "lora")
_diff = bundle_module("xray2ctpa_vqgan", "diffusion")
_judge = bundle_module("xray2ctpa_vqgan", "judge")
VQGAN3D = bundle_module("xray2ctpa_vqgan", "vqgan").VQGAN3D

UNET = {"channels": [16, 32], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
        "norm_num_groups": 8}
VQ_TINY = {"network_def#channels": [8, 16, 16], "network_def#num_res_blocks": 1, "network_def#num_embeddings": 32,
           "network_def#embedding_dim": 8, "network_def#norm_groups": 4, "network_def#restart_threshold": 1.0,
           "discriminator#channels": 4, "discriminator#num_layers_d": 2, "vgg_random_init": True,
           "adversarial_start": 10 ** 6, "epochs": 2, "batch_size": 2, "val_roi_size": [16, 16, 16]}
DENOISER_TINY = {"network_def#xray_channels": [8, 16], "network_def#token_dim": 16, "network_def#token_grid": 4,
                 **{f"network_def#{k}": v for k, v in UNET.items()}}
CLASSIFIER_TINY = {"classifier_def#block_inplanes": [4, 8, 8, 8]}


#: the generation grid of the tiny denoisers: 16^3 voxels of 5 mm, VQ-GAN downsample 4 (4^3 latents), 32-pixel X-rays
RAY_GRID = {"volume_shape": [16, 16, 16], "spacing_mm": [5.0, 5.0, 5.0], "downsample": 4, "xray_size": 32}


def _denoiser(seed=0, conditioning="tokens", **kw):
    """A tiny denoiser whose zero-initialised parts (MONAI's output convolution, the null condition) are random, so
    outputs depend on every input."""
    torch.manual_seed(seed)
    net = _cond.XrayConditionedDenoiser(8, xray_channels=[8, 16], token_dim=16, token_grid=4, conditioning=conditioning,
                                        ray_grid=RAY_GRID, ray_channels=[8], aligned_channels=4, **UNET, **kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return net


def test_xray_encoder_tokens_any_detector_size():
    enc = _cond.XrayEncoder(1, [8, 16], token_dim=16, token_grid=4)
    for hw in [(32, 32), (48, 40)]:
        assert enc(torch.rand(2, 1, *hw)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        enc(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("conditioning", _cond.CONDITIONING_MODES)
def test_dropped_items_see_the_null_condition(conditioning):
    net = _denoiser(conditioning=conditioning)
    x, t, xray = torch.randn(2, 8, 4, 4, 4), torch.tensor([10, 10]), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        dropped = net(x, t, xray=xray, drop=torch.tensor([True, False]))
        uncond = net(x, t, condition=net.condition(None, (4, 4, 4), 2))
        cond = net(x, t, xray=xray)
    assert torch.allclose(dropped[0], uncond[0], atol=1e-5) and torch.allclose(dropped[1], cond[1], atol=1e-5)
    assert not torch.allclose(cond[0], uncond[0], atol=1e-3)
    expected = ({"tokens"} if "tokens" in conditioning else set()) | ({"features"} if "aligned" in conditioning else set())
    assert set(net.condition(xray, (4, 4, 4))) == expected


def _latent_centres_mm(n, f, spacing):
    """World positions of latent voxel centres along one axis of a grid of n voxels centred on 0 (independently
    of RayFeatures: latent voxel j covers volume voxels j*f ... j*f + f - 1)."""
    return [(j * f + (f - 1) / 2 - (n - 1) / 2) * spacing for j in range(n // f)]


@pytest.mark.parametrize("pixel", [(16, 16), (9, 20), (25, 6)])
def test_ray_features_one_bright_pixel_lights_exactly_the_voxels_on_its_ray(pixel):
    """The identity 'feature map' (the X-ray itself) with one bright pixel: a latent voxel is lit iff its centre
    projects within one pixel of that pixel's centre (bilinear), with the weight of that distance."""
    rays = _cond.RayFeatures(**RAY_GRID)
    xray = torch.zeros(1, 1, 32, 32)
    xray[0, 0, pixel[0], pixel[1]] = 1.0
    lit = rays(xray, (4, 4, 4))[0, 0]
    centres = [_latent_centres_mm(16, 4, 5.0)] * 3
    pts = torch.tensor([[x, y, z] for x in centres[0] for y in centres[1] for z in centres[2]], dtype=torch.float64)
    rc = rays.geometry.project_points(pts)[0]  # (64, 2) row, col
    d = (rc - torch.tensor(pixel, dtype=torch.float64)).abs()
    expected = ((1 - d[:, 0]).clamp_min(0) * (1 - d[:, 1]).clamp_min(0)).reshape(4, 4, 4)
    assert torch.allclose(lit.double(), expected, atol=1e-5)
    assert lit.sum() > 0 or expected.sum() == 0


def test_ray_features_follow_the_ap_view():
    """AP: a voxel's detector column grows with x (patient right on the viewer's left), its row falls as z grows
    (row 0 superior); a map covering the whole detector reaches every voxel."""
    rays = _cond.RayFeatures(**RAY_GRID)
    cols = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 1, 32, 32)
    rows = torch.arange(32.0).view(1, 1, 32, 1).expand(1, 1, 32, 32)
    c, r = rays(cols, (4, 4, 4))[0, 0], rays(rows, (4, 4, 4))[0, 0]
    assert (c[1:] > c[:-1]).all() and (r[..., 1:] < r[..., :-1]).all()  # x -> columns up, z (superior) -> rows down
    assert rays(torch.ones(1, 3, 32, 32), (4, 4, 4)).min() > 0.99  # the detector covers the field of view


def test_aligned_denoiser_needs_its_grid_and_tokens_need_attention():
    with pytest.raises(ValueError, match="give ray_grid"):
        _cond.XrayConditionedDenoiser(8, conditioning="aligned", **UNET)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        _cond.XrayConditionedDenoiser(8, conditioning="rays", ray_grid=RAY_GRID, **UNET)
    net = _cond.XrayConditionedDenoiser(8, conditioning="aligned", ray_grid=RAY_GRID, ray_channels=[8],
                                        aligned_channels=4, **{**UNET, "attention_levels": [False, False]})
    assert net.config["ray_grid"]["volume_shape"] == [16, 16, 16] and not hasattr(net, "xray_encoder")
    rebuilt = _cond.XrayConditionedDenoiser(**net.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


@pytest.mark.parametrize("bad, match", [
    ({"attention_levels": [False, False]}, "no True level"),
    ({"in_channels": 3}, "fixed by this denoiser"),
])
def test_denoiser_rejects_settings_that_cannot_work(bad, match):
    with pytest.raises(ValueError, match=match):
        _cond.XrayConditionedDenoiser(8, xray_channels=[8], token_dim=16, token_grid=4, **{**UNET, **bad})


def test_latents_must_fit_the_denoiser():
    with pytest.raises(ValueError, match="divisible by 2"):
        _denoiser()(torch.randn(1, 8, 4, 4, 3), torch.tensor([1]), xray=torch.rand(1, 1, 32, 32))


def _sampler(net, guidance):
    sched = DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    return _diff.GuidedSampler(net, sched, num_inference_steps=4, guidance=guidance, progress=False)


def test_guidance_zero_ignores_the_xray_and_one_is_the_conditional_model():
    net = _denoiser()
    a, b = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    noise = torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    un_a, un_b = (_sampler(net, 0.0)(x, (4, 4, 4), noise=noise) for x in (a, b))
    assert torch.allclose(un_a, un_b, atol=1e-5)
    cond_a, cond_b = (_sampler(net, 1.0)(x, (4, 4, 4), noise=noise) for x in (a, b))
    assert not torch.allclose(cond_a, cond_b, atol=1e-4)
    guided = _sampler(net, 3.0)(a, (4, 4, 4), noise=noise)
    assert guided.shape == (1, 8, 4, 4, 4) and not torch.allclose(guided, cond_a, atol=1e-4)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        _sampler(net, -1.0)


@pytest.mark.parametrize("conditioning", ["aligned", "tokens"])
def test_regression_objective_is_one_pass_from_zero_latents(conditioning):
    """The deterministic baseline ignores noise and guidance: net(0, T - 1 | X-ray), the same conditioning."""
    net = _denoiser(conditioning=conditioning)
    sched = DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    xray = torch.rand(1, 1, 32, 32)
    outs = [_diff.GuidedSampler(net, sched, num_inference_steps=4, guidance=g, progress=False, objective="regression")(
        xray, (4, 4, 4), noise=torch.randn(1, 8, 4, 4, 4, generator=torch.Generator().manual_seed(k)))
        for k, g in ((0, 1.0), (1, 5.0))]
    with torch.no_grad():
        direct = net(torch.zeros(1, 8, 4, 4, 4), torch.tensor([999]), xray=xray)
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], direct, atol=1e-6)
    with pytest.raises(ValueError, match="objective must be one of"):
        _diff.GuidedSampler(net, sched, objective="gan")


def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_exactly():
    net = _denoiser()
    x, t, xray = torch.randn(1, 8, 4, 4, 4), torch.tensor([50]), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        base = net(x, t, xray=xray)
    names = _lora.add_lora(net, rank=2)
    assert names and all(n.rpartition(".")[2] in _lora.LORA_TARGETS for n in names)
    with torch.no_grad():
        assert torch.allclose(net(x, t, xray=xray), base, atol=1e-6)  # B = 0 at start
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _lora.LoRALinear):
                m.lora_b.normal_(std=0.05)
        adapted = net(x, t, xray=xray)
        assert not torch.allclose(adapted, base, atol=1e-4)
        _lora.merge_lora(net)
        assert not any(isinstance(m, _lora.LoRALinear) for m in net.modules())
        assert torch.allclose(net(x, t, xray=xray), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="no linear layer named"):
        _lora.add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), targets=("to_q",))


def test_denoiser_rebuilt_from_a_lora_config_has_the_same_keys():
    net = _lora.lora_network(_denoiser(), rank=2)
    assert net.config["lora"]["rank"] == 2
    rebuilt = _cond.XrayConditionedDenoiser(**net.config)
    assert rebuilt.state_dict().keys() == net.state_dict().keys()


def test_decoding_snaps_latents_to_codes():
    torch.manual_seed(0)
    vq = VQGAN3D(1, [4, 8], 1, num_embeddings=16, embedding_dim=4, norm_groups=2).eval()
    idx = torch.randint(0, 16, (1, 4, 4, 4))
    codes = vq.quantizer.embed(idx)
    noisy = (codes + 1e-3 * torch.randn_like(codes)) * 2.0
    out = _diff.decode_latents(vq, noisy, scale_factor=2.0, size=(8, 8, 7))
    assert out.shape == (1, 1, 8, 8, 7) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.allclose(out, vq.decode(codes).clamp(0, 1)[..., :7], atol=1e-6)



@pytest.mark.parametrize("volume", [(16, 16, 32), (32, 16, 16)])
def test_ray_features_of_a_larger_grid_are_placed_by_its_field_of_view(volume):
    """Full-resolution grids: the one-bright-pixel check on a grid larger than the training grid, its rays placed
    by its own field of view; the training grid given explicitly is the default."""
    rays = _cond.RayFeatures(**RAY_GRID)
    latent = [v // 4 for v in volume]
    xray = torch.zeros(1, 1, 32, 32)
    xray[0, 0, 14, 17] = 1.0
    lit = rays(xray, latent, volume)[0, 0]
    centres = [_latent_centres_mm(n, 4, 5.0) for n in volume]
    pts = torch.tensor([[x, y, z] for x in centres[0] for y in centres[1] for z in centres[2]], dtype=torch.float64)
    geometry, _ = rays.placement(volume)
    rc = geometry.project_points(pts)[0]
    d = (rc - torch.tensor([14.0, 17.0], dtype=torch.float64)).abs()
    expected = ((1 - d[:, 0]).clamp_min(0) * (1 - d[:, 1]).clamp_min(0)).reshape(*latent)
    assert torch.allclose(lit.double(), expected, atol=1e-5) and lit.sum() > 0
    assert torch.equal(rays(xray, (4, 4, 4), (16, 16, 16)), rays(xray, (4, 4, 4)))


def _scheduler():
    return DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)


@pytest.mark.parametrize("conditioning, objective, guidance", [
    ("aligned+tokens", "diffusion", 3.0), ("aligned", "diffusion", 1.0), ("tokens", "regression", 1.0)])
def test_windowed_sampling_equals_whole_grid_sampling_where_both_fit(conditioning, objective, guidance):
    """Same seed, deterministic DDIM: a window as large as the grid (or larger) samples exactly what the
    unwindowed sampler does."""
    net = _denoiser(conditioning=conditioning)
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = [_diff.GuidedSampler(net, _scheduler(), 3, guidance, progress=False, objective=objective, window=w)(
        xray, (4, 4, 6), generator=torch.Generator().manual_seed(0), volume_shape=(16, 16, 24))
        for w in (None, (4, 4, 6), (8, 8, 8))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="multiples of 2"):
        _diff.GuidedSampler(net, _scheduler(), 3, window=(3, 4, 4), progress=False)(xray, (4, 4, 6))
    with pytest.raises(ValueError, match="overlap"):
        _diff.GuidedSampler(net, _scheduler(), 3, window=(2, 2, 2), overlap=1.0)


class _PointwiseUNet(torch.nn.Module):
    """A voxel-wise stand-in for the U-Net (1x1x1 convolutions, the timestep and the mean token added): a window's
    prediction is then exactly the whole grid's there, so windowed sampling must reproduce whole-grid sampling."""

    def __init__(self, in_channels, out_channels, token_dim):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.tok = torch.nn.Conv3d(in_channels, out_channels, 1), torch.nn.Linear(token_dim, out_channels)

    def forward(self, x, timesteps, context=None):
        out = torch.tanh(self.conv(x)) + timesteps.float().view(-1, 1, 1, 1, 1) / 1000
        return out + (0 if context is None else self.tok(context.mean(1))[..., None, None, None])


def test_windowed_sampling_blends_windows_into_the_whole_grid_prediction():
    """36 overlapping windows of a 8 x 8 x 12 latent grid, each with its own voxels' ray features: with a
    voxel-wise network the blended prediction is the whole grid's, so every DDIM step and the result agree."""
    net = _denoiser(conditioning="aligned+tokens")
    net.unet = _PointwiseUNet(8 + 4, 8, 16)
    xray = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    windows = _diff.latent_windows((8, 8, 12), (4, 4, 4), 0.25, net.multiple)
    assert len(windows) == 36 and all(s.stop - s.start == 4 for w in windows for s in w)
    whole, windowed = (_diff.GuidedSampler(net, _scheduler(), 4, 3.0, progress=False, window=w)(
        xray, (8, 8, 12), generator=torch.Generator().manual_seed(0), volume_shape=(32, 32, 48))
        for w in (None, (4, 4, 4)))
    assert torch.allclose(windowed, whole, atol=1e-4) and whole.abs().max() > 0.1
    shifted = net.condition(xray, (8, 8, 12), volume_shape=(32, 32, 48))["features"].roll(1, -1)
    assert not torch.allclose(shifted, net.condition(xray, (8, 8, 12), volume_shape=(32, 32, 48))["features"])


class _NearestDecoder(torch.nn.Module):
    """A VQ-GAN stand-in whose decoder is voxel-wise (nearest 4x upsampling of the mean code), for exact checks of
    the patch-wise assembly."""

    downsample = 4

    def decode(self, z):
        return torch.nn.functional.interpolate(torch.sigmoid(z.mean(1, keepdim=True)), scale_factor=4, mode="nearest")


def test_patchwise_decoding_assembles_the_whole_volume():
    z = torch.randn(1, 8, 8, 8, 12, generator=torch.Generator().manual_seed(0))
    whole = _diff.decode_latents(_NearestDecoder(), z, 2.0, (30, 32, 45), quantize=False)
    tiled = _diff.decode_latents(_NearestDecoder(), z, 2.0, (30, 32, 45), quantize=False, window=(4, 4, 4))
    assert whole.shape == tiled.shape == (1, 1, 30, 32, 45) and torch.allclose(tiled, whole, atol=1e-5)
    torch.manual_seed(0)
    vq = VQGAN3D(1, [4, 8], 1, num_embeddings=16, embedding_dim=4, norm_groups=2).eval()
    codes = torch.randn(1, 4, 4, 4, 6)
    assert torch.equal(_diff.decode_latents(vq, codes, 1.0, window=(4, 4, 8)), _diff.decode_latents(vq, codes, 1.0))
    tiled = _diff.decode_latents(vq, codes, 1.0, window=(2, 2, 2))
    assert tiled.shape == (1, 1, 8, 8, 12) and 0 <= float(tiled.min()) and float(tiled.max()) <= 1


def test_bench_generate_reports_every_size():
    bench = bundle_module("xray2ctpa_vqgan", "bench")
    tiny_vq = {"channels": [8, 16], "num_res_blocks": 1, "num_embeddings": 16, "embedding_dim": 8, "norm_groups": 4}
    tiny_net = {"xray_channels": [8, 16], "token_dim": 16, "token_grid": 4, "ray_channels": [8], "aligned_channels": 4,
                **UNET}
    res = bench.bench_generate([(32, 32, 48), (32, 32, 24)], train_shape=(16, 16, 16), spacing_mm=(5.0, 5.0, 5.0),
                               steps=1, guidance=2.0, xray_size=32, network=tiny_net, vqgan=tiny_vq)
    assert res["benchmark"] == "generate" and res["latent_window"] == [8, 8, 8] and res["guided"]
    sizes = res["sizes"]
    assert [r["shape"] for r in sizes] == [[32, 32, 24], [32, 32, 48]]  # smallest first: the CPU peak only grows
    assert [r["latent_shape"] for r in sizes] == [[16, 16, 12], [16, 16, 24]]
    assert sizes[0]["windows"] == 3 * 3 * 2 and sizes[1]["windows"] == 3 * 3 * 4  # 8-voxel windows, stride 6
    assert all(r["seconds"] > 0 and r["peak_memory_mb"] > 0 and r["seam_ratio"] > 0 for r in sizes)
    assert sizes[1]["output_mb"] == pytest.approx(2 * sizes[0]["output_mb"])
    json.dumps(res)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctpa2")
    src = write_phantom_ctpa_studies(root / "src", n=8, shape=(32, 32, 24), spacing_mm=8.0)
    prepare_ctpa(src / "studies", root / "data", shape=(32, 32, 24), labels=src / "labels.csv", xray_size=32,
                 fractions=(0.5, 0.25, 0.25))
    common = {"dataset_dir": str(root / "data"), "models_dir": str(root / "models"),
              "output_dir": str(root / "eval"), "num_workers": 0}
    run_bundle("xray2ctpa_vqgan", ["train.json"], "training", {**common, **VQ_TINY})
    over = {**common, **DENOISER_TINY, "xray_size": 32, "epochs": 1, "val_steps": 2}
    monai_bundle_run("xray2ctpa_vqgan", "training", ["train_diffusion.json"], over)
    run_bundle("xray2ctpa_vqgan", ["train_classifier.json"], "training", {**common, **CLASSIFIER_TINY, "epochs": 1,
                                                                          "batch_size": 2})
    return root, common


def test_diffusion_checkpoint_records_what_generation_needs(stage2):
    root, _ = stage2
    meta = read_checkpoint_meta(root / "models" / "ldm.pt")
    assert meta["volume_shape"] == [32, 32, 24] and meta["latent_shape"] == [8, 8, 6]
    assert meta["spacing_mm"] == pytest.approx([8.0, 8.0, 8.0]) and meta["xray_size"] == 32
    assert meta["scale_factor"] > 0 and meta["network_config"]["latent_channels"] == 8
    hist = json.loads((root / "eval" / "ldm" / "history.json").read_text())["epochs"]
    assert "val_psnr" in hist[0] and "loss_mse" in hist[0]
    assert read_checkpoint_meta(root / "models" / "classifier.pt")["key_metric"] == "val_auc"


def test_judged_generation_reports_auc_and_image_metrics(stage2):
    root, common = stage2
    ckpt = str(root / "models" / "ldm.pt")
    report = run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "evaluate_generation.json"], "evaluate", {
        **common, **checkpoint_settings("xray2ctpa_vqgan", ckpt, role="ldm"), **CLASSIFIER_TINY, "eval_steps": 2,
        "eval_previews": 1, "eval_guidance_sweep": [1.0, 3.0]})[0]
    s = report["summary"]
    assert s["cases"] == len(load_datalist(root / "data" / "datalist.json", "test")) and s["window_hu"] == [-1000.0, 1000.0]
    assert np.isfinite(s["psnr"]) and -1 <= s["ssim"] <= 1 and "auc_real" in s and "auc_generated" in s
    assert s["n_judged"] == s["labelled_cases"] and {"auc_real_ci", "auc_generated_ci"} <= set(s)
    sweep = {r["guidance"]: r for r in s["guidance_sweep"]}  # every case again at each scale, same seeds
    assert set(sweep) == {1.0, 3.0} and all(np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 for r in sweep.values())
    assert s["guidance_spread_db"] == pytest.approx(abs(sweep[1.0]["psnr"] - sweep[3.0]["psnr"]))
    assert s["guidance"] == 1.0 and sweep[1.0]["psnr"] == pytest.approx(s["psnr"], abs=1e-4)  # same scale, seeds
    for name in ("real", "generated"):  # an interval around each defined AUC, or none without one
        auc, ci = s[f"auc_{name}"], s[f"auc_{name}_ci"]
        assert (ci is None) if auc is None else (0 <= ci[0] <= auc <= ci[1] <= 1)
    assert s["minus_mean_volume_psnr_db"] == pytest.approx(s["psnr"] - s["mean_volume_psnr"])
    assert np.isfinite(s["vqgan_ceiling_psnr"]) and all("vqgan_ceiling" in c for c in report["cases"])
    assert all(0 <= c["p_pe_real"] <= 1 and 0 <= c["p_pe_generated"] <= 1 for c in report["cases"])
    gen = load_volume(report["cases"][0]["written"])
    assert tuple(gen.shape) == (1, 32, 32, 24)
    assert (root / "eval" / "generation" / "metrics.md").is_file()
    assert len(list((root / "eval" / "generation" / "previews").glob("*.png"))) == 1


def test_regression_baseline_trains_through_its_override_and_is_judged(stage2):
    """regression.json: the same network and conditioning trained to the clean latents, published apart, recorded
    as such, and judged with one pass (no guidance sweep)."""
    root, common = stage2
    over = {**common, **DENOISER_TINY, "xray_size": 32, "epochs": 1, "val_steps": 2}
    run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "regression.json"], "training", over)
    ckpt = root / "models" / "regression.pt"
    meta = read_checkpoint_meta(ckpt)
    assert meta["objective"] == "regression" and (root / "models" / "ldm.pt").is_file()
    assert meta["network_config"]["conditioning"] == "aligned+tokens"
    report = run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "evaluate_generation.json"], "evaluate", {
        **common, **checkpoint_settings("xray2ctpa_vqgan", str(ckpt), role="ldm"), **CLASSIFIER_TINY,
        "ldm_checkpoint": str(ckpt), "eval_steps": 2, "eval_previews": 0, "eval_guidance_sweep": [1.0, 3.0],
        "output_dir": str(root / "eval" / "regression_judge")})[0]
    s = report["summary"]
    assert s["objective"] == "regression" and "guidance_sweep" not in s and np.isfinite(s["psnr"])


def test_ctsynth_generate_from_a_png(stage2, tmp_path):
    root, _ = stage2
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    img, _ = load_projection(case["xray"])
    png = tmp_path / "cxr.png"
    Image.fromarray((normalize_radiograph(img).clamp(0, 1) * 65535).numpy().astype(np.uint16)).save(png)
    out = tmp_path / "ctpa.nii.gz"
    cli_main(["generate", str(png), "--out", str(out), "--models-dir", str(root / "models"), "--steps", "2",
              "--guidance", "2", "--samples", "2", "--preview", str(tmp_path / "ctpa.png")])
    vol = load_volume(out)
    assert tuple(vol.shape) == (1, 32, 32, 24) and float(vol.min()) >= -1000.5 and float(vol.max()) <= 1000.5
    assert torch.allclose(torch.as_tensor(vol.affine).diagonal()[:3].abs().double(), torch.full((3,), 8.0, dtype=torch.float64))
    report = json.loads((tmp_path / "ctpa.json").read_text())
    assert report["steps"] == 2 and report["guidance"] == 2.0 and report["samples"] == 2 and report["mean_std_hu"] >= 0
    assert load_volume(tmp_path / "ctpa_std.nii.gz").shape == vol.shape and (tmp_path / "ctpa.png").stat().st_size > 1000


def test_ctsynth_generate_a_larger_grid_in_windows(stage2, tmp_path, capsys):
    """--shape beyond the training grid (32 x 32 x 24 at 8 mm): the denoiser's latent grid becomes the window; the
    output has the requested shape, centred, and the report names the windows and the seam ratio."""
    root, _ = stage2
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    out = tmp_path / "big.nii.gz"
    cli_main(["generate", case["xray"], "--out", str(out), "--models-dir", str(root / "models"), "--steps", "2",
              "--shape", "32,32,48", "--overlap", "0.5"])
    vol = load_volume(out)
    assert tuple(vol.shape) == (1, 32, 32, 48) and torch.isfinite(vol.as_tensor()).all()
    centre = torch.as_tensor(vol.affine).double() @ torch.tensor([15.5, 15.5, 23.5, 1.0], dtype=torch.float64)
    assert torch.allclose(centre[:3], torch.zeros(3, dtype=torch.float64), atol=1e-4)
    report = json.loads((tmp_path / "big.json").read_text())
    trained = read_checkpoint_meta(root / "models" / "ldm.pt")["latent_shape"]
    assert report["latent_window"] == trained and report["windows"] > 1 and report["seam_ratio"] > 0
    refused(capsys, ["generate", case["xray"], "--out", str(tmp_path / "bad.nii.gz"), "--models-dir",
                     str(root / "models"), "--shape", "32,0,8"], "--shape must be between", status=2)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_generate_names_a_missing_checkpoint(tmp_path, capsys):
    png = tmp_path / "cxr.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    refused(capsys, ["generate", str(png), "--out", str(tmp_path / "o.nii.gz"), "--models-dir", str(tmp_path)], "ldm.pt")


def test_lora_fine_tuning_trains_adapters_and_generates(stage2, tmp_path):
    root, common = stage2
    ckpt = str(root / "models" / "ldm.pt")
    over = {**common, **checkpoint_settings("xray2ctpa_vqgan", ckpt, role="ldm"), "xray_size": 32, "epochs": 1,
            "val_steps": 2, "lora_rank": 2}
    run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "lora.json"], "training", over)
    tuned = root / "models" / "ldm_lora.pt"
    meta = read_checkpoint_meta(tuned)
    assert meta["network_config"]["lora"]["rank"] == 2
    assert meta["scale_factor"] == pytest.approx(read_checkpoint_meta(ckpt)["scale_factor"])
    weights = torch.load(tuned, weights_only=True)["network"]
    assert any(k.endswith("lora_b") for k in weights)
    base = torch.load(ckpt, weights_only=True)["network"]
    frozen = [k for k in base if k.endswith("to_q.weight")][0].replace("to_q.weight", "to_q.base.weight")
    assert torch.equal(weights[frozen], base[frozen.replace(".base", "")])  # the base stayed frozen
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    rep = run_bundle("xray2ctpa_vqgan", ["inference.json"], "inference", {
        "models_dir": str(root / "models"), "input": case["xray"], "output": str(tmp_path / "lora.nii.gz"), "steps": 2,
        **checkpoint_settings("xray2ctpa_vqgan", tuned, role="ldm")})[0]
    assert load_volume(rep["written"]).shape == (1, 32, 32, 24)


def test_diffusion_trains_under_torchrun(stage2):
    root, common = stage2
    over = {**common, **DENOISER_TINY, "xray_size": 32, "epochs": 1, "val_steps": 2, "batch_size": 1,
            "models_dir": str(root / "models_ddp"), "output_dir": str(root / "eval_ddp"),
            "vqgan_path": str(root / "models" / "vqgan.pt")}
    monai_bundle_run("xray2ctpa_vqgan", "training", ["train_diffusion.json", "multi_gpu_train.json"], over, torchrun=True)
    last = torch.load(root / "models_ddp" / "ldm" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1 and not any(k.startswith("module.") for k in last["network"])
    assert read_checkpoint_meta(root / "models_ddp" / "ldm.pt")["latent_shape"] == [8, 8, 6]


def test_demo_runs_every_stage_and_reports_the_checks(tmp_path):
    from ctsynth.demo import DEMOS

    tiny = {"vqgan": (1, 2, 2, 1e-3), "diffusion": (1, 2, 2, 1e-3), "regression": (1, 2, 2, 1e-3),
            "classifier": (1, 0, 2, 1e-3), "steps": 2}
    summary = DEMOS["xray2ctpa_vqgan"](tmp_path, n_cases=8, shape=(32, 32, 24), spacing=8.0, large_shape=(40, 40, 32),
                                       schedule=tiny, conditioning="aligned")
    saved = json.loads((tmp_path / "xray2ctpa_vqgan" / "metrics.json").read_text())
    assert saved["checks"] == summary["checks"] and set(saved["timings"]) >= {"train_vqgan_s", "total_s"}
    c = summary["checks"]
    assert isinstance(c["vqgan_psnr_ge_28db"], bool) and 0 < c["codebook_usage_pct"] <= 100
    assert np.isfinite(c["patchwise_minus_whole_db_large"]) and summary["large_phantom"]["shape"] == [40, 40, 32]
    assert load_volume(summary["inference"]["written"]).shape == (1, 32, 32, 24)
    assert (tmp_path / "xray2ctpa_vqgan" / "eval" / "large_phantom.png").is_file()
    assert c["conditioning"] == "aligned" and summary["regression"]["objective"] == "regression"
    assert "auc_xray_only" in c and (tmp_path / "xray2ctpa_vqgan" / "models" / "xray_classifier.pt").is_file()
    assert all(0 <= row["p_pe_xray_only"] <= 1 for row in json.loads(
        (tmp_path / "xray2ctpa_vqgan" / "eval" / "generation" / "metrics.json").read_text())["cases"])
    assert c["generated_minus_regression_db"] == pytest.approx(c["generated_psnr_db"] - c["regression_psnr_db"])
    assert c["generated_minus_vqgan_ceiling_db"] == pytest.approx(c["generated_psnr_db"] - c["vqgan_ceiling_psnr_db"])
    assert isinstance(c["generated_beats_mean_volume_by_2db"], bool) and c["n_judged"] == summary["generation"]["n_judged"]
    with pytest.raises(ValueError, match="conditioning must be one of"):
        DEMOS["xray2ctpa_vqgan"](tmp_path / "bad", conditioning="rays")
    assert not (tmp_path / "bad").exists()  # refused before anything is written


@pytest.mark.parametrize("volume, downsample, multiple", [((32, 32, 24), 4, 2), ((30, 33, 17), 4, 4), ((64, 64, 64), 8, 1)])
def test_latent_shape_of_is_what_encoding_returns(volume, downsample, multiple):
    torch.manual_seed(0)
    channels = {4: [4, 8, 8], 8: [4, 8, 8, 8]}[downsample]
    vq = VQGAN3D(1, channels, 1, num_embeddings=8, embedding_dim=4, norm_groups=2).eval()
    encoded = _diff.encode_latents(vq, torch.rand(1, 1, *volume), multiple)
    assert list(encoded.shape[-3:]) == _diff.latent_shape_of(volume, downsample, multiple)


def test_monai_label_contract_serves_what_the_cli_writes(stage2, tmp_path):
    """MONAI Label's request path (conftest.serve_like_monai_label, weights models/ldm.pt) on a chest X-ray gives the
    CTPA ``inference.json``'s own run writes for the same seed."""
    root, _ = stage2
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    ckpt = root / "models" / "ldm.pt"
    settings = {"steps": 2, "guidance": 2.0, "seed": 5}
    pred, expected, parser = served_and_written("xray2ctpa_vqgan", root / "models", case["xray"], tmp_path, settings,
                                                {"checkpoint": str(ckpt), "vqgan_path": str(root / "models" / "vqgan.pt")}, "ldm")
    assert tuple(pred.shape) == (1, 32, 32, 24) == tuple(expected.shape)
    assert torch.allclose(pred.as_tensor(), expected.as_tensor(), atol=1e-2)
    assert parser.get_parsed_content("xray_size") == 32


def test_verify_net_in_out_and_torchscript_export(stage2, tmp_path, capsys):
    """``ctsynth bundle verify`` runs MONAI's verify_net_in_out and ckpt_export for the VQ-GAN (traced, reconstruction
    only) and the PE classifier (scripted); the TorchScript files hold metadata.json and the configs and compute
    what the trained networks compute."""
    from monai.data import load_net_with_metadata

    from ctsynth.bundles import verify_bundle
    from ctsynth.engine import load_network_weights

    root, _ = stage2
    vq_over = {k: v for k, v in VQ_TINY.items() if k.startswith("network_def#")}
    ldm = root / "models" / "ldm.pt"
    ldm_over = {"network_def": checkpoint_config("xray2ctpa_vqgan", ldm, role="ldm")["network_def"],
                "_meta_#network_data_format#inputs#image#num_channels": VQ_TINY["network_def#embedding_dim"],
                "_meta_#network_data_format#outputs#pred#num_channels": VQ_TINY["network_def#embedding_dim"]}
    report = verify_bundle("xray2ctpa_vqgan", export_dir=tmp_path / "ts", models_dir=root / "models",
                           overrides={"network_def": vq_over, "classifier_def": CLASSIFIER_TINY,
                                      "network_def (inference.json)": ldm_over},
                           forward_args={"network_def (inference.json)": {"xray": (1, 1, 32, 32)}})
    assert report["networks"] == {"network_def": {"verified": True, "exported": str(tmp_path / "ts" / "vqgan.ts")},
                                  "classifier_def": {"verified": True,
                                                     "exported": str(tmp_path / "ts" / "classifier.ts")},
                                  "network_def (inference.json)": {"verified": True}}  # the denoiser: checked only
    assert "network_def (inference.json)" in report["not_exported"]

    vq_mod = bundle_module("xray2ctpa_vqgan", "vqgan")
    meta = read_checkpoint_meta(root / "models" / "vqgan.pt")
    eager = vq_mod.VQGAN3DReconstructor(**meta["network_config"]).eval()
    load_network_weights(eager, root / "models" / "vqgan.pt")
    ts, ts_meta, extra = load_net_with_metadata(str(tmp_path / "ts" / "vqgan.ts"), more_extra_files=("train.json",))
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ts(x), eager(x), atol=1e-5)
    assert ts_meta["version"] and "vqgan_data_format" in ts_meta and "network_def" in json.loads(extra["train.json"])

    from monai.networks.nets import ResNet

    clf = ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8], spatial_dims=3, n_input_channels=1,
                 num_classes=1).eval()
    load_network_weights(clf, root / "models" / "classifier.pt")
    ts_clf, _, _ = load_net_with_metadata(str(tmp_path / "ts" / "classifier.ts"))
    v = torch.rand(1, 1, 32, 32, 24)
    with torch.no_grad():
        assert torch.allclose(ts_clf(v), clf(v), atol=1e-5)

    # the command line prints the same report; metadata is checked when a schema copy is given
    from ctsynth.cli import main as cli

    schema = Path(__file__).resolve().parents[2] / "shared" / "monai-schema" / "meta_schema_20240725.json"
    if schema.is_file():
        local = tmp_path / "schema.json"
        local.write_text(schema.read_text())
        capsys.readouterr()
        cli(["bundle", "verify", "cascade_xray2ct", "--schema", str(local)])
        out = json.loads(capsys.readouterr().out)
        assert out["metadata"] == "valid" and "skipped" in out["networks"]["network_def"]
        assert "network_def (any geometry)" in out["not_exported"]

    with pytest.raises(FileNotFoundError, match="classifier.pt not found"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "vqgan.pt").write_bytes((root / "models" / "vqgan.pt").read_bytes())
        verify_bundle("xray2ctpa_vqgan", export_dir=tmp_path / "ts2", models_dir=empty,
                      overrides={"network_def": vq_over, "classifier_def": CLASSIFIER_TINY})


def test_ctsynth_bench_generate_writes_json(tmp_path, capsys):
    out = tmp_path / "generate.json"
    cli_main(["bench", "generate", "--sizes", "32,32,32", "--train-shape", "16", "--spacing", "5", "--small",
              "--steps", "1", "--xray-size", "32", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [r["shape"] for r in res["sizes"]] == [[32, 32, 32]] and res["sizes"][0]["windows"] == 27
    assert res["denoiser"]["conditioning"] == "aligned+tokens" and res["train_shape"] == [16, 16, 16]
