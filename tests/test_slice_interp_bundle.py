"""slice_interp_ldm bundle on tiny phantom pairs: conditioning geometry, latent cache, denoiser and DDIM sampling,
autoencoder and diffusion training through `monai.bundle run` (resume), evaluation, inference and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from conftest import refused, monai_bundle_run, served_and_written

from ctsynth.bundles import bundle_module, bundle_root, checkpoint_config, checkpoint_rules, checkpoint_settings, run_bundle
from ctsynth.cli import main
from ctsynth.engine import read_checkpoint_meta
from ctsynth.io import load_volume
from ctsynth.maisi import LatentCodec
from ctsynth.phantoms import grid_affine
from ctsynth.prepare import load_datalist, prepare_phantom_pairs
from ctsynth.slices import thick_consistency, thin_grid_offset_mm

ROOT = Path(bundle_root("slice_interp_ldm"))
CONFIGS = ROOT / "configs"
ThickConditioner = bundle_module("slice_interp_ldm", "latents").ThickConditioner
_sampling = bundle_module("slice_interp_ldm", "sampling")
Denoiser, LatentDiffusionSampler = _sampling.Denoiser, _sampling.LatentDiffusionSampler
DiffusionIteration = bundle_module("slice_interp_ldm", "engine").DiffusionIteration

AE = {"num_channels": [4, 8, 8], "norm_num_groups": 4, "num_splits": 1}
UNET = {"network_def#channels": [8, 8, 8, 8], "network_def#attention_levels": [False, True, False, False],
        "network_def#num_head_channels": 8, "network_def#norm_num_groups": 4, "network_def#num_res_blocks": 1}


class PoolingAutoencoder(nn.Module):
    """Stand-in encoder with a known latent: ``downsample``x average pooling (decode: nearest upsampling)."""

    def __init__(self, downsample: int = 4) -> None:
        super().__init__()
        self.downsample = downsample

    def encode(self, x):
        z = F.avg_pool3d(x, self.downsample)
        return z, torch.ones_like(z)

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.downsample, mode="nearest")


def _linear_in_z(n, spacing, origin_z=0.0):
    z = origin_z + torch.arange(n, dtype=torch.float32) * spacing
    aff = grid_affine((8, 8, n), (4.0, 4.0, spacing))
    aff[2, 3] = origin_z
    return MetaTensor((-900 + 8 * z).expand(1, 8, 8, n).clone(), affine=aff)


@pytest.mark.parametrize("mode,factor", [("latent", 4), ("image", 4), ("latent", 2), ("image", 2)])
def test_conditioning_lands_on_the_thin_latent_grid(mode, factor):
    # HU linear in z: slab averages and pooled latents are exact samples of the same line, so the conditioning
    # must equal the thin series' own latents wherever it interpolates (the last latent may extrapolate)
    thin = _linear_in_z(80, 1.0)
    thick = _linear_in_z(16, 5.0, origin_z=2.0)  # 5 mm slabs centred 2 mm after the first thin slice
    codec = LatentCodec(PoolingAutoencoder(factor), chunk=256)
    # thin grid of 76 slices from z = 4 mm: 2 mm after the first thick slice centre
    cond = ThickConditioner(codec, mode)(thick, 1.0, count=76, offset_mm=2.0)
    z_thin = codec.encode(((thin.as_tensor()[..., 4:80] + 1000) / 2000)[None])
    assert cond.shape == z_thin.shape == (1, 1, 8 // factor, 8 // factor, 76 // factor)
    inner = slice(4 // factor, -8 // factor)  # the first 4 and last 8 thin slices: cubic needs neighbours there
    assert torch.allclose(cond[..., inner], z_thin[..., inner], atol=1e-5), (cond[0, 0, 0, 0], z_thin[0, 0, 0, 0])


def test_conditioning_rejects_unknown_modes_and_2d_input():
    codec = LatentCodec(PoolingAutoencoder(), chunk=16)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ThickConditioner(codec, "crossattn")
    with pytest.raises(ValueError, match=r"\(1, X, Y, Z\)"):
        ThickConditioner(codec)(MetaTensor(torch.zeros(8, 8, 8)), 1.0, 8)


def test_sampler_covers_any_depth_in_windows():
    torch.manual_seed(0)
    net = Denoiser(4, channels=[8, 8, 8], attention_levels=[False, False, False], num_res_blocks=1,
                   norm_num_groups=4, num_head_channels=8)
    assert net.multiple == 4 and net.config["latent_channels"] == 4
    sched = DDIMScheduler(1000, clip_sample=False)
    cond = torch.randn(1, 4, 6, 6, 13)  # odd sizes: padded inside, cropped back
    windowed = LatentDiffusionSampler(net, sched, 3, window=8, progress=False)
    whole = LatentDiffusionSampler(net, sched, 3, window=None, progress=False)
    noise = torch.randn(1, 4, 6, 6, 13)
    a, b = windowed(cond, noise=noise), whole(cond, noise=noise)
    assert a.shape == cond.shape and torch.isfinite(a).all()
    assert not torch.equal(a, cond)
    assert (a - b).abs().mean() < 0.5 * b.abs().mean()  # windows blend into nearly the whole-volume result
    with pytest.raises(ValueError, match="multiple of 4"):
        LatentDiffusionSampler(net, sched, 3, window=6)
    with pytest.raises(ValueError, match="spatial_dims is fixed"):
        Denoiser(4, spatial_dims=2)


def test_residual_denoiser_starts_at_the_conditioning_and_needs_clean_latent_prediction():
    torch.manual_seed(0)
    args = dict(channels=[8, 8, 8], attention_levels=[False, False, False], num_res_blocks=1, norm_num_groups=4)
    residual, plain = Denoiser(4, residual=True, **args), Denoiser(4, **args)
    plain.load_state_dict(residual.state_dict())  # the same weights, the same state-dict keys
    x, t = torch.randn(2, 8, 8, 8, 8), torch.tensor([999, 3])
    with torch.no_grad():
        assert torch.equal(plain(x, t), torch.zeros(2, 4, 8, 8, 8))  # MONAI zero-initialises the output layer
        assert torch.equal(residual(x, t), x[:, 4:])  # so an untrained residual denoiser returns the conditioning
    # DDIM from pure noise with clean-latent prediction lands on what the denoiser predicts: the conditioning
    cond = torch.randn(1, 4, 8, 8, 8)
    sample = LatentDiffusionSampler(residual, DDIMScheduler(1000, clip_sample=False, prediction_type="sample"), 5,
                                    window=None, progress=False)(cond, noise=torch.randn(1, 4, 8, 8, 8))
    assert torch.allclose(sample, cond, atol=1e-5)
    with torch.no_grad():
        torch.nn.init.normal_(plain.out[2].conv.weight)
        residual.load_state_dict(plain.state_dict())
        assert torch.allclose(residual(x, t), plain(x, t) + x[:, 4:])
    assert residual.config["residual"] is True and plain.config["residual"] is False
    with pytest.raises(ValueError, match="use prediction_type 'sample' \\(the scheduler's is 'epsilon'\\)"):
        LatentDiffusionSampler(residual, DDIMScheduler(1000, clip_sample=False), 5)
    with pytest.raises(TypeError, match="residual must be true or false"):
        Denoiser(4, residual="false", **args)


def test_default_denoiser_attends_in_linear_memory():
    """inference.json's denoiser runs every attention block through PyTorch's scaled-dot-product attention (memory
    linear in the tokens: the declared 128x128x16 window fits, see ``ctsynth bench diffusion --phases sample``) and
    computes what the quadratic path computes with the same weights; at a small shape, the same code path."""
    from monai.networks.blocks.selfattention import SABlock

    args = {k: v for k, v in ConfigParser.load_config_file(CONFIGS / "inference.json")["network_def"].items()
            if k != "_target_"}
    small = {**args, "channels": [16, 32, 32, 32], "num_head_channels": 8, "norm_num_groups": 8}
    torch.manual_seed(0)
    net = Denoiser(**small).eval()
    blocks = [m for m in net.modules() if isinstance(m, SABlock)]
    assert blocks and all(b.use_flash_attention for b in blocks) and net.config["use_flash_attention"] is True
    quadratic = Denoiser(**small, use_flash_attention=False).eval()
    quadratic.load_state_dict(net.state_dict())
    x, t = torch.randn(1, 8, 16, 16, 8), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(net(x, t), quadratic(x, t), atol=1e-4)


def test_inference_matches_training_and_seed_network():
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    infer = ConfigParser.load_config_file(CONFIGS / "inference.json")
    assert train["network_def"] == infer["network_def"]
    for k in checkpoint_rules("slice_interp_ldm", "model")["config_keys"]:
        assert train[k] == infer[k], k
    assert train["network_def"]["channels"] == [192, 384, 768, 768]  # the seed's "medium" UNet
    assert train["num_train_timesteps"] == 1000 and infer["inference_steps"] == 50
    assert train["image_loss_weights"] == {"vgg": 0.1, "ms_ssim": 0.1} and train["image_loss_interval"] == 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("slice_interp")
    prep = prepare_phantom_pairs(root / "data", n=6, shape=(32, 32, 44), spacing_mm=4.0, fractions=(0.5, 0.25, 0.25))
    assert prep["splits"] == {"training": 3, "validation": 2, "test": 1} or sum(prep["splits"].values()) == 6
    common = {"dataset_dir": str(root / "data"), "models_dir": str(root / "models"), "output_dir": str(root / "eval"),
              "num_workers": 0, "autoencoder_args": AE, "vgg_random_init": True}
    run_bundle("slice_interp_ldm", ["train_autoencoder.json"], "training", {
        **common, "epochs": 1, "patch_size": [16, 16, 16], "val_patch_size": [32, 32, 32], "adversarial_start": 1,
        "discriminator#channels": 4, "discriminator#num_layers_d": 2, "pixel_loss": "mse",
        "lr_final_fraction": 0.1})
    over = {**common, **UNET, "epochs": 1, "crop_depth": 8, "sampler_window": 8, "val_steps": 2,
            "image_loss_interval": 1, "codec_chunk": 16}
    monai_bundle_run("slice_interp_ldm", "training", ["train.json"], over)
    return root, common, over


def test_training_writes_checkpoints_cache_and_resumes(trained):
    root, common, over = trained
    meta = read_checkpoint_meta(root / "models" / "model.pt")
    assert meta["conditioning"] == "latent" and meta["prediction_type"] == "epsilon" and meta["scale_factor"] > 0
    assert meta["network_config"]["channels"] == [8, 8, 8, 8]
    ae_meta = read_checkpoint_meta(root / "models" / "autoencoder.pt")
    assert ae_meta["network_config"] == AE  # the autoencoder file rebuilds itself
    ae_hist = json.loads((root / "eval" / "autoencoder" / "history.json").read_text())["epochs"][-1]
    assert {"loss_mse", "loss_kl", "loss_adv"} <= set(ae_hist) and "loss_l1" not in ae_hist  # pixel_loss is wired
    assert ae_hist["lr"] == pytest.approx(1e-5)  # cosine decay over the epochs to lr_final_fraction x 1e-4
    index = json.loads((root / "data" / "latents" / "index.json").read_text())
    assert index["signature"]["conditioning"] == "latent" and index["scale_factor"] == pytest.approx(meta["scale_factor"])
    first = torch.load(root / "models" / "diffusion" / "checkpoint_last.pt", weights_only=True)["trainer"]
    stamp = {p: p.stat().st_mtime_ns for p in (root / "data" / "latents").rglob("*.pt")}
    run_bundle("slice_interp_ldm", ["train.json"], "training", {**over, "epochs": 2})
    second = torch.load(root / "models" / "diffusion" / "checkpoint_last.pt", weights_only=True)["trainer"]
    assert second == {"epoch": 2, "iteration": 2 * first["iteration"]}
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # latents were reused, not re-encoded
    hist = json.loads((root / "eval" / "diffusion" / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [1, 2] and "val_psnr" in hist[-1] and "loss_image_vgg" in hist[-1]


def test_two_level_autoencoder_and_residual_denoiser_train_and_evaluate_end_to_end(tmp_path):
    """An autoencoder of two levels compresses 2x: the latent cache, the conditioning, the denoiser's training and
    the evaluation follow its compression; a residual denoiser's checkpoint rebuilds a residual denoiser."""
    prepare_phantom_pairs(tmp_path / "data", n=6, shape=(16, 16, 44), spacing_mm=4.0, fractions=(0.5, 0.25, 0.25))
    common = {"dataset_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "models"),
              "output_dir": str(tmp_path / "eval"), "num_workers": 0, "vgg_random_init": True,
              "autoencoder_args": {"num_channels": [4, 8], "norm_num_groups": 4, "num_splits": 1}}
    run_bundle("slice_interp_ldm", ["train_autoencoder.json"], "training", {
        **common, "epochs": 1, "train#trainer#epoch_length": 2, "patch_size": [16, 16, 16],
        "val_patch_size": [16, 16, 44], "perceptual_weight": 0.0, "adversarial_start": 10 ** 9})
    over = {**common, **UNET, "epochs": 1, "train#trainer#epoch_length": 2, "crop_depth": 8, "sampler_window": 8,
            "val_steps": 2, "image_loss_interval": 1, "codec_chunk": 16, "conditioning": "image",
            "prediction_type": "sample", "network_def#residual": True}
    run_bundle("slice_interp_ldm", ["train.json"], "training", over)
    index = json.loads((tmp_path / "data" / "latents" / "index.json").read_text())
    pair = torch.load(tmp_path / "data" / "latents" / index["splits"]["test"][0]["latent"], weights_only=True)
    thin_slices = index["splits"]["test"][0]["thin_slices"]
    assert pair["thin"].shape == pair["cond"].shape == (4, 8, 8, -(-thin_slices // 2))
    settings = checkpoint_settings("slice_interp_ldm", tmp_path / "models" / "model.pt")
    assert settings["network_def"].residual is True and settings["prediction_type"] == "sample"
    report = run_bundle("slice_interp_ldm", ["train.json", "evaluate.json"], "evaluate", {
        **over, **settings, "eval_methods": ["cubic", "vae_ceiling", "ldm"]})[0]
    rows = {r["method"]: r for r in report["summary"] if r["window"] == [-1000.0, 1000.0] and r["mode"] == "3d"}
    assert set(rows) == {"cubic", "vae_ceiling", "ldm"} and all(math.isfinite(r["psnr"]) for r in rows.values())
    with pytest.raises(ValueError, match="use prediction_type 'sample'"):
        run_bundle("slice_interp_ldm", ["train.json"], "training", {**over, "prediction_type": "epsilon",
                                                                    "resume": False, "ckpt_dir": str(tmp_path / "e")})


def test_evaluation_compares_every_method(trained):
    root, common, over = trained
    ckpt = root / "models" / "model.pt"
    report = run_bundle("slice_interp_ldm", ["train.json", "evaluate.json"], "evaluate", {
        **over, **checkpoint_settings("slice_interp_ldm", ckpt), "inference_steps": 2, "self_supervised_steps": 5,
        "eval_methods": ["linear", "cubic", "vae_ceiling", "ldm", "self_supervised", "ldm_consistent", "cubic_consistent"]})[0]
    methods = ("linear", "cubic", "vae_ceiling", "ldm", "self_supervised", "ldm_consistent", "cubic_consistent")
    combos = {(r["method"], tuple(r["window"]), r["mode"]) for r in report["summary"]}
    assert combos == {(m, w, mode) for m in methods for w in ((-1024.0, 3071.0), (-1000.0, 1000.0))
                      for mode in ("3d", "per-slice")}
    rows = {(r["method"], r["mode"]): r for r in report["summary"] if r["window"] == [-1000.0, 1000.0]}
    assert rows[("cubic", "3d")]["psnr"] > 20 and rows[("cubic", "3d")]["psnr"] >= rows[("linear", "3d")]["psnr"] - 0.5
    # a 1-epoch model decodes far below cubic; the thick series' band brings it to within reach of cubic
    assert rows[("ldm_consistent", "3d")]["psnr"] > rows[("ldm", "3d")]["psnr"] + 1.0
    assert rows[("cubic_consistent", "3d")]["psnr"] != rows[("cubic", "3d")]["psnr"]
    for f in ("metrics.json", "metrics.md"):
        assert (root / "eval" / f).stat().st_size > 100
    assert all(Path(c["reformat_png"]).stat().st_size > 1000 for c in report["cases"])
    hu = {r["method"]: r for r in report["hu_fidelity"]}  # HU bias by tissue and LAA-950 beside PSNR, every method
    assert set(hu) == set(methods)
    assert all(isinstance(hu[m]["soft_tissue_shift_hu"], float) and "laa950_diff_pct" in hu[m] for m in methods)
    assert "LAA-950" in (root / "eval" / "metrics.md").read_text()
    with pytest.raises(ValueError, match="unknown evaluation methods"):
        run_bundle("slice_interp_ldm", ["train.json", "evaluate.json"], "evaluate", {**over, "eval_methods": ["sinc"]})


def test_cli_interpolates_with_samples_and_uncertainty(trained, tmp_path, capsys):
    root, common, over = trained
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    out = tmp_path / "thin.nii.gz"
    main(["interpolate", case["thick"], "--out", str(out), "--method", "ldm", "--spacing", "2.0", "--samples", "2",
          "--checkpoint", str(root / "models" / "model.pt"), "--autoencoder", str(root / "models" / "autoencoder.pt"),
          "--inference-steps", "2", "--dicom-out", str(tmp_path / "dicom")])
    report = json.loads(capsys.readouterr().out)
    thick = load_volume(case["thick"])
    expected = thick.shape[3] * 10  # 20 mm slices -> 2 mm, over the slabs' whole extent
    vol, std = load_volume(out), load_volume(report["uncertainty"])
    assert vol.shape[1:] == (32, 32, expected) and std.shape == vol.shape and float(std.min()) >= 0
    assert float(std.mean()) > 0  # two samples differ
    assert report["dicom_files"] == expected and report["consistency"] is False
    # --consistency: the same sample given the thick series' band
    args = [case["thick"], "--method", "ldm", "--spacing", "2.0", "--checkpoint", str(root / "models" / "model.pt"),
            "--autoencoder", str(root / "models" / "autoencoder.pt"), "--inference-steps", "2"]
    reports = []
    for name, extra in (("raw", []), ("tc", ["--consistency"])):
        main(["interpolate", *args, "--out", str(tmp_path / f"{name}.nii.gz"), *extra])
        reports.append(json.loads(capsys.readouterr().out))
    assert [r["consistency"] for r in reports] == [False, True]
    raw, tc = load_volume(tmp_path / "raw.nii.gz"), load_volume(tmp_path / "tc.nii.gz")
    assert torch.allclose(tc.as_tensor(), thick_consistency(raw, thick).as_tensor(), atol=0.05)
    assert not torch.allclose(tc.as_tensor(), raw.as_tensor(), atol=1.0)
    refused(capsys, ["interpolate", case["thick"], "--out", str(out), "--method", "ldm", "--spacing", "30",
              "--checkpoint", str(root / "models" / "model.pt"), "--autoencoder", str(root / "models" / "autoencoder.pt")], "not finer than")
    refused(capsys, ["interpolate", case["thick"], "--out", str(out), "--samples", "2"], "--samples 2 needs --method ldm")
    refused(capsys, ["interpolate", case["thick"], "--out", str(out), "--method", "ldm",
              "--checkpoint", str(root / "models" / "autoencoder.pt"), "--autoencoder", str(root / "models" / "autoencoder.pt")], "not a slice_interp_ldm diffusion checkpoint")


def test_multi_process_training_with_torchrun(trained):
    root, common, over = trained
    ddp = {**over, "models_dir": str(root / "models_ddp"), "output_dir": str(root / "eval_ddp"), "image_loss_interval": 2,
           "autoencoder_path": str(root / "models" / "autoencoder.pt")}
    monai_bundle_run("slice_interp_ldm", "training", ["train.json", "multi_gpu_train.json"], ddp, torchrun=True)
    last = torch.load(root / "models_ddp" / "diffusion" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1 and any(k.startswith("down_blocks") for k in last["network"])  # unwrapped


def test_monai_label_contract_serves_what_the_cli_writes(trained, tmp_path):
    """The request path of MONAI Label's BundleInferTask (see conftest.serve_like_monai_label) returns the volume
    ``inference.json``'s own run writes for the same input and seed."""
    root, common, over = trained
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    ckpt = root / "models" / "model.pt"
    settings = {"autoencoder_args": AE, "inference_steps": 2,
                "spacing": 2.0, "seed": 3, "codec_chunk": 16, "sampler_window": 8}
    pred, expected, _ = served_and_written("slice_interp_ldm", root / "models", case["thick"], tmp_path, settings,
                                           {"checkpoint": str(ckpt),
                                            "autoencoder_path": str(root / "models" / "autoencoder.pt")})
    assert pred.shape == expected.shape and pred.shape[3] == load_volume(case["thick"]).shape[3] * 10
    assert torch.allclose(pred.as_tensor(), expected.as_tensor(), atol=1e-2)
    assert torch.allclose(torch.as_tensor(pred.affine).double(), torch.as_tensor(expected.affine).double(), atol=1e-4)


def test_denoiser_passes_verify_net_in_out(trained):
    """MONAI's verify_net_in_out on the trained denoiser (input: noisy + conditioning latents, and the timestep)."""
    from ctsynth.bundles import verify_bundle

    root, _, _ = trained
    over = {"network_def": checkpoint_config("slice_interp_ldm", root / "models" / "model.pt")["network_def"]}
    report = verify_bundle("slice_interp_ldm", overrides={"network_def": over})
    assert report["networks"] == {"network_def": {"verified": True}}
    assert set(report["not_exported"]) == {"network_def", "autoencoder"}
    bad = {**over, "_meta_#network_data_format#outputs#pred#num_channels": 3}
    with pytest.raises(ValueError, match="output channel number"):
        verify_bundle("slice_interp_ldm", overrides={"network_def": bad})


def test_refiner_trains_through_monai_bundle_run_resumes_and_serves_the_cli(tmp_path, capsys):
    from ctsynth.metrics import compute_image_metrics
    from ctsynth.slices import interpolate_study, load_refiner

    data = tmp_path / "data"
    prepare_phantom_pairs(data, n=6, shape=(32, 32, 40), spacing_mm=2.0, fractions=(0.5, 0.25, 0.25))
    over = {"dataset_dir": str(data), "models_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval"),
            "patches_per_epoch": 16, "batch_size": 8}  # 2 steps an epoch
    monai_bundle_run("slice_interp_ldm", "training", ["train_refiner.json"], {**over, "epochs": 1})
    history = tmp_path / "eval" / "refiner" / "history.json"
    assert [e["epoch"] for e in json.loads(history.read_text())["epochs"]] == [1]
    last = torch.load(tmp_path / "models" / "refiner" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"] == {"epoch": 1, "iteration": 2} and {"network", "optimizer", "lr_scheduler"} <= set(last)
    res = monai_bundle_run("slice_interp_ldm", "training", ["train_refiner.json"], {**over, "epochs": 2})
    assert "resumed from" in res.stdout + res.stderr
    epochs = json.loads(history.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["val_psnr"] > 15 for e in epochs)
    assert torch.load(tmp_path / "models" / "refiner" / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"] == 4
    assert any((tmp_path / "eval" / "refiner").glob("events.out.tfevents.*"))

    published = tmp_path / "models" / "refiner.pt"
    model = load_refiner(published)
    assert model.spacing_mm == 2.0 and model.norm == "batch" and model.context_rows == 8 and not model.flips
    case = load_datalist(data / "datalist.json", "test")[0]
    out = tmp_path / "thin.nii.gz"
    assert main(["interpolate", case["thick"], "--out", str(out), "--method", "refiner", "--model", str(published),
                 "--spacing", "2"]) == 0
    thin, pred, thick = load_volume(case["thin"]), load_volume(out), load_volume(case["thick"])
    assert tuple(pred.shape) == (1, 32, 32, 5 * thick.shape[3])  # the slabs' whole extent
    first = round(thin_grid_offset_mm(pred, thin) / 2.0)  # the thin series lies inside it
    on_thin = MetaTensor(pred.as_tensor()[..., first:first + thin.shape[3]], affine=thin.affine)
    cubic = interpolate_study(thick, 2.0, "cubic")
    assert not torch.allclose(pred.as_tensor(), cubic.as_tensor(), atol=1.0)  # the refiner changed it
    assert compute_image_metrics(on_thin, thin, window=(-1000, 1000))["psnr"] > 20


def test_refiner_training_refuses_thin_series_of_different_spacings(tmp_path):
    from ctsynth.slices import RefinerPatchDataset

    for name, spacing in (("a", 2.0), ("b", 1.0)):
        prepare_phantom_pairs(tmp_path / name, n=1, shape=(32, 32, 40), spacing_mm=spacing, fractions=(1.0, 0.0, 0.0))
    entries = load_datalist(tmp_path / "a" / "datalist.json") + load_datalist(tmp_path / "b" / "datalist.json")
    with pytest.raises(ValueError, match=r"different slice spacings \(1 mm: .*b.*thin.nii.gz.*2 mm: .*a.*thin"):
        RefinerPatchDataset(entries, progress=False)
    with pytest.raises(ValueError, match="lacks \\['thin'\\]"):
        RefinerPatchDataset([{"id": "x", "thick": entries[0]["thick"]}], progress=False)
    ds = RefinerPatchDataset(entries[:1], patch=24, length=5, progress=False)
    item = ds[0]
    assert len(ds) == 5 and ds.spacing_mm == 2.0 and item["image"].shape == item["label"].shape == (1, 24, 24)
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
