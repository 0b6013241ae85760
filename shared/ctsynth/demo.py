"""``ctsynth demo``: end-to-end runs on built-in phantoms, one per system.

Each demo writes under ``OUT/<name>/`` and ends with ``OUT/<name>/metrics.json``. Bundles register
theirs in :data:`DEMOS` (looked up by ``--bundle``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from tqdm.auto import tqdm

from ctsynth.atomic import atomic_write_json
from ctsynth.drr import DRRProjector, display_image
from ctsynth.engine import read_checkpoint_meta
from ctsynth.geometry import ProjectionGeometry
from ctsynth.io import save_nifti, save_projection_nifti
from ctsynth.metrics import compute_image_metrics
from ctsynth.phantoms import slab_average, thorax_phantom
from ctsynth.plots import save_image_png, save_triplanar_png

__all__ = ["DEMOS", "foundation_demo", "cascade_xray2ct_demo", "slice_interp_ldm_demo", "xray2ctpa_vqgan_demo",
           "run_demo"]

logger = logging.getLogger(__name__)


def foundation_demo(out: str | Path, n: int = 3, shape: Sequence[int] = (128, 128, 128), spacing: float = 3.0,
                    seed: int = 0, **_: Any) -> dict[str, Any]:
    """Phantoms -> NIfTI, AP + lateral DRRs (NIfTI + PNG + geometry.json), previews and a metrics JSON.

    The metrics compare two naive reconstructions with each phantom (they are the floors the bundles
    must beat): 5x slab-averaged slices linearly re-interpolated, and the mean of all phantoms.
    """
    root = Path(out) / "foundation"
    root.mkdir(parents=True, exist_ok=True)
    vols, report = [], {"phantoms": [], "drr": {}, "baselines": {}}
    for i in tqdm(range(n), desc="phantoms", unit="vol"):
        vol, info = thorax_phantom(shape, spacing, seed=seed + i, contrast=(i % 2 == 1), emboli=0.5)
        save_nifti(vol, root / "phantoms" / f"phantom_{i:03d}.nii.gz")
        vols.append(vol)
        report["phantoms"].append({"file": f"phantoms/phantom_{i:03d}.nii.gz", "seed": info.seed,
                                   "contrast": info.contrast, "emboli": info.emboli,
                                   "hu_min": float(vol.min()), "hu_max": float(vol.max())})
    geom = ProjectionGeometry.for_volume(vols[0].affine, shape, views="ap,lateral", detector_shape=(256, 256),
                                         pixel_spacing_mm=float(max(shape) * spacing * 1.3 / 256))
    geom.save_json(root / "drr" / "geometry.json")
    proj = DRRProjector(geom)
    times = []
    for i, vol in enumerate(tqdm(vols, desc="DRRs", unit="vol")):
        t0 = time.perf_counter()
        with torch.no_grad():
            li = proj(vol[None], vol.affine)[0]
        times.append((time.perf_counter() - t0) / geom.num_views)
        for v, name in enumerate(("ap", "lateral")):
            save_projection_nifti(li[v], root / "drr" / f"phantom_{i:03d}_{name}.nii.gz", geom.pixel_spacing_mm.tolist())
            save_image_png(display_image(li[v]), root / "drr" / f"phantom_{i:03d}_{name}.png", 0.0, 1.0)
        save_triplanar_png({"phantom": vol}, root / "previews" / f"phantom_{i:03d}.png", title=f"phantom {i}")
    report["drr"] = {"seconds_per_view_mean": sum(times) / len(times), "geometry": "drr/geometry.json",
                     "max_line_integral": float(li.max())}
    mean_vol = torch.stack([v.as_tensor() for v in vols]).mean(0)
    for name in ("slab5_linear", "mean_volume"):
        rows = []
        for vol in vols:
            if name == "slab5_linear":
                thick = slab_average(vol, 5)
                pred = F.interpolate(thick.as_tensor()[None], size=vol.shape[1:], mode="trilinear",
                                     align_corners=False)[0]
            else:
                pred = mean_vol
            rows.append(compute_image_metrics(pred, vol, window=(-1000, 1000)))
        report["baselines"][name] = {k: sum(r[k] for r in rows) / len(rows) for k in ("psnr", "ssim", "mae")}
        report["baselines"][name].update(window=[-1000, 1000], data_range=2000, mode="3d")
    atomic_write_json(report, root / "metrics.json")
    logger.info("foundation demo written to %s", root)
    return report


#: network and schedule of the cascade demo: small widths and short stages that fit 10 minutes on 2 CPU cores
CASCADE_DEMO_NETWORK = {
    "network_def#encoder_channels": [8, 16, 32], "network_def#hidden": 64, "network_def#depth": [2, 2, 2],
    "network_def#heads": [4, 4, 4], "network_def#patch": [4, 6, 8], "network_def#stem_channels": 16,
    "network_def#xray_token_grid": 8,
}
CASCADE_DEMO_STAGES = (  # (epochs, iterations per epoch (0: whole training set), batch size, learning rate)
    (36, 0, 2, 1e-3), (8, 16, 2, 3e-4), (1, 4, 2, 1e-4),
)
#: the U-Net baseline's loss terms: L1 alone. With stage 1's preset (L1 + SSIM) this U-Net does not learn in the
#: demo's budget, while the cascade does (the bundle docs give the measured curves of both networks with both)
CASCADE_DEMO_BASELINE_LOSSES = {"l1": 1.0}
#: training / validation / test fractions of the demo's phantoms (48: 32 / 4 / 12)
CASCADE_DEMO_SPLIT = (2 / 3, 1 / 12, 1 / 4)
#: the U-Net baseline (``unet_baseline.json``) at the demo's scale: the bundle's widths halved, as the demo cascade
#: halves the bundle cascade's; it trains at stage 1's size with stage 1's schedule
CASCADE_DEMO_BASELINE = {"network_def#encoder_channels": [8, 16, 32], "network_def#features": [8, 16, 32, 64, 128, 8]}


def cascade_xray2ct_demo(out: str | Path, n_phantoms: int = 48, sizes: Sequence[int] = (32, 48, 64), xray_size: int = 128,
                         seed: int = 0, stages: Sequence[Sequence[float]] = CASCADE_DEMO_STAGES, views: int = 2,
                         baseline: bool = True, **_: Any) -> dict[str, Any]:
    """The cascade_xray2ct bundle end to end on phantoms: prepare, train stages 1-3 (and the U-Net baseline),
    evaluate, reconstruct.

    Stage 1 trains on the whole training set; stage 2 refines it for 128 steps, stage 3 runs a few steps to
    exercise the whole cascade (with its gradient and DRR terms). The refining stages train with their bundle
    presets' loss terms (``stage2.json``, ``stage3.json``) less the VGG term, which the demo could only initialise
    at random (no weights are downloaded) and which costs more per step than the rest. The test split holds 12
    phantoms. With ``baseline`` the U-Net baseline (:data:`CASCADE_DEMO_BASELINE`) trains at stage 1's size with
    stage 1's schedule, with L1 alone (:data:`CASCADE_DEMO_BASELINE_LOSSES`), and enters the evaluation as the
    method ``unet_baseline``. ``views`` radiographs per case (2: AP + lateral; more: evenly spaced over 180
    degrees). Writes ``OUT/cascade_xray2ct/metrics.json`` with the evaluation summary and the checks (stage 1 vs
    the mean volume and back-projection baselines, each stage vs the one before and vs the U-Net baseline, the
    final stage vs the mean volume, re-projection PSNR per stage).

    Raises:
        ValueError: ``OUT/cascade_xray2ct`` holds a demo prepared with another number of views (before anything
            is written).
    """
    from ctsynth.bundles import bundle_root, checkpoint_settings, run_bundle
    from ctsynth.prepare import prepare_xray2ct

    root = Path(out) / "cascade_xray2ct"
    _check_demo_views(root / "data", int(views))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    side = 96
    for i in tqdm(range(n_phantoms), desc="phantoms", unit="vol"):
        path = root / "phantoms" / f"phantom_{i:03d}.nii.gz"
        if not path.is_file():
            vol, _ = thorax_phantom((side, side, side), 4.0, seed=seed + 1000 + i, contrast=(i % 3 == 0), emboli=0.3)
            save_nifti(vol, path)
    prep = prepare_xray2ct(str(root / "phantoms" / "*.nii.gz"), root / "data", views=int(views), sizes=sizes,
                           xray_size=xray_size, seed=seed, fractions=CASCADE_DEMO_SPLIT)
    timings["prepare_s"] = time.perf_counter() - t0
    data = {"dataset_dir": str(root / "data"), "num_workers": 0, "seed": seed}
    common = {**data, "models_dir": str(root / "models"), "output_dir": str(root / "eval"), "sizes": list(sizes),
              **CASCADE_DEMO_NETWORK}
    for k, (epochs, iterations, batch, lr) in enumerate(stages, start=1):
        t = time.perf_counter()
        cfg = ["train.json"] + ([f"stage{k}.json"] if k > 1 else [])
        extra = _schedule_overrides(epochs, iterations, batch, lr)
        if k > 1:
            preset = ConfigParser.load_config_file(Path(bundle_root("cascade_xray2ct")) / "configs" / f"stage{k}.json")
            extra.update(vgg_weights=None, vgg_random_init=True,
                         loss_weights={t: w for t, w in preset["loss_weights"].items() if t != "vgg"})
        run_bundle("cascade_xray2ct", cfg, "training", {**common, **extra})
        timings[f"train_stage{k}_s"] = time.perf_counter() - t
    baselines = {}
    if baseline:  # the U-Net, with stage 1's size and schedule
        t = time.perf_counter()
        unet_dir = root / "models" / "unet_baseline"
        run_bundle("cascade_xray2ct", ["train.json", "unet_baseline.json"], "training", {
            **data, "models_dir": str(unet_dir), "output_dir": str(root / "eval_unet_baseline"),
            "sizes": [int(sizes[0])], **CASCADE_DEMO_BASELINE, **_schedule_overrides(*stages[0]),
            "loss_weights": dict(CASCADE_DEMO_BASELINE_LOSSES)})
        baselines["unet_baseline"] = str(unet_dir / "model.pt")
        timings["train_unet_baseline_s"] = time.perf_counter() - t
    t = time.perf_counter()
    report = run_bundle("cascade_xray2ct", ["train.json", "evaluate.json"], "evaluate",
                        {**common, "baselines": baselines})[0]
    timings["evaluate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    datalist = json.loads((root / "data" / "datalist.json").read_text())
    case = datalist["test"][0]
    ckpt = str(root / "models" / "model.pt")
    rec = run_bundle("cascade_xray2ct", ["inference.json"], "inference", {
        "xrays": [str(root / "data" / x) for x in case["xrays"]],
        "geometry": str(root / "data" / case["geometry"]), "output": str(root / "reconstruction" / f"{case['id']}.nii.gz"),
        "ground_truth": str(root / "data" / case[f"image_{sizes[-1]}"]), "save_stages": True,
        **checkpoint_settings("cascade_xray2ct", ckpt),
    })[0]
    timings["inference_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    def pick(stage: int, method: str) -> dict[str, Any]:
        return next(e for e in report["summary"] if e["stage"] == stage and e["method"] == method
                    and e["window"] == [-1000.0, 1000.0])

    s1 = {m: pick(1, m) for m in ("cascade", "mean_volume", "backprojection")}
    last = max(e["stage"] for e in report["summary"])
    checks = {
        "stage1_psnr_db": s1["cascade"]["psnr"], "final_stage_psnr_db": pick(last, "cascade")["psnr"],
        "stage1_minus_mean_volume_db": s1["cascade"]["psnr"] - s1["mean_volume"]["psnr"],
        "stage1_beats_mean_volume_by_3db": s1["cascade"]["psnr"] - s1["mean_volume"]["psnr"] >= 3.0,
        "stage1_beats_backprojection": s1["cascade"]["psnr"] > s1["backprojection"]["psnr"],
        "final_minus_mean_volume_db": pick(last, "cascade")["psnr"] - pick(last, "mean_volume")["psnr"],
    }
    for k in range(1, last + 1):
        checks[f"stage{k}_reprojection_psnr_db"] = pick(k, "cascade")["reprojection_psnr"]
        if k > 1:  # each stage against the one before: at their own sizes, and on this stage's grid
            checks[f"stage{k}_minus_stage{k - 1}_db"] = pick(k, "cascade")["psnr"] - pick(k - 1, "cascade")["psnr"]
            checks[f"stage{k}_minus_previous_upsampled_db"] = (pick(k, "cascade")["psnr"]
                                                               - pick(k, "previous_stage")["psnr"])
        if baselines:  # the U-Net trained at stage 1's size, resampled to this stage's grid
            checks[f"stage{k}_minus_unet_baseline_db"] = pick(k, "cascade")["psnr"] - pick(k, "unet_baseline")["psnr"]
    summary = {"prepared": prep, "sizes": list(sizes), "views": int(views), "stages": [list(s) for s in stages],
               "baselines": baselines, "timings": timings,
               "checks": checks, "evaluation": report["summary"], "test_cases": report["cases"],
               "reconstruction": rec, "metric_definition": "3D over the cube, data range = HU window width"}
    atomic_write_json(summary, root / "metrics.json")
    logger.info("cascade_xray2ct demo: stage 1 %.2f dB vs mean volume %.2f dB and back-projection %.2f dB "
                "([-1000, 1000] HU, 3D) in %.0f s", s1["cascade"]["psnr"], s1["mean_volume"]["psnr"],
                s1["backprojection"]["psnr"], timings["total_s"])
    return summary


def _schedule_overrides(epochs: float, iterations: float, batch: float, lr: float) -> dict[str, Any]:
    """A demo stage's (epochs, iterations per epoch (0: whole training set), batch size, learning rate) as overrides."""
    extra = {"epochs": int(epochs), "batch_size": int(batch), "learning_rate": float(lr)}
    if iterations:
        extra["train#trainer#epoch_length"] = int(iterations)
    return extra


def _check_demo_views(data_dir: Path, views: int) -> None:
    """Refuses to reuse a demo folder prepared with another number of views (its models would resume)."""
    datalist = data_dir / "datalist.json"
    if not datalist.is_file():
        return
    first = next(iter(json.loads(datalist.read_text()).get("training", [])), None)
    if first is not None and len(first.get("xrays", [])) != views:
        raise ValueError(f"{data_dir.parent} holds a demo with {len(first['xrays'])} views; run the {views}-view demo "
                         "with another --out (its models would otherwise resume from the other run's)")


#: widths and schedules of the slice_interp_ldm demo: a tiny MAISI-architecture autoencoder and denoiser that
#: train in a few minutes on 2 CPU cores
SLICE_DEMO_AUTOENCODER = {"num_channels": [16, 32, 32], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4,
                          "num_splits": 1}
SLICE_DEMO_DENOISER = {
    "network_def#channels": [32, 64, 64, 64], "network_def#attention_levels": [False, False, True, False],
    "network_def#num_head_channels": 16, "network_def#norm_num_groups": 8, "network_def#num_res_blocks": 1,
}
SLICE_DEMO_SCHEDULE = {  # (epochs, iterations per epoch, batch size, learning rate) per model
    "autoencoder": (8, 50, 2, 1e-3), "diffusion": (2, 50, 4, 1e-3), "refiner": (20, 20, 16, 5e-4),
    "self_supervised_steps": 300,
}


def slice_interp_ldm_demo(out: str | Path, n_cases: int = 16, shape: Sequence[int] = (64, 64, 84), spacing: float = 2.0,
                          factor: int = 5, seed: int = 0, schedule: dict[str, Any] | None = None, realism: float = 0.0,
                          **_: Any) -> dict[str, Any]:
    """The slice_interp_ldm bundle end to end on phantom pairs (thin phantoms and their ``factor``x slab averages):
    train a tiny autoencoder, a tiny latent diffusion model and the fast paired refiner; evaluate them with the
    per-case self-supervised refiner against linear and cubic interpolation and the autoencoder's ceiling;
    interpolate one test series with 2 samples (mean + uncertainty). Writes ``OUT/slice_interp_ldm/metrics.json``.
    """
    from ctsynth.bundles import checkpoint_settings, run_bundle
    from ctsynth.prepare import load_datalist, prepare_phantom_pairs

    sched = {**SLICE_DEMO_SCHEDULE, **(schedule or {})}
    root = Path(out) / "slice_interp_ldm"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    prep = prepare_phantom_pairs(root / "data", n_cases, shape, spacing, factor, seed=seed, realism=realism)
    timings["prepare_s"] = time.perf_counter() - t0
    common = {"dataset_dir": str(root / "data"), "models_dir": str(root / "models"), "output_dir": str(root / "eval"),
              "num_workers": 0, "seed": seed, "autoencoder_args": SLICE_DEMO_AUTOENCODER, "vgg_random_init": True}

    def train(config: str, key: str, extra: dict[str, Any]) -> None:
        epochs, iterations, batch, lr = sched[key]
        t = time.perf_counter()
        run_bundle("slice_interp_ldm", [config], "training", {
            **common, "epochs": int(epochs), "train#trainer#epoch_length": int(iterations), "batch_size": int(batch),
            "learning_rate": float(lr), **extra})
        timings[f"train_{key}_s"] = time.perf_counter() - t

    side = [int(s) for s in shape]
    # MSE + KL only: random VGG features and a GAN this short do not help (the tests exercise both terms); MSE,
    # what PSNR scores, gave 1.5 dB more validation PSNR than the seed's L1 after the same 400 steps
    train("train_autoencoder.json", "autoencoder", {"patch_size": [32, 32, 32], "val_patch_size": side,
                                                   "perceptual_weight": 0.0, "adversarial_start": 10 ** 9,
                                                   "pixel_loss": "mse"})
    # clean-latent prediction on the encoded cubic interpolation: a short run starts from the conditioning
    # the demo's volumes fit one autoencoder / denoiser window: no blending seams to judge the model by
    ldm = {**SLICE_DEMO_DENOISER, "crop_depth": 8, "sampler_window": 24, "val_steps": 10, "codec_chunk": 96,
           "image_loss_interval": 10, "prediction_type": "sample", "conditioning": "image"}
    train("train.json", "diffusion", ldm)

    # the fast paired refiner on the same training pairs (and their in-plane detail), through its bundle config
    epochs, iterations, batch, lr = sched["refiner"]
    t = time.perf_counter()
    run_bundle("slice_interp_ldm", ["train_refiner.json"], "training", {
        "dataset_dir": common["dataset_dir"], "models_dir": common["models_dir"], "output_dir": common["output_dir"],
        "num_workers": 0, "seed": seed, "epochs": int(epochs), "patches_per_epoch": int(iterations) * int(batch),
        "batch_size": int(batch), "learning_rate": float(lr)})
    refiner_path = root / "models" / "refiner.pt"
    timings["train_refiner_s"] = time.perf_counter() - t

    ckpt = str(root / "models" / "model.pt")
    t = time.perf_counter()
    report = run_bundle("slice_interp_ldm", ["train.json", "evaluate.json"], "evaluate", {
        **common, **ldm, **checkpoint_settings("slice_interp_ldm", ckpt), "refiner_path": str(refiner_path),
        "eval_methods": ["linear", "cubic", "vae_ceiling", "ldm", "refiner", "self_supervised", "cubic_consistent",
                         "ldm_consistent", "refiner_consistent", "self_supervised_consistent"],
        "self_supervised_steps": int(sched["self_supervised_steps"])})[0]
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    infer = run_bundle("slice_interp_ldm", ["inference.json"], "inference", {
        "models_dir": str(root / "models"), "autoencoder_args": SLICE_DEMO_AUTOENCODER, "input": case["thick"],
        "output": str(root / "inference" / "thin.nii.gz"), "spacing": spacing, "samples": 2,
        "preview": str(root / "inference" / "thin.png"), "sampler_window": 24, "codec_chunk": 96,
        **checkpoint_settings("slice_interp_ldm", ckpt)})[0]
    timings["inference_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    def pick(method: str, window: Sequence[float] = (-1000.0, 1000.0), mode: str = "3d") -> dict[str, Any]:
        return next(e for e in report["summary"] if e["method"] == method and e["window"] == list(window)
                    and e["mode"] == mode)

    cubic = pick("cubic")["psnr"]
    models = [f"{m}{suffix}" for suffix in ("", "_consistent") for m in ("ldm", "refiner", "self_supervised")]
    gains = {m: pick(m)["psnr"] - cubic for m in (*models, "vae_ceiling", "linear", "cubic_consistent")}
    checks = {f"{m}_minus_cubic_db": g for m, g in gains.items()}
    checks.update({f"{m}_psnr_db": pick(m)["psnr"] for m in ("cubic", "ldm", "refiner")})
    checks.update({f"{m}_beats_cubic": gains[m] > 0 for m in models})
    summary = {"prepared": prep, "slab_factor": factor, "thin_spacing_mm": spacing, "shape": side, "realism": realism,
               "timings": timings,
               "checks": checks, "evaluation": report["summary"], "hu_fidelity": report["hu_fidelity"],
               "test_cases": report["cases"], "inference": infer,
               "metric_definition": "3D over the thin grid, HU window and data range stated per row"}
    atomic_write_json(summary, root / "metrics.json")
    logger.info("slice_interp_ldm demo ([-1000, 1000] HU, 3D): cubic %.2f dB; ldm %+.2f (with thick consistency %+.2f, "
                "cubic with it %+.2f), refiner %+.2f, self-supervised %+.2f, autoencoder ceiling %+.2f dB vs cubic, in "
                "%.0f s", cubic, gains["ldm"], gains["ldm_consistent"], gains["cubic_consistent"], gains["refiner"],
                gains["self_supervised"], gains["vae_ceiling"], timings["total_s"])
    return summary


#: the xray2ctpa_vqgan demo: a tiny VQ-GAN (4x per axis: 2x space-to-depth, then one stride-2 stage; 256 x 16
#: codebook), denoiser and PE classifier that train in a few minutes each on 2 CPU cores. The space-to-depth stem
#: makes a float32 step 4.5x cheaper than a full-resolution stage of widths 16/32/64, for 0.4 dB less per step.
CTPA_DEMO_VQGAN = {"network_def#channels": [32, 64], "network_def#num_res_blocks": 1, "network_def#stem_stride": 2,
                   "network_def#num_embeddings": 256, "network_def#embedding_dim": 16, "network_def#norm_groups": 8}
CTPA_DEMO_DENOISER = {
    "network_def#xray_channels": [16, 32, 64], "network_def#token_dim": 64, "network_def#token_grid": 8,
    "network_def#ray_channels": [16, 32], "network_def#aligned_channels": 8,
    "network_def#channels": [32, 64, 64], "network_def#attention_levels": [False, False, True],
    "network_def#num_res_blocks": 1, "network_def#num_head_channels": 16, "network_def#norm_num_groups": 16,
}
CTPA_DEMO_CLASSIFIER = {"classifier_def#block_inplanes": [8, 16, 32, 64]}
CTPA_DEMO_SCHEDULE = {  # (epochs, iterations per epoch (0: all), batch size, learning rate) per model
    "vqgan": (150, 8, 2, 1e-3), "diffusion": (20, 40, 4, 1e-3), "regression": (6, 40, 4, 1e-3),
    "classifier": (15, 0, 4, 3e-4), "steps": 25, "vqgan_eval_cases": 4,
}


def xray2ctpa_vqgan_demo(out: str | Path, n_cases: int = 64, shape: Sequence[int] = (64, 64, 64), spacing: float = 5.0,
                         large_shape: Sequence[int] = (96, 96, 96), seed: int = 0,
                         schedule: dict[str, Any] | None = None, conditioning: str | None = None,
                         **_: Any) -> dict[str, Any]:
    """The xray2ctpa_vqgan bundle end to end on contrast phantoms (emboli in about half): prepare CTPA + DRR
    X-rays, train the VQ-GAN and evaluate it (whole volume and patch-wise, codebook usage), reconstruct a larger
    phantom patch-wise, train the X-ray-conditioned diffusion model and the PE classifier, judge generated
    volumes (PSNR/SSIM, AUC real vs generated) and generate one CTPA from a PNG X-ray with ``ctsynth generate``.
    ``conditioning`` (``aligned``, ``tokens``, ``aligned+tokens``; None: the bundle's default) is how the X-ray
    reaches the denoiser. Writes ``OUT/xray2ctpa_vqgan/metrics.json``.
    """
    from ctsynth.bundles import bundle_module, checkpoint_settings, run_bundle
    from ctsynth.io import load_projection, load_volume
    from ctsynth.metrics import compute_image_metrics
    from ctsynth.prepare import load_datalist, prepare_ctpa, write_phantom_ctpa_studies
    from ctsynth.transforms import normalize_radiograph

    modes = bundle_module("xray2ctpa_vqgan", "conditioning").CONDITIONING_MODES
    if conditioning is not None and conditioning not in modes:
        raise ValueError(f"conditioning must be one of {', '.join(modes)}, got {conditioning!r}")
    sched = {**CTPA_DEMO_SCHEDULE, **(schedule or {})}
    root = Path(out) / "xray2ctpa_vqgan"
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    src = write_phantom_ctpa_studies(root / "src", n=n_cases, shape=shape, spacing_mm=spacing, emboli=0.5, seed=seed)
    prep = prepare_ctpa(src / "studies", root / "data", shape=shape, labels=src / "labels.csv", xray_size=int(shape[0]),
                        fractions=(0.45, 0.05, 0.5), seed=seed)  # half held out: >= 30 volumes for the judge's AUC
    timings["prepare_s"] = time.perf_counter() - t0
    common = {"dataset_dir": str(root / "data"), "models_dir": str(root / "models"), "output_dir": str(root / "eval"),
              "num_workers": 0, "seed": seed}

    def train(config: str, key: str, extra: dict[str, Any]) -> None:
        epochs, iterations, batch, lr = sched[key]
        t = time.perf_counter()
        over = {**common, "epochs": int(epochs), "batch_size": int(batch), "learning_rate": float(lr), **extra}
        if iterations:
            over["train#trainer#epoch_length"] = int(iterations)
        run_bundle("xray2ctpa_vqgan", [config], "training", over)
        timings[f"train_{key}_s"] = time.perf_counter() - t

    side = [int(s) for s in shape]
    # MSE + commitment in bfloat16: random VGG features and a GAN this short do not help (the tests exercise both
    # terms); MSE, what PSNR scores, beats the seed's L1 by 2.4 dB at equal steps; CPU bf16 steps are 1.4x faster
    vq = {**CTPA_DEMO_VQGAN, "perceptual_weight": 0.0, "adversarial_start": 10 ** 9, "vgg_random_init": True,
          "pixel_loss": "mse", "amp": True, "val_roi_size": side, "val_interval": int(sched["vqgan"][0])}
    train("train.json", "vqgan", vq)
    t = time.perf_counter()
    windows = [max(s * 3 // 4 // 8 * 8, 8) for s in side]  # 3/4 of the volume: 8 overlapping windows per volume
    vq_eval = run_bundle("xray2ctpa_vqgan", ["train.json", "evaluate.json"], "evaluate", {
        **common, **vq, "output_dir": str(root / "eval" / "vqgan_test"), "eval_roi_size": windows,
        "eval_max_cases": int(sched["vqgan_eval_cases"])})[0]["summary"]
    timings["evaluate_vqgan_s"] = time.perf_counter() - t

    t = time.perf_counter()  # a larger field of view than training, windows of the training size
    from ctsynth.phantoms import thorax_phantom

    large, _ = thorax_phantom(tuple(large_shape), spacing, seed=seed + 5000, contrast=True, emboli=1.0)
    vqgan_path = root / "models" / "vqgan.pt"
    net = checkpoint_settings("xray2ctpa_vqgan", vqgan_path, role="vqgan")["network_def"]
    recon = bundle_module("xray2ctpa_vqgan", "evaluate").VQGANReconstructor(
        net, vqgan_path, roi_size=side, whole_max_voxels=int(torch.tensor(large_shape).prod()), norm_stats="volume")
    patch, whole, counts, codec = recon.reconstruct(large)
    recon.norm_stats, recon.whole_max_voxels = "window", 0  # each window normalised by its own statistics
    patch_own = recon.reconstruct(large)[0]
    m_patch, m_own, m_whole = (compute_image_metrics(v, large, window=(-1000, 1000)) for v in (patch, patch_own, whole))
    large_report = {"shape": list(large_shape), "roi_size": side, "overlap": 0.25, "norm_stats": "volume",
                    "psnr_patchwise": m_patch["psnr"], "psnr_whole": m_whole["psnr"],
                    "patchwise_minus_whole_db": m_patch["psnr"] - m_whole["psnr"],
                    "seam_ratio_patchwise": codec.seam_ratio(patch), "seam_ratio_whole": codec.seam_ratio(whole),
                    "psnr_patchwise_window_stats": m_own["psnr"],
                    "patchwise_window_stats_minus_whole_db": m_own["psnr"] - m_whole["psnr"],
                    "seam_ratio_patchwise_window_stats": codec.seam_ratio(patch_own)}
    save_triplanar_png({"phantom": large, "patch-wise": patch, "whole": whole, "window stats": patch_own},
                       root / "eval" / "large_phantom.png", error_of=("patch-wise", "whole"))
    timings["large_phantom_s"] = time.perf_counter() - t

    # clean-latent prediction: a short run learns the conditional mean, where noise prediction is still noise
    ldm = {**CTPA_DEMO_DENOISER, "xray_size": int(shape[0]), "val_steps": 10, "val_interval": int(sched["diffusion"][0]),
           "prediction_type": "sample", **({"conditioning": conditioning} if conditioning else {})}
    train("train_diffusion.json", "diffusion", ldm)
    # the deterministic baseline: the same network and conditioning regressed to the clean latents
    epochs, iterations, batch, lr = sched["regression"]
    t = time.perf_counter()
    run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "regression.json"], "training", {
        **common, **ldm, "epochs": int(epochs), "train#trainer#epoch_length": int(iterations), "batch_size": int(batch),
        "learning_rate": float(lr), "val_interval": int(epochs)})
    timings["train_regression_s"] = time.perf_counter() - t
    train("train_classifier.json", "classifier", CTPA_DEMO_CLASSIFIER)
    epochs, iterations, batch, lr = sched["classifier"]  # the X-ray-only judge: the same network in 2D
    t = time.perf_counter()
    run_bundle("xray2ctpa_vqgan", ["train_classifier.json", "train_xray_classifier.json"], "training", {
        **common, **CTPA_DEMO_CLASSIFIER, "xray_size": int(shape[0]), "epochs": int(epochs), "batch_size": int(batch),
        "learning_rate": float(lr)})
    timings["train_xray_classifier_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ckpt = str(root / "models" / "ldm.pt")
    gen = run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "evaluate_generation.json"], "evaluate", {
        **common, **checkpoint_settings("xray2ctpa_vqgan", ckpt, role="ldm"), **CTPA_DEMO_CLASSIFIER,
        "eval_steps": int(sched["steps"]), "eval_guidance_sweep": [1.0, 3.0, 5.0],
        "xray_classifier_checkpoint": str(root / "models" / "xray_classifier.pt")})[0]["summary"]
    timings["evaluate_generation_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reg_ckpt = str(root / "models" / "regression.pt")
    reg = run_bundle("xray2ctpa_vqgan", ["train_diffusion.json", "evaluate_generation.json"], "evaluate", {
        **common, **checkpoint_settings("xray2ctpa_vqgan", reg_ckpt, role="ldm"), **CTPA_DEMO_CLASSIFIER,
        "ldm_checkpoint": reg_ckpt, "eval_previews": 1, "output_dir": str(root / "eval" / "regression")})[0]["summary"]
    timings["evaluate_regression_s"] = time.perf_counter() - t

    t = time.perf_counter()  # the user's path: a PNG chest X-ray through `ctsynth generate`'s bundle run
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    img, _ = load_projection(case["xray"])
    png = save_image_png(normalize_radiograph(img).clamp(0, 1), root / "inference" / "xray.png", 0.0, 1.0)
    infer = run_bundle("xray2ctpa_vqgan", ["inference.json"], "inference", {
        "models_dir": str(root / "models"), "input": str(png), "output": str(root / "inference" / "ctpa.nii.gz"),
        "preview": str(root / "inference" / "ctpa.png"), "steps": int(sched["steps"]),
        **checkpoint_settings("xray2ctpa_vqgan", ckpt, role="ldm")})[0]
    infer["psnr_vs_paired_real"] = compute_image_metrics(load_volume(infer["written"]).as_tensor(),
                                                          load_volume(case["image"]).as_tensor(), window=(-1000, 1000))["psnr"]
    timings["inference_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    checks = {
        "vqgan_psnr_whole_db": vq_eval["psnr_whole"], "vqgan_psnr_ge_28db": vq_eval["psnr_whole"] >= 28.0,
        "codebook_usage_pct": vq_eval["codebook_usage_pct"], "codebook_usage_ge_50pct": vq_eval["codebook_usage_pct"] >= 50,
        "patchwise_minus_whole_db_test": vq_eval["patchwise_minus_whole_db"],
        "patchwise_minus_whole_db_large": large_report["patchwise_minus_whole_db"],
        "patchwise_within_0.3db": max(abs(vq_eval["patchwise_minus_whole_db"]),
                                      abs(large_report["patchwise_minus_whole_db"])) <= 0.3,
        "generated_psnr_db": gen["psnr"], "generated_minus_mean_volume_db": gen.get("minus_mean_volume_psnr_db"),
        "generated_beats_mean_volume_by_2db": (gen.get("minus_mean_volume_psnr_db") or -99.0) >= 2.0,
        "mean_volume_psnr_db": gen.get("mean_volume_psnr"), "regression_psnr_db": reg["psnr"],
        "generated_minus_regression_db": gen["psnr"] - reg["psnr"], "auc_regression": reg.get("auc_generated"),
        "vqgan_ceiling_psnr_db": gen["vqgan_ceiling_psnr"], "generated_minus_vqgan_ceiling_db": gen["minus_vqgan_ceiling_psnr_db"],
        "auc_real": gen.get("auc_real"), "auc_generated": gen.get("auc_generated"),
        "auc_real_ci": gen.get("auc_real_ci"), "auc_generated_ci": gen.get("auc_generated_ci"),
        "auc_xray_only": gen.get("auc_xray_only"), "auc_xray_only_ci": gen.get("auc_xray_only_ci"),
        "n_judged": gen.get("n_judged"), "n_judged_ge_30": (gen.get("n_judged") or 0) >= 30,
        "auc_real_ge_0.9": (gen.get("auc_real") or 0.0) >= 0.9, "conditioning": read_checkpoint_meta(ckpt).get("network_config", {}).get("conditioning", "tokens"),
        "guidance_sweep_psnr_db": {f"{r['guidance']:g}": r["psnr"] for r in gen.get("guidance_sweep", [])},
        "guidance_spread_db": gen.get("guidance_spread_db"),
        "within_15_min": timings["total_s"] <= 900,
    }
    summary = {"prepared": prep, "shape": side, "spacing_mm": spacing, "timings": timings, "checks": checks,
               "vqgan": vq_eval, "large_phantom": large_report, "generation": gen, "regression": reg, "inference": infer,
               "metric_definition": "3D, [-1000, 1000] HU, data range 2000"}
    atomic_write_json(summary, root / "metrics.json")
    logger.info("xray2ctpa_vqgan demo: VQ-GAN %.2f dB (patch-wise %+.2f dB), usage %.0f %%; generated CTPA %.2f dB, "
                "AUC real %s / generated %s, in %.0f s", vq_eval["psnr_whole"], vq_eval["patchwise_minus_whole_db"],
                vq_eval["codebook_usage_pct"], gen["psnr"], gen.get("auc_real"), gen.get("auc_generated"),
                timings["total_s"])
    return summary


DEMOS: dict[str, Callable[..., dict[str, Any]]] = {"foundation": foundation_demo, "cascade_xray2ct": cascade_xray2ct_demo,
                                                   "slice_interp_ldm": slice_interp_ldm_demo,
                                                   "xray2ctpa_vqgan": xray2ctpa_vqgan_demo}


def run_demo(out: str | Path = "demo_out", bundle: str = "all", **kwargs: Any) -> dict[str, Any]:
    """Runs one demo (``bundle``) or all of them in order."""
    names = list(DEMOS) if bundle == "all" else [bundle]
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise ValueError(f"unknown demo {unknown}; choose from {['all', *DEMOS]}")
    return {name: DEMOS[name](out, **kwargs) for name in names}
